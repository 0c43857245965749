"""Fast parsing of the RFC 3339 timestamps JetStream puts in Nats-Time-Stamp."""

from __future__ import annotations

from datetime import UTC, datetime

_second_cache: dict[str, float] = {}


def parse_rfc3339(text: str) -> float:
    """``2026-11-23T17:12:22.123456789Z`` → unix seconds (float).

    The whole-second part is cached: consecutive messages share it, and
    ``datetime`` parsing is the expensive bit.
    """
    base, dot, rest = text.partition(".")
    if dot:
        digits = rest.rstrip("Z")
        offset = rest[len(digits) :]
        fraction = float("0." + digits) if digits.isdigit() else 0.0
    else:
        base = text.rstrip("Z")
        offset = text[len(base) :]
        fraction = 0.0
    key = base + offset
    seconds = _second_cache.get(key)
    if seconds is None:
        parsed = datetime.fromisoformat(base + (offset or "Z"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        seconds = parsed.timestamp()
        if len(_second_cache) > 1024:
            _second_cache.clear()
        _second_cache[key] = seconds
    return seconds + fraction
