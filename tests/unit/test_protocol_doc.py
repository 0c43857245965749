"""docs/protocol.md against the code: every frame type, SSE event name, command,
error code, close code, close label and documented default the code has must be
in the document. Reads files and imports modules; starts nothing."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from pathlib import Path

from gateway.disconnect import Disconnect

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "protocol.md"
# Where the node writes what clients see: the gateway and its transports.
SOURCES = sorted([*(ROOT / "gateway").glob("*.py"), *(ROOT / "gateway" / "transports").glob("*.py")])

# A literal name, as the code writes it ("..." or '...').
_NAME = r"""["'](\w+)["']"""

# Frame types the node builds: {"type": "x"}, _frame("x", ...), reply(frame, "x"), sse_event("x", ...).
FRAME_PATTERNS = (
    r"""["']type["']\s*:\s*""" + _NAME,
    r"\b_?frame\(\s*" + _NAME,
    r"\b_?reply\(\s*[\w.]+\s*,\s*" + _NAME,
    r"\bsse_event\(\s*" + _NAME,
)
# SSE event names written literally.
SSE_EVENT_PATTERNS = (r"\bsse_event\(\s*" + _NAME,)
# Error codes: CommandError("x"), _error(ref, "x"), error("x"), code="x", json_error(400, "x"),
# http_error(400, "x"), Refusal(400, BAD_REQUEST, "x"), refuse(400, "x"), NotReady("x", ...) (/readyz).
ERROR_PATTERNS = (
    r"\bCommandError\(\s*" + _NAME,
    r"\b_error\(\s*[\w.]+\s*,\s*" + _NAME,
    r"(?<![\w.])error\(\s*" + _NAME,
    r"\bcode\s*=\s*" + _NAME,
    r"\bjson_error\(\s*\d{3}\s*,\s*" + _NAME,
    r"\bhttp_error\(\s*\d{3}\s*,\s*" + _NAME,
    r"\bRefusal\(\s*\d{3}\s*,\s*[\w.]+\s*,\s*" + _NAME,
    r"\b_?refuse\(\s*\d{3}\s*,\s*" + _NAME,
    r"\bNotReady\(\s*" + _NAME,
)


def _source() -> str:
    return "\n".join(p.read_text() for p in SOURCES)


def _found(patterns: Iterable[str], text: str) -> set[str]:
    return {m for p in patterns for m in re.findall(p, text, re.S)}


def _doc() -> str:
    return DOC.read_text()


def _section(doc: str, title: str) -> str:
    """The text of the ``## <n>. <title>`` section, up to the next ``## ``."""
    match = re.search(rf"^## \d+\. {re.escape(title)}\n(.*?)(?=^## |\Z)", doc, re.M | re.S)
    assert match is not None, f"docs/protocol.md has no section '## <n>. {title}'"
    return match.group(1)


def _missing_json_types(doc: str, names: Iterable[str]) -> list[str]:
    """Names with no JSON example ``"type":"<name>"`` in the document."""
    return sorted(n for n in names if not re.search(rf'"type"\s*:\s*"{re.escape(n)}"', doc))


def _missing_words(text: str, names: Iterable[str]) -> list[str]:
    """Names not written as code (`name`) in ``text``."""
    return sorted(n for n in names if f"`{n}`" not in text)


def frame_types() -> set[str]:
    from broker.base import Kind

    return _found(FRAME_PATTERNS, _source()) | {k.value for k in Kind}


def command_names() -> set[str]:
    from gateway.commands import _HANDLERS

    return set(_HANDLERS)


def error_codes() -> set[str]:
    from gateway import command_route, metrics

    codes = _found(ERROR_PATTERNS, _source())
    codes |= set(command_route.STATUS) | set(metrics.API_RESULTS) | set(metrics.COMMAND_RESULTS)
    return codes - {"ok"}


def disconnects() -> list[Disconnect]:
    """Every Disconnect of gateway/disconnect.py: every close a client can get."""
    from gateway import disconnect

    return [v for v in vars(disconnect).values() if isinstance(v, Disconnect)]


def test_patterns_still_match_the_code() -> None:
    """A refactor that changes how frames or errors are written must not make
    the checks below vacuous: each collection still finds what it used to."""
    written = _found(FRAME_PATTERNS, _source())
    assert {"welcome", "message", "ack", "error", "presence", "pong", "reset", "close"} <= written, written
    assert {"close", "message"} <= _found(SSE_EVENT_PATTERNS, _source())
    assert len(command_names()) >= 7
    assert {"bad_frame", "bad_request", "forbidden", "node_full", "draining", "nats_unavailable"} <= error_codes()
    assert len(error_codes()) >= 18, sorted(error_codes())
    assert len({d.code for d in disconnects()}) >= 14


def test_every_frame_type_has_a_json_example() -> None:
    missing = _missing_json_types(_doc(), frame_types())
    assert not missing, f'frame types with no "type":"<x>" example in docs/protocol.md: {missing}'


def test_every_sse_event_name_is_shown() -> None:
    doc = _doc()
    names = _found(SSE_EVENT_PATTERNS, _source()) | {"welcome", "reset", "join", "leave"}
    missing = sorted(n for n in names if not re.search(rf"^event: {re.escape(n)}$", doc, re.M))
    assert not missing, f"SSE events not shown as 'event: <x>' in docs/protocol.md: {missing}"


def test_every_command_has_a_json_example() -> None:
    doc = _doc()
    missing = _missing_json_types(doc, command_names())
    assert not missing, f'commands with no "type":"<x>" example in docs/protocol.md: {missing}'
    section = _section(doc, "Commands")
    missing = sorted(n for n in command_names() if not re.search(rf"^###[^\n]*`{re.escape(n)}[ `]", section, re.M))
    assert not missing, f"commands with no '### ... `<x> ...`' subsection in the Commands section: {missing}"


def test_every_error_code_is_in_the_error_table() -> None:
    table = _section(_doc(), "Error codes")
    missing = sorted(c for c in error_codes() if not re.search(rf"^\|\s*`{re.escape(c)}`\s*\|", table, re.M))
    assert not missing, f"error codes with no row in the 'Error codes' table of docs/protocol.md: {missing}"


def test_every_command_api_status_is_documented() -> None:
    """Each code of command_route.STATUS appears with its status in the /api/command table."""
    from gateway.command_route import STATUS

    section = _section(_doc(), "Commands over HTTP: `POST /api/command`")
    rows = re.findall(r"^\|(.*)\|\s*(\d{3})\s*\|\s*$", section, re.M)
    documented = {code: int(status) for cells, status in rows for code in re.findall(r"`(\w+)`", cells)}
    wrong = sorted(f"{c}: code {s}, doc {documented.get(c)}" for c, s in STATUS.items() if documented.get(c) != s)
    assert not wrong, f"/api/command statuses missing or wrong in docs/protocol.md: {wrong}"


def test_every_close_code_and_label_is_in_the_close_table() -> None:
    table = _section(_doc(), "Close codes")
    documented = {int(c) for c in re.findall(r"^\|\s*\**`?(\d{4})`?\**\s*\|", table, re.M)}
    codes = {d.code for d in disconnects()}
    missing = sorted(codes - documented)
    assert not missing, f"close codes with no row in the 'Close codes' table of docs/protocol.md: {missing}"
    labels = {d.label for d in disconnects()}
    missing_labels = _missing_words(table, labels)
    assert not missing_labels, f"close labels missing from the 'Close codes' section: {missing_labels}"


def test_documented_defaults_match_the_settings() -> None:
    """Every table row `` | `section.key` | `<TOML value>` | `` states the key's real default."""
    from gateway.settings import Settings

    defaults = Settings()
    rows = re.findall(r"^\|\s*`(\w+)\.(\w+)`\s*\|\s*`([^`]+)`\s*\|", _doc(), re.M)
    checked, wrong = 0, []
    for section, key, literal in rows:
        group = getattr(defaults, section, None)
        if group is None or not hasattr(group, key):
            wrong.append(f"{section}.{key}: no such setting")
            continue
        default = getattr(group, key)
        value = tomllib.loads(f"v = {literal}")["v"]
        if (list(default) if isinstance(default, tuple) else default) != value:
            wrong.append(f"{section}.{key}: doc {literal}, code {default!r}")
        checked += 1
    assert not wrong, f"defaults in docs/protocol.md that are not the code's: {wrong}"
    assert checked >= 20, f"only {checked} documented defaults found: did the Limits table change form?"


def test_key_terms_are_covered() -> None:
    doc = _doc()
    for term in ("envelope=1", "Last-Event-ID", "/api/command", "`conn`", "`ref`", "since", "event: close"):
        assert term in doc, f"docs/protocol.md does not mention {term}"
