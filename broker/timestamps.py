"""Fast parsing of the RFC 3339 timestamps JetStream puts in Nats-Time-Stamp."""

from __future__ import annotations

import re
from datetime import UTC, datetime

_STAMP = re.compile(r"([^.Zz+-]+(?:-\d\d-\d\d[Tt ][^.Zz+-]+)?)(?:\.(\d+))?([Zz]|[+-]\d\d:?\d\d)?")
_second_cache: dict[str, float] = {}


def parse_rfc3339(text: str) -> float:
    """``2026-11-23T17:12:22.123456789Z`` → unix seconds (float).

    Fractions of any length (JetStream sends nanoseconds) and explicit offsets
    are honoured. The whole-second part is cached: consecutive messages share
    it, and ``datetime`` parsing is the expensive bit.
    """
    match = _STAMP.fullmatch(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    base, digits, offset = match.groups()
    key = base + (offset or "")
    seconds = _second_cache.get(key)
    if seconds is None:
        parsed = datetime.fromisoformat(base + ("+00:00" if offset in (None, "Z", "z") else offset))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        seconds = parsed.timestamp()
        if len(_second_cache) > 1024:
            _second_cache.clear()
        _second_cache[key] = seconds
    return seconds + (int(digits) / 10 ** len(digits) if digits else 0.0)
