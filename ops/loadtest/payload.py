"""Test messages: what publishers send and how receivers read it back cheaply.

A payload is ``{"s":<per-room sequence>,"t":<send time>,"p":"<padding>"}``.
Receivers pull ``s`` and ``t`` out with one regular-expression search (or,
failing that, ``bytes.find`` on the keys) and ``int``/``float`` on the slices,
never a JSON parse: at many thousand deliveries a second the generator's CPU
per message is what keeps it from being the bottleneck.
"""

from __future__ import annotations

import re

MIN_BYTES = 48  # room for {"s":…,"t":…,"p":""} with a large sequence number

# Our own layout, wherever it sits (e.g. inside Herald's {"type":"message",…,"data":…}).
_OURS = re.compile(rb'\{"s":(\d+),"t":([-+.\deE]+)')


def make(seq: int, sent: float, size: int) -> bytes:
    """A payload of exactly ``size`` bytes (or the minimum that holds the fields)."""
    head = b'{"s":%d,"t":%.6f,"p":"' % (seq, sent)
    return head + b"x" * max(0, size - len(head) - 2) + b'"}'


def extract(data: bytes) -> tuple[int, float] | None:
    """``(s, t)`` from a message that contains a payload; None if there is none."""
    m = _OURS.search(data)
    if m is not None:
        try:
            return int(m[1]), float(m[2])
        except ValueError:
            pass
    return _by_keys(data)


def _by_keys(data: bytes) -> tuple[int, float] | None:
    """Slow path for payloads a server re-serialised (keys reordered, spaces added)."""
    i = data.find(b'"s":')
    k = data.find(b'"t":')
    if i < 0 or k < 0:
        return None
    try:
        return int(_number(data, i + 4)), float(_number(data, k + 4))
    except ValueError:
        return None


def _number(data: bytes, start: int) -> bytes:
    """The JSON number starting at ``start``: up to the next ',' or '}'."""
    end = data.find(b",", start)
    value = data[start:end] if end >= 0 else b""
    if not value or b"}" in value:
        end = data.find(b"}", start)
        value = data[start:end]
    return value
