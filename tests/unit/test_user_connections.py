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


async def test_a_shared_listing_that_fails_after_its_starter_left_leaves_no_unread_failure(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A listing shared by a burst is awaited (shielded) by the lookup that
    started it; one asked later waits for it to end, then lists again. When
    the starter had gone (its client left, the node was stopping) and the
    listing failed (NATS gone), nobody read the failure: asyncio logged
    "Task exception was never retrieved" once the listing was collected."""
    import asyncio
    import gc
    import logging

    import broker.liveness
    from broker import BrokerUnavailable
    from broker.liveness import LiveInstances

    async def live_keys(kv: Any, pattern: str) -> list[str]:
        await asyncio.sleep(0.05)
        raise BrokerUnavailable("NATS is not connected")

    monkeypatch.setattr(broker.liveness, "live_keys", live_keys)
    live = LiveInstances("n1-abc", ttl=3.0)
    live.nodes = object()  # type: ignore[assignment]
    starter = asyncio.ensure_future(live.alive_now())
    await asyncio.sleep(0.01)
    later = asyncio.ensure_future(live.alive_now())  # asked after the listing began: waits for it, then lists
    await asyncio.sleep(0.01)
    starter.cancel()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        with pytest.raises(BrokerUnavailable):
            await later  # its own listing's failure, read by it
        del starter, later, live
        gc.collect()
    assert not [r.getMessage() for r in caplog.records if r.name == "asyncio"]


class SlowCountOut:
    """The memory broker's per-user count, with count-outs that land 0.3 s
    after ``close`` — as a KV write behind a busy node or a listing may."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.tasks: set[Any] = set()

    async def open(self, user: str, conn: str, limit: int, close_oldest: bool, replaces: str | None = None) -> None:
        await self.inner.open(user, conn, limit, close_oldest, replaces)

    def close(self, user: str, conn: str) -> Any:
        import asyncio

        from broker.tasks import spawn

        async def later() -> None:
            await asyncio.sleep(0.3)
            self.inner.close(user, conn)

        return spawn(self.tasks, later())

    async def settle(self, timeout: float, counting: Any = None) -> None:
        import asyncio

        waited = set(self.tasks) if counting is None else set(counting)
        if waited:
            await asyncio.wait(waited, timeout=timeout)

    def counted(self, user: str) -> int:
        return len(self.inner._conns.get(user, ()))


async def slow_node(write_delay: float = 0.0) -> tuple[Any, SlowCountOut]:
    from broker import BrokerEvents

    from ..helpers import make_settings, start_node
    from ..memory_broker import MemoryBroker

    made: list[SlowCountOut] = []

    def factory(events: BrokerEvents) -> MemoryBroker:
        broker = MemoryBroker(events)
        made.append(SlowCountOut(broker.connections))
        broker.connections = made[0]  # type: ignore[assignment]
        return broker

    settings = make_settings(
        limits={"max_connections_per_user": 1},
        http={"reconnect_spread": 0.0},
        # With a write delay, a burst of 40 overflows a queue: 4008.
        backpressure={"max_messages": 20, "write_delay": write_delay},
    )
    return await start_node(settings, factory), made[0]


@pytest.mark.parametrize("how", ["server api", "drain", "slow consumer", "token expired"])
async def test_a_connection_told_to_reconnect_is_counted_out_first(how: str) -> None:
    """When a client is told to come back (POST /api/disconnect: 4009; a
    drain: 1012; a slow consumer: 4008, at once; a token expired: 4001, with a
    new one), its connection no longer counts for its user: back at
    once, on this node or another, it is not refused (4029 / 429) for the
    one being closed. Counted out only once the close was over, users at
    their limit were refused when a count-out was slower than the reconnect."""
    import asyncio

    import aiohttp

    from ..helpers import ADMIN_KEY, PUBLISH_HEADERS, expect_close, recv_json, token

    node, counts = await slow_node(write_delay=0.3 if how == "slow consumer" else 0.0)
    try:
        async with aiohttp.ClientSession() as http:
            # Whole seconds from a whole second (mint_token): 2 is valid 1 to 2 s from now, 1.5 was 0 to 1.
            ttl = 2 if how == "token expired" else 3600
            ws = await http.ws_connect(node.ws_url, params={"token": token("kim", ttl=ttl)})
            assert (await recv_json(ws))["type"] == "welcome"
            if how == "drain":
                shutdown = asyncio.create_task(node.node.shutdown())
                code, _ = await expect_close(ws)
                assert (code, counts.counted("kim")) == (1012, 0)
                await shutdown
                return
            if how == "slow consumer":
                batch = [{"channel": "user:kim", "data": i} for i in range(40)]
                async with http.post(node.url + "/api/publish", json=batch, headers=PUBLISH_HEADERS) as answer:
                    assert answer.status == 200
                code, _ = await expect_close(ws)
                assert (code, counts.counted("kim")) == (4008, 0)
            elif how == "token expired":
                code, _ = await expect_close(ws, timeout=5)
                assert (code, counts.counted("kim")) == (4001, 0)
            else:
                headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
                async with http.post(node.url + "/api/disconnect", json={"user": "kim"}, headers=headers) as answer:
                    assert (await answer.json())["disconnected"] == 1
                code, _ = await expect_close(ws)
                assert (code, counts.counted("kim")) == (4009, 0)
            again = await http.ws_connect(node.ws_url, params={"token": token("kim")})
            assert (await recv_json(again))["type"] == "welcome"
            await again.close()
    finally:
        await node.stop()


async def test_count_outs_given_up_in_a_burst_log_one_error(caplog: pytest.LogCaptureFixture) -> None:
    """A node that cannot count its closed connections out (NATS away, or too
    busy to be answered) says so once per interval, with a count: a storm's
    10,000 users gone at once logged one ERROR line each (499 in 24 s)."""
    import asyncio
    import logging

    from broker.connections import KvConnections
    from broker.link import NatsLink

    async def alive(_: Any) -> set[str]:
        return {"n1"}

    # No bucket bound (NATS away): every update fails.
    connections = KvConnections(NatsLink(), "S", "n1", alive, lambda conn, why: None)
    with caplog.at_level(logging.ERROR, logger="herald.connections"):
        await asyncio.gather(*(connections._count_out(f"u{i}", f"n1:{i}", attempts=1) for i in range(30)))
    given_up = [r for r in caplog.records if r.name == "herald.connections" and r.levelno == logging.ERROR]
    assert len(given_up) == 1, [r.getMessage() for r in given_up]


async def test_a_second_shutdown_does_not_wait_the_grace_again_for_the_same_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run loop drains the node, then aiohttp's on_shutdown asks again:
    connections still closing after the grace were waited for a second
    grace (two "did not close within the grace" lines, 1 s apart)."""
    import time

    import aiohttp

    from ..helpers import make_settings, recv_json, start_node, token
    from ..memory_broker import MemoryBroker

    node = await start_node(make_settings(http={"drain_delay": 0.0, "shutdown_grace": 0.5}), MemoryBroker)
    try:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(node.ws_url, params={"token": token("kim")})
            assert (await recv_json(ws))["type"] == "welcome"
            (session,) = node.node.sessions
            monkeypatch.setattr(type(session.transport), "close", lambda self, reason: None)  # never ends
            started = time.monotonic()
            await node.node.shutdown()
            first = time.monotonic() - started
            await node.node.shutdown()
            second = time.monotonic() - started - first
            assert first >= 0.45 and second < 0.1, (first, second)
            monkeypatch.undo()
            session.transport.close(session.disconnect)  # the close it was told, done now
            await ws.close()
    finally:
        await node.stop()


def test_a_restarted_node_does_not_hand_out_its_predecessors_conn_ids() -> None:
    """A client names the stream it gave up (``replaces=<conn>``), maybe one
    of a node that has restarted since, with the same node id: if the new
    process numbered its connections from 1 again, that conn could be another
    tab of the same user now, which the reconnect would close."""
    from gateway.sessions import Sessions

    before, after = (Sessions("node-1", *(Any,) * 3) for _ in range(2))  # the other parts are not used
    first = {before.new_id() for _ in range(1000)}
    assert not first & {after.new_id() for _ in range(1000)}
    assert all(conn.rpartition(":")[0] == "node-1" for conn in first)  # the node is still what it names
