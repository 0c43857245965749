"""The live node instances: the keys of the ``<stream>_nodes`` bucket, one
per instance, refreshed by its node every ttl/3 and expiring after the ttl
(``broker.presence`` writes them). Listings are shared and kept for ttl/3:
every connect asks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection

from nats.js.kv import KeyValue

from .kv import live_keys
from .tasks import failure_read


class LiveInstances:
    """Which node instances are alive, as a recent listing of the bucket has them."""

    def __init__(self, instance: str, ttl: float) -> None:
        self.nodes: KeyValue | None = None  # the bucket, once bound (until then: this instance alone)
        self._instance = instance
        self._ttl = ttl
        self._cache: set[str] = set()
        self._listed_at = -1e9  # when the cached listing began (monotonic)
        self._refreshing: asyncio.Future[set[str]] | None = None
        self._refresh_began = -1e9
        # Instances seen in entries but absent from a listing begun after: gone
        # (ids are per process); until a later listing has them again.
        self._gone: set[str] = set()

    async def _list(self) -> set[str]:
        assert self.nodes is not None
        began = time.monotonic()
        alive = set(await live_keys(self.nodes, "*"))
        if began >= self._listed_at:  # listings may end out of order: the newest is kept
            self._cache, self._listed_at = alive, began
        self._gone -= alive
        return set(alive)

    async def alive(self, seen: Collection[str] = ()) -> set[str]:
        """Live instances (for checks on every connect): a listing begun at
        most ttl/3 ago — or after this call, when ``seen`` (the instances of
        entries read before it) names one the cached listing lacks: a node
        started since is not taken for a dead one."""
        if self.nodes is None:
            return {self._instance}
        now = time.monotonic()
        unknown = set(seen) - self._cache - self._gone
        if unknown:
            await self._listing(now)
            self._gone |= unknown - self._cache
        elif now - self._listed_at > self._ttl / 3:
            await self._listing(now - self._ttl / 3)
        return set(self._cache)

    async def alive_now(self) -> set[str]:
        """Live instances as a listing begun now has them: for a request that
        waits for every live node (the server API), where a node that stopped
        or started in the last ttl/3 would be miscounted by ``alive``."""
        if self.nodes is None:
            return {self._instance}
        await self._listing(time.monotonic())
        return set(self._cache)

    async def _listing(self, since: float) -> None:
        """Return once a listing of the live instances begun at or after
        ``since`` (monotonic) is done; raise if it fails. One listing at a
        time, shared by everyone asking meanwhile (a burst of connects or
        closes would otherwise start a KV listing, one consumer, each)."""
        while self._listed_at < since:
            refresh = self._refreshing
            if refresh is not None and not refresh.done() and self._refresh_began < since:
                await asyncio.wait([refresh])  # begun too early: the next one, once it is done
                continue
            if refresh is None or refresh.done():
                self._refresh_began = time.monotonic()
                refresh = self._refreshing = asyncio.ensure_future(self._list())
                # Those waiting for it without awaiting it (above) list again: none may read its failure.
                refresh.add_done_callback(failure_read)
            await asyncio.shield(refresh)
