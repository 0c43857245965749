"""Wire encodings. A delivery is encoded once per transport per node and the
same bytes are queued to every recipient on that transport."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any, Protocol

import orjson

from broker import Delivery, Kind
from broker.channels import channel_id, client_name

_SSE_LINES = re.compile(rb"\r\n|\r|\n")
# orjson reads integers past 64 bits as floats: a document with that many digits
# in a row is read again, exactly, by the standard library (rare, so slow is fine).
# Found by blanking all but digits (a regex takes ~10 times as long: ~1 µs per
# 100 bytes, on every publish and client frame).
_DIGITS_ONLY = bytes(0x30 if 0x30 <= c <= 0x39 else 0x20 for c in range(256))
_LONG_DIGITS = b"0" * 19


# In a JSON text, from left to right: an escaped backslash, a surrogate pair's escapes, a lone surrogate's
# escape (6 bytes). An escaped backslash is taken whole: in "\\ud800" (a backslash, then text) nothing is.
_SURROGATE_ESCAPES = re.compile(
    rb"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|\\u[dD][89a-fA-F][0-9a-fA-F]{2}"
)


def _mend(escape: re.Match[bytes]) -> bytes:
    return b"\\ufffd" if len(escape[0]) == 6 else escape[0]


def without_lone_surrogates(raw: bytes) -> bytes | None:
    """``raw`` with every lone surrogate escape (an unpaired ``\\ud800``:
    JSON's grammar allows it, but it is no Unicode text, and orjson refuses
    it) made ``\\ufffd``, the rest byte for byte; None if it has none."""
    if b"\\u" not in raw:
        return None
    mended = _SURROGATE_ESCAPES.sub(_mend, raw)
    return None if mended == raw else mended


def loads_exact(raw: bytes | str) -> Any:
    """A client's or publisher's JSON, numbers kept as they were written; a
    lone surrogate escape in a string is read as U+FFFD."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        mended = without_lone_surrogates(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
        if mended is None:
            raise
        raw = mended
        doc = orjson.loads(raw)  # raises orjson.JSONDecodeError
    if _LONG_DIGITS in (raw.encode() if isinstance(raw, str) else raw).translate(_DIGITS_ONLY):
        with contextlib.suppress(RecursionError):  # deeper than the stdlib goes: orjson's reading stands
            doc = json.loads(raw)
    return doc


# Deepest JSON a client's data may be (orjson writes 255 levels; deeper goes
# through the stdlib, whose recursion would otherwise depend on the stack).
MAX_DEPTH = 512


class TooDeep(ValueError):
    """JSON nested deeper than ``MAX_DEPTH``."""


def dumps_exact(obj: Any) -> bytes:
    """``obj`` as compact JSON; integers orjson cannot hold, and nesting past
    its 255 levels, go through the stdlib (raises TooDeep past MAX_DEPTH)."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:
        if _depth(obj) > MAX_DEPTH:
            raise TooDeep(f"JSON nested deeper than {MAX_DEPTH} levels") from None
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _depth(obj: Any) -> int:
    """How deep ``obj``'s lists and objects nest (no recursion)."""
    deepest, level = 0, [(obj, 1)]
    while level:
        item, depth = level.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            level.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """An unmasked, final WebSocket frame (server → client)."""
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        header = bytes((first, n))
    elif n < 65536:
        header = bytes((first, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((first, 127)) + n.to_bytes(8, "big")
    return header + payload


def json_data(payload: bytes) -> bytes:
    """``payload`` if it is JSON (embedded as is, but for a lone surrogate
    escape, made U+FFFD: no client's parser need take one), else a JSON
    string of it."""
    try:
        orjson.loads(payload)
    except orjson.JSONDecodeError:
        mended = without_lone_surrogates(payload)
        if mended is not None:
            with contextlib.suppress(orjson.JSONDecodeError):
                orjson.loads(mended)
                return mended
        return orjson.dumps(payload.decode("utf-8", "replace"))
    return payload


def message_json(d: Delivery) -> bytes:
    head = {"type": "message", "channel": client_name(d.channel)}
    if d.seq:
        head["id"] = str(d.seq)
    head["event"] = d.event
    if d.sender is not None:
        head["from"] = d.sender
    # Splice the payload in without re-serialising it.
    return orjson.dumps(head)[:-1] + b',"data":' + json_data(d.payload) + b"}"


def history_messages(page: list[Delivery]) -> list[orjson.Fragment]:
    """A page of history as the ``message`` frames a live client gets,
    embedded as they are encoded (no payload is parsed again)."""
    return [orjson.Fragment(message_json(d)) for d in page]


def presence_json(d: Delivery) -> bytes:
    """A join / leave announcement (payload: the user)."""
    return orjson.dumps(
        {"type": d.kind.value, "room": channel_id(d.channel), "user": d.payload.decode("utf-8", "replace")}
    )


def sse_event(event: str, data: bytes, event_id: int = 0) -> bytes:
    parts = [b"id: %d\n" % event_id] if event_id else []
    parts.append(b"event: " + event.encode() + b"\n")
    for line in _SSE_LINES.split(data):
        parts.append(b"data: " + line + b"\n")
    parts.append(b"\n")
    return b"".join(parts)


class Codec(Protocol):
    """How one transport turns deliveries and control objects into bytes."""

    def message(self, d: Delivery) -> bytes: ...

    def control(self, obj: dict[str, Any]) -> bytes: ...

    def resume_point(self, seq: int) -> bytes | None:
        """What tells the client, silently, where it resumes from if it has
        received no message since (None: the welcome's position says it)."""


class WsCodec:
    """Deliveries and control objects as WebSocket text frames."""

    def message(self, d: Delivery) -> bytes:
        if d.kind is not Kind.MESSAGE:
            return ws_frame(presence_json(d))
        return ws_frame(message_json(d))

    def control(self, obj: dict[str, Any]) -> bytes:
        return ws_frame(orjson.dumps(obj))

    def resume_point(self, seq: int) -> bytes | None:
        return None


class SseCodec:
    """Deliveries and control objects as SSE events: a message's event name is
    the one it was published with and its data the bare payload; a control
    frame's event name is its ``type`` and its data the frame's JSON."""

    def message(self, d: Delivery) -> bytes:
        if d.kind is not Kind.MESSAGE:
            return sse_event(d.kind.value, presence_json(d))
        data = d.payload
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            data = data.decode("utf-8", "replace").encode()
        return sse_event(d.event, data, d.seq)

    def control(self, obj: dict[str, Any]) -> bytes:
        return sse_event(str(obj.get("type", "message")), orjson.dumps(obj))

    def resume_point(self, seq: int) -> bytes | None:
        # An id with no data fires no event but sets the EventSource's
        # Last-Event-ID (WHATWG: it is set before an empty event is dropped):
        # a plain EventSource cut before its first stored message resumes from
        # here, and loses nothing published meanwhile.
        return b"id: %d\n\n" % seq


class SseEnvelopeCodec(SseCodec):
    """SSE with ``envelope=1``: every event's name is the frame's ``type`` and
    its data the JSON frame a WebSocket client gets, so one EventSource can
    tell channels apart."""

    def message(self, d: Delivery) -> bytes:
        if d.kind is not Kind.MESSAGE:
            return sse_event(d.kind.value, presence_json(d))
        return sse_event("message", message_json(d), d.seq)


WS = WsCodec()
SSE = SseCodec()
SSE_ENVELOPE = SseEnvelopeCodec()
