"""One timer per transport for what every open link needs now and then: a
WebSocket's heartbeat, an SSE stream's keep-alive, and both one's stall check.

The walk over the links is sliced, ``SLICE`` links per loop pass: each visit
may write to its socket (a ping, a keep-alive), and a node holding tens of
thousands of links held its loop, and every delivery waiting on it, for the
whole walk at once each period.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

L = TypeVar("L")

# Links visited per loop pass: a few hundred writes (about a millisecond
# here), and 20,000 links are walked in about 80 passes.
SLICE = 256


class Ticker(Generic[L]):
    """Every ``period`` seconds, ``visit(link, now)`` for each of ``links``
    (the transport's set of open links), while there are any."""

    __slots__ = ("_links", "_timer", "_visit", "_walking", "period")

    def __init__(self, period: float, links: set[L], visit: Callable[[L, float], None]) -> None:
        self.period = period
        self._links = links
        self._visit = visit
        self._timer: asyncio.TimerHandle | None = None
        self._walking = False

    def start(self) -> None:
        """Tick while there are links (a new link calls this)."""
        if self._timer is None and not self._walking:
            self._timer = asyncio.get_running_loop().call_later(self.period, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._links:
            self._walking = True
            self._walk(list(self._links), 0)

    def _walk(self, walk: list[L], start: int) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        links, visit = self._links, self._visit
        end = start + SLICE
        for link in walk[start:end]:
            if link in links:  # not closed since the walk began
                visit(link, now)
        if end < len(walk):
            loop.call_soon(self._walk, walk, end)
            return
        self._walking = False
        if links:
            self._timer = loop.call_later(self.period, self._tick)
