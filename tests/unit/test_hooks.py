"""Webhook signatures, and the README's receiver example verifying them (the
dispatchers against a real nats-server and node: tests/nats/test_hooks.py)."""

from __future__ import annotations

from typing import Any

from gateway.hooks import signature, verify

SECRET = "hook-secret-0123456789"


def test_signature_scheme_and_tampering() -> None:
    body = b'{"id":"7","data":{"amount":10}}'
    header = signature([SECRET, "old-secret"], int(__import__("time").time()), body)
    assert header.count("v1=") == 2
    assert verify(SECRET, header, body) and verify("old-secret", header, body)  # rotation: both verify
    assert not verify(SECRET, header, body.replace(b"10", b"99"))  # tampered body
    assert not verify("another-secret", header, body)
    stale = signature([SECRET], 1_000_000_000, body)
    assert not verify(SECRET, stale, body)  # too old: a replay


def test_the_readme_receiver_example_verifies_our_signatures() -> None:
    import re
    import time
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "def verify" in block)
    namespace: dict[str, Any] = {}
    exec(code, namespace)
    body = b'{"id":"1","data":"x"}'
    header = signature([SECRET], int(time.time()), body)
    assert namespace["verify"](SECRET, header, body)
    assert not namespace["verify"](SECRET, header, body + b" ")
