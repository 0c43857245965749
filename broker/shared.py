"""One stream read for every replay that needs the same one at about the same time.

When a room's members resume together (a node drained, a network blip),
each asks for the room's messages after the same position. Read once per
member, a big room meant as many JetStream consumers at once, and the reads
timed out. A read of some subjects after a position is shared with any
caller whose ``reach`` (per subject, the last sequence the leader named
before the call; see store.py) the read covers — one started with a reach at
least as far — while it runs and for ``linger`` seconds after: covering the
reach is all a replay needs of a read, whoever started it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")

# How long a finished read still answers callers it covers: a reconnect storm
# spreads its resumes over a moment (clients reconnect after random delays).
LINGER = 1.0


class SharedReads(Generic[T]):
    """Reads by key (what is read: subjects and position), shared while they
    run and for ``linger`` seconds after."""

    def __init__(self, linger: float = LINGER) -> None:
        self._linger = linger
        self._reads: dict[Hashable, tuple[dict[str, int], asyncio.Future[T]]] = {}

    def __len__(self) -> int:
        return len(self._reads)

    async def read(self, key: Hashable, reach: Mapping[str, int], start: Callable[[], Awaitable[T]]) -> T:
        """The result of a read of ``key`` that covers ``reach``: one under
        way (or just done), else a new one, ``start()``, which later callers share."""
        kept = self._reads.get(key)
        if kept is not None and _covers(kept[0], reach) and not _failed(kept[1]):
            return await asyncio.shield(kept[1])
        future = asyncio.ensure_future(start())
        entry = (dict(reach), future)
        self._reads[key] = entry
        future.add_done_callback(lambda done: self._done(key, entry, done))
        return await asyncio.shield(future)

    def _done(self, key: Hashable, entry: tuple[dict[str, int], asyncio.Future[T]], future: asyncio.Future[T]) -> None:
        if future.cancelled() or future.exception() is not None:  # retrieved: every caller got it
            self._forget(key, entry)
        else:
            asyncio.get_running_loop().call_later(self._linger, self._forget, key, entry)

    def _forget(self, key: Hashable, entry: tuple[dict[str, int], asyncio.Future[T]]) -> None:
        if self._reads.get(key) is entry:  # not replaced by a newer read meanwhile
            del self._reads[key]


def _covers(read: Mapping[str, int], reach: Mapping[str, int]) -> bool:
    return all(read.get(subject, 0) >= seq for subject, seq in reach.items())


def _failed(future: asyncio.Future[T]) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)
