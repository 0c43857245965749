"""NATS goes away and comes back: the node reports it (readyz, publish API),
keeps its clients, and recovers by itself. (A node that cannot reach NATS at
all fails its start quickly with a message naming the URL: tests/unit/test_nats_outage.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from broker import BrokerUnavailable
from broker.channels import room_channel
from broker.embedded import NatsServer, free_port

from ..helpers import (
    PUBLISH_HEADERS,
    RawWsClient,
    RunningNode,
    SseClient,
    expect_close,
    make_settings,
    recv_json,
    scrape,
    start_node,
    token,
    wait_for,
)

# Every request in this file is bounded: a hang is a failure, not a stuck run.
SHORT = aiohttp.ClientTimeout(total=3)


async def get_status(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url, timeout=SHORT) as resp:
        return resp.status, await resp.json(content_type=None)


async def publish(http: aiohttp.ClientSession, node: RunningNode, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(node.url + "/api/publish", json=body, headers=PUBLISH_HEADERS, timeout=SHORT) as resp:
        return resp.status, await resp.json(content_type=None)


async def status_is(http: aiohttp.ClientSession, url: str, status: int) -> bool:
    try:
        return (await get_status(http, url))[0] == status
    except (aiohttp.ClientError, TimeoutError):
        return False


async def subscribed(node: RunningNode, count: int) -> None:
    await wait_for(lambda: node.node.broker.stats().subscriptions >= count)
    await asyncio.sleep(0.05)  # one round trip for the SUB to reach the server


@pytest.mark.parametrize("storage", ["file", "memory"])
async def test_node_survives_nats_outage_and_recovers(
    storage: str, own_nats: NatsServer, node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    node: RunningNode = await node_factory(
        nats_url=own_nats.url, nats={"reconnect_wait": 0.2}, stream={"storage": storage}
    )
    readyz, healthz = node.url + "/readyz", node.url + "/healthz"
    assert await get_status(http, readyz) == (200, {"status": "ready"})

    ws = await http.ws_connect(node.ws_url, params=[("token", token("alice")), ("room", "lobby")])
    assert (await recv_json(ws))["type"] == "welcome"
    sse_resp = await http.get(node.url + "/sse", params=[("token", token("bob")), ("room", "lobby")])
    assert sse_resp.status == 200
    sse = SseClient(sse_resp)
    await subscribed(node, 3)  # user:alice, user:bob, room:lobby
    status, before = await publish(http, node, {"channel": "room:lobby", "data": {"n": 0}})
    assert status == 200
    assert (await recv_json(ws))["id"] == before["id"]
    assert (await sse.next()).id == before["id"]

    # --- outage ---------------------------------------------------------------
    own_nats.stop()
    await wait_for(lambda: status_is(http, readyz, 503), timeout=5)
    status, body = await get_status(http, readyz)
    assert status == 503
    assert body["error"] == "nats_unavailable" and body["message"]

    started = time.monotonic()
    status, body = await publish(http, node, {"channel": "room:lobby", "data": {"n": 1}})
    assert status == 503, body
    assert body["error"] == "unavailable" and "NATS" in body["message"]
    assert time.monotonic() - started < 2.0, "publish must fail fast while NATS is down, not wait for it"

    assert await get_status(http, healthz) == (200, {"status": "ok"})
    metrics = await scrape(http, node.url)
    assert metrics["herald_nats_connected"] == 0
    # Clients are kept: the WS still answers, the SSE stream is still open.
    await ws.send_json({"type": "ping", "ref": "during"})
    assert await recv_json(ws) == {"type": "pong", "ref": "during"}
    assert not ws.closed
    assert not sse.ended and not sse_resp.content.at_eof()
    assert len(node.node.sessions) == 2

    # --- recovery: same port, same store ---------------------------------------
    own_nats.start()
    await wait_for(lambda: status_is(http, readyz, 200), timeout=10)
    metrics = await scrape(http, node.url)
    assert metrics["herald_nats_reconnects_total"] >= 1
    assert metrics["herald_nats_connected"] == 1

    # The subscriptions held before the outage were restored: the clients that
    # stayed connected receive what is published now.
    status, after = await publish(http, node, {"channel": "room:lobby", "event": "back", "data": {"n": 2}})
    assert status == 200, after
    assert int(after["id"]) >= 1
    frame = await recv_json(ws)
    if storage == "memory":
        # The stream started over, so ids before the outage mean nothing now:
        # the client is told (a reset) before anything of the new stream.
        resets = set()
        while frame["type"] == "reset":
            resets.add(frame["channel"])
            frame = await recv_json(ws)
        assert resets == {"user", "broadcast", "room:lobby"}
    assert (frame["channel"], frame["event"], frame["data"], frame["id"]) == (
        "room:lobby",
        "back",
        {"n": 2},
        after["id"],
    )
    ev = await sse.next()
    if storage == "memory":
        assert ev.event == "reset", ev
        while ev.event == "reset":
            ev = await sse.next()
    assert (ev.event, ev.json(), ev.id) == ("back", {"n": 2}, after["id"])
    if storage == "file":
        # The stream survived on disk: the sequence continues.
        assert int(after["id"]) > int(before["id"])
    await ws.close()
    sse_resp.close()


async def test_a_subscribe_answered_unavailable_leaves_the_room_unjoined(
    own_nats: NatsServer, node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """The client is told the subscribe failed: it must not be in the room
    anyway (its messages would come once NATS is back, to a client that does
    not count itself in the room)."""
    node: RunningNode = await node_factory(nats_url=own_nats.url, nats={"reconnect_wait": 0.2})
    ws = await http.ws_connect(node.ws_url, params=[("token", token("alice"))])
    assert (await recv_json(ws))["type"] == "welcome"
    own_nats.stop()
    await wait_for(lambda: status_is(http, node.url + "/readyz", 503), timeout=5)
    await ws.send_json({"type": "subscribe", "room": "late", "ref": "s"})
    answer = await recv_json(ws, timeout=15)
    assert (answer["type"], answer["code"]) == ("error", "unavailable"), answer
    (session,) = node.node.sessions
    assert room_channel("late") not in session.channels
    own_nats.start()
    await wait_for(lambda: status_is(http, node.url + "/readyz", 200), timeout=10)
    status, _ = await publish(http, node, {"channel": "room:late", "data": 1})
    assert status == 200
    await ws.send_json({"type": "ping", "ref": "p"})
    frames = [await recv_json(ws)]
    while frames[-1]["type"] != "pong":
        frames.append(await recv_json(ws))
    with contextlib.suppress(TimeoutError):
        while True:
            frames.append(await recv_json(ws, timeout=0.5))
    # The store was memory: resets of the channels it held, nothing of the room.
    assert [f for f in frames if f["type"] not in ("reset", "pong")] == []
    assert session.channels == {"user:alice", "broadcast"}
    await ws.close()


async def test_readyz_not_ready_until_stream_restored(
    own_nats: NatsServer, node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    # Memory storage: a restarted server has lost the stream and the node must
    # recreate it. /readyz promises "NATS connected and the stream ready", so
    # the first 200 after the restart must mean a publish now succeeds.
    node: RunningNode = await node_factory(nats_url=own_nats.url, nats={"reconnect_wait": 0.2})
    readyz = node.url + "/readyz"
    for cycle in range(3):
        own_nats.stop()
        await wait_for(lambda: status_is(http, readyz, 503), timeout=5, interval=0)
        own_nats.start()
        await wait_for(lambda: status_is(http, readyz, 200), timeout=10, interval=0)
        status, body = await publish(http, node, {"channel": "room:lobby", "data": {"cycle": cycle}})
        assert status == 200, f"/readyz said ready, publish said {status} {body}"


async def test_a_channel_dropped_during_an_outage_leaves_no_subscription_behind(
    tmp_path: Any, http: aiohttp.ClientSession
) -> None:
    """A SUB written while NATS is away waits in the client's buffer and goes
    out after the reconnect: the UNSUB for it must follow it, or the server
    keeps sending the node a channel nobody wants."""
    server = NatsServer(port=free_port(), store_dir=str(tmp_path / "js"), monitor_port=free_port())
    server.start()
    try:
        node = await start_node(make_settings(server.url, nats={"reconnect_wait": 0.2}))
        try:
            broker = node.node.broker
            server.stop()
            await wait_for(lambda: not broker.stats().connected, timeout=10)
            with contextlib.suppress(BrokerUnavailable):
                await broker.pubsub.want(room_channel("orphan"))
            with contextlib.suppress(BrokerUnavailable):
                await broker.pubsub.unwant(room_channel("orphan"))
            server.start()
            await wait_for(lambda: status_is(http, node.url + "/readyz", 200), timeout=20, interval=0.1)
            await asyncio.sleep(0.5)  # what the client had buffered reaches the server
            url = f"http://127.0.0.1:{server.monitor_port}/connz?subs=1"
            async with http.get(url, timeout=SHORT) as resp:
                doc = await resp.json()
            subjects = [s for c in doc.get("connections") or [] for s in c.get("subscriptions_list") or []]
            assert not [s for s in subjects if s.endswith(".room.orphan")], subjects
            assert broker.stats().subscriptions == 0
        finally:
            await node.stop()
    finally:
        server.stop()


async def test_a_frozen_nats_server_is_noticed_within_two_pings(
    own_nats: NatsServer, node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """A server that stops answering keeps its TCP connection open: only
    unanswered pings (nats.ping_interval) tell the node it is gone."""
    node: RunningNode = await node_factory(nats_url=own_nats.url, nats={"ping_interval": 0.5, "reconnect_wait": 0.2})
    readyz = node.url + "/readyz"
    assert await status_is(http, readyz, 200)
    assert own_nats.process is not None
    own_nats.process.send_signal(signal.SIGSTOP)
    try:
        await wait_for(lambda: not node.node.broker.connected, timeout=5)
        assert await status_is(http, readyz, 503)
    finally:
        own_nats.process.send_signal(signal.SIGCONT)
    await wait_for(lambda: node.node.broker.connected, timeout=10)


async def test_a_store_lost_with_nats_leaves_no_user_counted_for_good(
    own_nats: NatsServer, node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """NATS restarts with a fresh store (memory storage) while a user's last
    connection closes. The node kept the lost bucket's table of the user (a
    higher revision than any of the new bucket's) as what it last wrote: the
    next connection's count-out was judged on it, found nothing to remove,
    and that connection stayed counted, refusing the user 4029 for good."""
    node: RunningNode = await node_factory(
        nats_url=own_nats.url,
        nats={"reconnect_wait": 0.2},
        stream={"storage": "memory"},
        limits={"max_connections_per_user": 1},
        presence={"ttl": 3.0},
    )

    async def cycle(user: str) -> str:
        ws = await http.ws_connect(node.ws_url, params={"token": token(user)}, timeout=aiohttp.ClientWSTimeout())
        msg = await ws.receive(timeout=5)
        await ws.close()
        kind = orjson.loads(msg.data)["type"] if msg.type is aiohttp.WSMsgType.TEXT else f"closed {msg.data}"
        await wait_for(lambda: not node.node.broker.connections.tasks)  # counted out
        return str(kind)

    for i in range(10):  # the bucket's revisions climb
        assert await cycle(f"other{i}") == "welcome"
    ws = await http.ws_connect(node.ws_url, params={"token": token("una")})
    assert (await recv_json(ws))["type"] == "welcome"
    own_nats.kill()
    await ws.close()  # counted out while NATS is away: retried
    own_nats.start()  # memory storage: a fresh store
    await wait_for(lambda: status_is(http, node.url + "/readyz", 200), timeout=10)
    await wait_for(lambda: not node.node.broker.connections.tasks, timeout=10)
    assert [await cycle("una") for _ in range(3)] == ["welcome"] * 3


async def test_streams_refused_while_nats_is_away_are_refusals_not_connections(
    own_nats: NatsServer, node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """docs/protocol.md 8: a stream that ends while joining (NATS down) is
    refused (WebSocket 1013, SSE 503 ``unavailable``) and is never a
    connection: herald_connections_refused_total counts it, while the gauge,
    opened and closed do not move."""
    node: RunningNode = await node_factory(nats_url=own_nats.url, nats={"reconnect_wait": 0.2})
    own_nats.stop()
    await wait_for(lambda: status_is(http, node.url + "/readyz", 503), timeout=5)
    before = await scrape(http, node.url)

    async def ws_open() -> Any:
        async with http.ws_connect(node.ws_url, params={"token": token("w"), "room": "r"}) as ws:
            msg = await ws.receive(timeout=10)
            return msg.type, msg.data

    async def sse_open() -> Any:
        params = {"token": token("s"), "room": "r"}
        async with http.get(node.url + "/sse", params=params, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            return resp.status, (await resp.json(content_type=None))["error"]

    async def gauges_during() -> dict[str, float]:
        await asyncio.sleep(0.5)  # both are being admitted (waiting for NATS)
        return await scrape(http, node.url)

    ws, sse, during = await asyncio.gather(ws_open(), sse_open(), gauges_during())
    assert ws == (aiohttp.WSMsgType.CLOSE, 1013)
    assert sse == (503, "unavailable")
    await wait_for(lambda: len(node.node.sessions) == 0)
    after = await scrape(http, node.url)
    moved = {
        k: after[k] - before.get(k, 0)
        for k in after
        if k.startswith("herald_connections") and after[k] != before.get(k, 0)
    }
    assert moved == {
        'herald_connections_refused_total{reason="unavailable",transport="ws"}': 1,
        'herald_connections_refused_total{reason="unavailable",transport="sse"}': 1,
    }
    for transport in ("ws", "sse"):
        assert during[f'herald_connections{{transport="{transport}"}}'] == 0


async def test_a_websocket_being_opened_while_nats_is_away_answers_pings(
    own_nats: NatsServer, node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """docs/protocol.md 3.5: the node answers a ping with a pong, also before
    the welcome. An open waits for NATS (up to nats.publish_timeout, more in a
    cluster whose JetStream is electing): its pings went unanswered, and a
    client pinging every 5 s (aiohttp's heartbeat) gave up with 1006 before the
    node's 1013 came."""
    node: RunningNode = await node_factory(nats_url=own_nats.url, nats={"reconnect_wait": 0.2})
    own_nats.stop()
    await wait_for(lambda: status_is(http, node.url + "/readyz", 503), timeout=5)
    client = await RawWsClient.connect(f"{node.ws_url}?token={token('w')}&room=r")
    try:
        client.send_frame(0x9, b"still there?")
        assert await client.frame(timeout=2) == (0xA, b"still there?")
        assert await client.messages_until_close() == ([], 1013)
    finally:
        client.close()


async def test_streams_refused_while_nats_is_away_log_no_line_each(
    own_nats: NatsServer,
    node_factory: Callable[..., Any],
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every client retries while NATS is away: one warning per refused
    stream would flood the log with the same line (throttled instead)."""
    node: RunningNode = await node_factory(nats_url=own_nats.url, nats={"reconnect_wait": 0.2})
    own_nats.stop()
    await wait_for(lambda: status_is(http, node.url + "/readyz", 503), timeout=5)
    caplog.set_level(logging.WARNING, logger="herald.transports")

    async def ws_open(i: int) -> int:
        async with http.ws_connect(node.ws_url, params={"token": token(f"w{i}")}) as ws:
            return int((await ws.receive(timeout=10)).data)

    assert await asyncio.gather(*(ws_open(i) for i in range(8))) == [1013] * 8
    lines = [r for r in caplog.records if r.name == "herald.transports"]
    assert len(lines) <= 1, [r.getMessage() for r in lines]


async def test_the_reconnect_line_hides_the_password_in_the_nats_url(
    tmp_path: Path, node_factory: Callable[..., Any], http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """ "reconnected to NATS at ..." named the server with the user and password
    of the URL the node was given."""
    config = tmp_path / "nats.conf"
    config.write_text("authorization { user: alice, password: s3cret }\n")
    server = NatsServer(port=free_port(), store_dir=str(tmp_path / "js"), config_file=str(config)).start()
    try:
        url = f"nats://alice:s3cret@127.0.0.1:{server.port}"
        node: RunningNode = await node_factory(nats_url=url, nats={"reconnect_wait": 0.2})
        caplog.set_level(logging.INFO, logger="herald")
        server.stop()
        await wait_for(lambda: status_is(http, node.url + "/readyz", 503), timeout=5)
        server.start()
        await wait_for(lambda: status_is(http, node.url + "/readyz", 200), timeout=10)
    finally:
        server.stop()
    said = [r.getMessage() for r in caplog.records]
    assert f"reconnected to NATS at nats://alice:***@127.0.0.1:{server.port}" in said, said
    assert not any("s3cret" in line for line in said), said


async def test_a_token_expiring_while_nats_is_away_closes_at_its_expiry(
    own_nats: NatsServer, node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """A 4001 waits for its connection to be counted out first (a client back
    at once is not refused for it), at most 0.5 s: with NATS away no count-out
    can be written, and the close waited all of it (a drain did not: it
    stops waiting once NATS is away)."""
    node: RunningNode = await node_factory(nats_url=own_nats.url, nats={"reconnect_wait": 0.2})
    expires = int(time.time()) + 3
    ws = await http.ws_connect(node.ws_url, params={"token": token("kim", exp=expires)})
    assert (await recv_json(ws))["type"] == "welcome"
    own_nats.stop()
    await wait_for(lambda: status_is(http, node.url + "/readyz", 503), timeout=5)
    assert time.time() < expires - 0.5, "NATS took too long to stop for this test"
    assert await expect_close(ws, timeout=10) == (4001, "token expired")
    late = time.time() - expires
    assert late < 0.3, f"closed {late:.2f}s after the token expired"
