"""One request answers every caller that asked before it was sent (or,
where a slightly older answer will do, every caller of a short while)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from .tasks import spawn

T = TypeVar("T")


class Fresh(Generic[T]):
    """Calls ``ask`` on behalf of many callers, each answered by a call sent
    *after* it asked (so the answer is at least as new as the moment it
    asked), with at most one call in flight and one queued: a burst of N
    callers costs two calls, not N."""

    def __init__(self, ask: Callable[[], Awaitable[T]]) -> None:
        self._ask = ask
        self._in_flight: asyncio.Future[T] | None = None
        self._queued: asyncio.Future[T] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._last: tuple[float, T] | None = None  # when the last answer came, and it

    async def recent(self, max_age: float) -> T:
        """An answer that came at most ``max_age`` seconds ago (before this
        call), else a new one as ``get`` (always, for ``max_age`` 0)."""
        last = self._last
        if max_age > 0 and last is not None and time.monotonic() - last[0] <= max_age:
            return last[1]
        return await self.get()

    async def get(self) -> T:
        queued = self._queued
        if queued is None:
            queued = self._queued = asyncio.get_running_loop().create_future()
            spawn(self._tasks, self._send(queued)).add_done_callback(functools.partial(self._ended, queued))
        return await asyncio.shield(queued)

    def _ended(self, answer: asyncio.Future[T], _: asyncio.Task[None]) -> None:
        """A send's task ended. Cancelled before its call went out (waiting
        for the one in flight, or before it even started), its answer would
        stay pending: its waiters get the cancel, later callers a new call."""
        if self._queued is answer:
            self._queued = None
        answer.cancel()  # nothing if answered

    async def _send(self, answer: asyncio.Future[T]) -> None:
        previous = self._in_flight
        if previous is not None:
            await asyncio.wait([previous])  # one call at a time: this one goes once that is back
        self._queued = None  # callers from now on wait for the next call
        self._in_flight = answer
        try:
            result = await self._ask()
            self._last = time.monotonic(), result
            answer.set_result(result)
        except Exception as exc:  # noqa: BLE001 - every waiter gets the failure
            answer.set_exception(exc)
            answer.exception()  # retrieved: no warning when every waiter has gone
        finally:
            if self._in_flight is answer:
                self._in_flight = None
