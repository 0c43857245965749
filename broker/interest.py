"""Reference-counted interest in keys (channels).

The first ``want`` of a key acquires it (e.g. subscribes on NATS); the last
``unwant`` releases it, optionally after a delay so that a reconnect storm or a
page reload does not unsubscribe and resubscribe the same channel. Acquiring
and releasing are synchronous (a SUB or UNSUB queued for this loop pass's
write), so nothing interleaves with them: no per-key lock, no task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

Action = Callable[[str], None]


class Interest:
    """Owns each key's reference count and its one subscription (made on the first want, dropped after the last)."""

    __slots__ = ("_acquire", "_counts", "_delay", "_held", "_release", "_timers")

    def __init__(self, acquire: Action, release: Action, release_delay: float = 0.0) -> None:
        self._acquire = acquire
        self._release = release
        self._delay = release_delay
        self._counts: dict[str, int] = {}
        self._held: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}

    @property
    def held(self) -> int:
        return len(self._held)

    def count(self, key: str) -> int:
        return self._counts.get(key, 0)

    def keys(self) -> list[str]:
        return list(self._held)

    def want(self, key: str) -> None:
        """Count ``key`` in, acquiring it if not held; if that raises, the count is not taken."""
        if key not in self._held:
            self._acquire(key)
            self._held.add(key)
        self._counts[key] = self._counts.get(key, 0) + 1
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def unwant(self, key: str) -> None:
        left = self._counts.get(key, 0) - 1
        if left > 0:
            self._counts[key] = left
            return
        if self._counts.pop(key, None) is None or key not in self._held:
            return  # unbalanced: nothing to release
        if self._delay > 0:
            self._timers[key] = asyncio.get_running_loop().call_later(self._delay, self._release_if_unwanted, key)
        else:
            self._release_now(key)

    def _release_if_unwanted(self, key: str) -> None:
        self._timers.pop(key, None)
        if key not in self._counts and key in self._held:
            self._release_now(key)

    def _release_now(self, key: str) -> None:
        self._held.discard(key)
        self._release(key)

    def release_all(self) -> None:
        """Cancel delayed releases and release everything held (shutdown)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for key in list(self._held):
            self._release_now(key)
        self._counts.clear()
