"""Reference-counted interest in keys (channels), serialised per key.

The first ``want`` of a key acquires it (e.g. subscribes on NATS); the last
``unwant`` releases it, optionally after a delay so that a reconnect storm or a
page reload does not unsubscribe and resubscribe the same channel.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from .tasks import spawn

Action = Callable[[str], Awaitable[None]]


class _KeyLock:
    """One key's lock, and how many hold or await it: dropped from ``locks``
    when none do, so two callers can never end up with different locks for
    one key. An async context manager (a class, not a generator: it is
    entered on every first want and last unwant)."""

    __slots__ = ("key", "lock", "locks", "users")

    def __init__(self, locks: dict[str, _KeyLock], key: str) -> None:
        self.lock = asyncio.Lock()
        self.locks = locks
        self.key = key
        self.users = 0

    async def __aenter__(self) -> None:
        self.users += 1
        try:
            await self.lock.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self.lock.release()
        self._leave()

    def _leave(self) -> None:
        self.users -= 1
        if not self.users:
            del self.locks[self.key]


class Interest:
    """Owns each key's reference count and its one subscription (made on the first want, dropped after the last)."""

    __slots__ = ("_acquire", "_counts", "_delay", "_held", "_locks", "_release", "_tasks", "_timers")

    def __init__(self, acquire: Action, release: Action, release_delay: float = 0.0) -> None:
        self._acquire = acquire
        self._release = release
        self._delay = release_delay
        self._counts: dict[str, int] = {}
        self._held: set[str] = set()
        self._locks: dict[str, _KeyLock] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # Delayed releases in flight, referenced so they are not garbage collected.
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def held(self) -> int:
        return len(self._held)

    def count(self, key: str) -> int:
        return self._counts.get(key, 0)

    def keys(self) -> list[str]:
        return list(self._held)

    def _serialised(self, key: str) -> _KeyLock:
        """The key's lock, to hold while acquiring or releasing it."""
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = _KeyLock(self._locks, key)
        return entry

    async def want(self, key: str) -> None:
        if key in self._held and key not in self._locks:
            # Held, nothing under way for it: counting in does not wait, so needs no lock.
            self._count_in(key)
            return
        async with self._serialised(key):
            self._count_in(key)
            if key not in self._held:
                try:
                    await self._acquire(key)
                except BaseException:
                    self._decrement(key)
                    raise
                self._held.add(key)

    def _count_in(self, key: str) -> None:
        self._counts[key] = self._counts.get(key, 0) + 1
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    async def unwant(self, key: str) -> None:
        count = self._counts.get(key, 0)
        if count > 1 and key not in self._locks:  # not the last: nothing to wait for
            self._counts[key] = count - 1
            return
        async with self._serialised(key):
            if self._decrement(key) or key not in self._held:
                return
            if self._delay > 0:
                loop = asyncio.get_running_loop()
                self._timers[key] = loop.call_later(self._delay, self._release_later, key)
                return
            await self._release_now(key)

    def _decrement(self, key: str) -> int:
        left = self._counts.get(key, 0) - 1
        if left > 0:
            self._counts[key] = left
            return left
        self._counts.pop(key, None)
        return 0

    def _release_later(self, key: str) -> None:
        self._timers.pop(key, None)
        spawn(self._tasks, self._release_if_unwanted(key))

    async def _release_if_unwanted(self, key: str) -> None:
        async with self._serialised(key):
            if key in self._counts or key not in self._held:
                return
            await self._release_now(key)

    async def _release_now(self, key: str) -> None:
        self._held.discard(key)
        await self._release(key)

    async def release_all(self) -> None:
        """Cancel delayed releases and release everything held (shutdown)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for key in list(self._held):
            await self._release_now(key)
        self._counts.clear()
