"""Warnings that can repeat per connection or per request (a NATS outage, a
flood of bad tokens) are logged at most once per interval per key, with a
count of the rest: a log is not a place to drown in."""

from __future__ import annotations

import logging
import time


class Throttle:
    """At most one log line per ``interval`` per key, with a count of the rest."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, level: int = logging.WARNING) -> None:
        self._log = logger
        self._interval = interval
        self._level = level
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last, skipped = self._last.get(key, (0.0, 0))
        if now - last < self._interval:
            self._last[key] = (last, skipped + 1)
            return
        self._last[key] = (now, 0)
        self._log.log(self._level, message + (f" ({skipped} more suppressed)" if skipped else ""), *args)
