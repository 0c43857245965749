"""The lookup of live nodes behind the per-user connection count, with the KV
listing stubbed (the count across real nodes: tests/nats/test_user_connections.py)."""

from __future__ import annotations

from typing import Any

import pytest


async def test_a_burst_of_lookups_of_live_nodes_is_one_kv_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connects and closes ask which nodes are alive (cached ttl/3). When the
    cache is stale, a burst of them shares one lookup: a KV listing each (one
    consumer each) hit the server's "maximum consumers limit reached" when
    1,000 clients left at once, and those connections stayed counted."""
    import asyncio

    import broker.liveness
    from broker.liveness import LiveInstances

    listings = 0

    async def live_keys(kv: Any, pattern: str) -> list[str]:
        nonlocal listings
        listings += 1
        await asyncio.sleep(0.01)  # a round trip
        return ["n1-abc"]

    monkeypatch.setattr(broker.liveness, "live_keys", live_keys)
    live = LiveInstances("n1-abc", ttl=3.0)
    live.nodes = object()  # type: ignore[assignment]
    answers = await asyncio.gather(*(live.alive() for _ in range(200)))
    assert listings == 1
    assert all(a == {"n1-abc"} for a in answers)
    await live.alive()  # fresh: no lookup
    assert listings == 1
