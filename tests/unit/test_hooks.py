"""Webhook signatures, the README's receiver example verifying them, and
the dispatcher's stop (the dispatchers against a real nats-server and node:
tests/nats/test_hooks.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from nats.aio.msg import Msg

from broker.hook_message import HookMessage
from broker.hooks import HookSource
from gateway.hooks import Dispatcher, _seconds, signature, verify
from gateway.settings import Settings
from gateway.settings.loading import with_overrides

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
    for forged in ("\u00b2", "9" * 5000, "-1", " 1", ""):  # "²" passes str.isdigit; int() refuses it and 5,000 digits
        assert not verify(SECRET, header.replace(header.split(",")[0], f"t={forged}"), body)


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
    assert not namespace["verify"](SECRET, header.replace("t=", "t=\u00b2", 1), body)  # refused, not raised


class _LosesOneCancel:
    """A hook source whose fetch drops the first cancel, as Python 3.11's
    ``wait_for`` does when the fetch's messages arrive with it."""

    ready = True

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def backlog(self) -> None:
        return None

    async def messages(self, batch: int) -> AsyncIterator[list[HookMessage]]:
        lost = False
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost = True
            yield []


async def test_a_stop_whose_cancel_is_lost_cancels_again() -> None:
    settings = with_overrides(Settings(), hooks={"url": "http://127.0.0.1:9/hook", "secret": SECRET})
    dispatcher = Dispatcher(settings, cast(HookSource, _LosesOneCancel()))
    task = asyncio.create_task(dispatcher.run())
    await asyncio.sleep(0.05)
    dispatcher.stop(task)
    done, _ = await asyncio.wait([task], timeout=3)
    assert done and task.cancelled()  # one plain cancel would leave it dispatching


class _Answers:
    """A JetStream message as HookMessage answers it: what it was told."""

    def __init__(self) -> None:
        self.told: list[tuple[str, float]] = []

    async def ack(self) -> None:
        self.told.append(("ack", 0.0))

    async def nak(self, delay: float) -> None:
        self.told.append(("nak", delay))

    async def in_progress(self) -> None:
        self.told.append(("working", 0.0))


class _NoDeadLetters(_LosesOneCancel):
    async def dead_letter(self, message: HookMessage, reason: str) -> str | None:
        return "MaxPayloadError()"


async def test_a_message_that_cannot_be_dead_lettered_comes_back_later_uncounted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It used to be counted and logged as dead-lettered though nothing was
    kept, and left unanswered: POSTed again every ack_wait, forever."""
    settings = with_overrides(Settings(), hooks={"url": "http://127.0.0.1:9/hook", "secret": SECRET, "max_backoff": 5})
    dispatcher = Dispatcher(settings, cast(HookSource, _NoDeadLetters()))
    msg = _Answers()
    m = HookMessage(7, "ann", "message", b"{}", time.time(), attempt=3, _msg=cast(Msg, msg))
    await dispatcher._dead_letter(m, "rejected", "refused", "HTTP 410")
    [(answer, delay)] = msg.told
    assert answer == "nak" and 0 <= delay <= 5  # with backoff, and not answered for good
    assert dispatcher.metrics.deliveries.labels("rejected")._value.get() == 0
    assert [r.levelname for r in caplog.records if "could not be dead-lettered" in r.getMessage()] == ["ERROR"]


def test_retry_after_is_seconds_or_a_date_within_the_horizon() -> None:
    import time
    from email.utils import formatdate

    assert _seconds("5", 100.0) == 5.0 and _seconds(" 2.5 ", 100.0) == 2.5
    assert _seconds("100000000000", 100.0) == 100.0  # at most the horizon
    for absurd in ("nan", "inf", "1e400", "-3", "", "soon", "0x10"):
        assert _seconds(absurd, 100.0) is None, absurd  # the usual backoff instead
    assert 6.0 < (_seconds(formatdate(time.time() + 8, usegmt=True), 100.0) or 0) <= 8.0
    assert _seconds(formatdate(time.time() - 60, usegmt=True), 100.0) == 0.0  # past: now


def test_a_short_retry_after_still_backs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Retry-After: 0`` on every try used to be retried at once, forever."""
    settings = with_overrides(Settings(), hooks={"max_backoff": 5.0})
    dispatcher = Dispatcher(settings, cast(HookSource, _LosesOneCancel()))
    monkeypatch.setattr("random.uniform", lambda low, high: high)  # the jitter at its top
    assert dispatcher.retry_delay(1, 0.0) == 2.0 and dispatcher.retry_delay(10, 0.0) == 5.0
    assert dispatcher.retry_delay(10, 30.0) == 30.0 and dispatcher.retry_delay(10, None) == 5.0


def test_backoff_stays_finite_however_many_deliveries() -> None:
    from gateway.settings import load_settings, with_overrides

    settings = with_overrides(load_settings(env={}, use_default_file=False), hooks={"max_backoff": 5.0})
    dispatcher = Dispatcher(settings)
    assert all(0 <= dispatcher.backoff(attempt) <= 5.0 for attempt in (1, 1023, 1024, 10**6))


def _young(n: int, stamp: float) -> tuple[list[HookMessage], list[_Answers]]:
    answers = [_Answers() for _ in range(n)]
    return [HookMessage(i, "ann", "message", b"{}", stamp, 1, cast(Msg, a)) for i, a in enumerate(answers)], answers


async def test_a_batch_waits_for_its_first_to_fall_due_kept_from_the_others() -> None:
    """Until the first fetched is offline_after old, all of them are kept in
    progress (after ack_wait — 1.2 s here — JetStream would hand them out
    again); a stream clock ahead of ours makes the wait offline_after, no longer."""
    hooks = {"url": "http://127.0.0.1:9/hook", "secret": SECRET, "offline_after": 0.5, "timeout": 0.1}
    dispatcher = Dispatcher(with_overrides(Settings(), hooks=hooks), cast(HookSource, _LosesOneCancel()))
    held, answers = _young(3, time.time() + 3600)  # stamped an hour ahead of us
    began = time.monotonic()
    await dispatcher._until_due(held)
    assert 0.5 <= time.monotonic() - began < 0.8
    assert [a.told for a in answers] == [[("working", 0.0)] * 2] * 3  # at 0.4 s (ack_wait / 3) and 0.5 s
    held, answers = _young(3, time.time() - 0.5)  # due already: no wait
    began = time.monotonic()
    await dispatcher._until_due(held)
    assert time.monotonic() - began < 0.05 and all(a.told == [] for a in answers)


class _OneYoungBatch(_LosesOneCancel):
    def __init__(self, batch: list[HookMessage]) -> None:
        self.batch = batch

    async def messages(self, batch: int) -> AsyncIterator[list[HookMessage]]:
        yield self.batch
        await asyncio.sleep(3600)


async def test_a_stop_hands_back_what_waits_to_fall_due_at_once() -> None:
    """Not left for ack_wait: another dispatcher takes them now."""
    hooks = {"url": "http://127.0.0.1:9/hook", "secret": SECRET, "offline_after": 60.0}
    held, answers = _young(3, time.time())
    dispatcher = Dispatcher(with_overrides(Settings(), hooks=hooks), cast(HookSource, _OneYoungBatch(held)))
    task = asyncio.create_task(dispatcher.run())
    await asyncio.sleep(0.1)
    dispatcher.stop(task)
    done, _ = await asyncio.wait([task], timeout=1)
    assert done and [a.told for a in answers] == [[("nak", 0.0)]] * 3


async def nats_warnings(
    urls: tuple[str, ...], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """The dispatcher's NATS warnings while it cannot reach ``urls``."""
    import broker.hooks
    from broker.channels import Subjects
    from broker.throttle import Throttle

    monkeypatch.setattr(broker.hooks, "warn", Throttle(broker.hooks.log, interval=30.0))  # unmuted by other tests
    source = HookSource(urls, Subjects("herald"), "HERALD", ack_wait=5.0, connect_timeout=0.2)
    with caplog.at_level(logging.WARNING):
        starting = asyncio.ensure_future(source.start())
        try:
            await asyncio.wait_for(_until(lambda: any("retrying" in r.getMessage() for r in caplog.records)), 10)
        finally:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
    return [r.getMessage() for r in caplog.records if "NATS" in r.getMessage()]


async def test_nats_warnings_list_the_urls_comma_separated(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dispatcher's NATS warnings name the URLs as the node's own
    connect error does (``a,b``), not as a Python tuple."""
    said = await nats_warnings(("nats://127.0.0.1:1", "nats://127.0.0.1:2"), caplog, monkeypatch)
    assert said and all("nats://127.0.0.1:1,nats://127.0.0.1:2" in line for line in said), said
    assert not any("('nats://" in line for line in said), said


async def test_nats_warnings_hide_a_password_or_token_in_the_urls(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    said = await nats_warnings(("nats://alice:s3cret@127.0.0.1:1", "nats://t0ken@127.0.0.1:2"), caplog, monkeypatch)
    assert said and all("nats://alice:***@127.0.0.1:1,nats://***@127.0.0.1:2" in line for line in said), said
    assert not any("s3cret" in line or "t0ken" in line for line in said), said


async def _until(check: Any) -> None:
    while not check():
        await asyncio.sleep(0.05)
