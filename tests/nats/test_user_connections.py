"""Connections per user are counted across the cluster: the 11th of one user,
wherever it lands, is refused — or the oldest is closed, by policy."""

from __future__ import annotations

import asyncio
import itertools
import signal
from collections.abc import Callable
from typing import Any

import aiohttp
import nats
import orjson

from broker.embedded import NatsServer
from broker.kv import key_token

from ..helpers import (
    ADMIN_KEY,
    PUBLISH_HEADERS,
    NodeFactory,
    RawWsClient,
    RunningNode,
    SseClient,
    expect_close,
    recv_json,
    scrape,
    spawn_cluster_node,
    token,
    wait_for,
)
from .test_sse_commands import open_stream

_clusters = itertools.count(1)


def cluster(**limits: Any) -> dict[str, dict[str, Any]]:
    n = next(_clusters)
    return {
        "subject": {"prefix": f"uc{n}"},
        "stream": {"name": f"UC{n}", "storage": "memory"},
        "limits": limits,
    }


async def connect(http: aiohttp.ClientSession, node: RunningNode, user: str) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(node.ws_url, params={"token": token(user), "room": "lobby"})
    return ws


async def test_eleventh_connection_across_two_nodes_is_refused(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    shared = cluster()
    a = await node_factory(**shared)
    b = await node_factory(**shared)
    tabs = []
    for i in range(10):
        ws = await connect(http, a if i % 2 else b, "grace")
        assert (await recv_json(ws))["type"] == "welcome"
        tabs.append(ws)
    other = await connect(http, a, "heidi")  # another user is not affected
    assert (await recv_json(other))["type"] == "welcome"

    eleventh = await connect(http, a, "grace")
    code, reason = await expect_close(eleventh)
    assert code == 4029 and "at most 10 connections" in reason
    resp = await http.get(b.url + "/sse", params={"token": token("grace")})
    assert resp.status == 429
    assert (await resp.json())["error"] == "too_many_connections"
    metrics = await scrape(http, a.url)
    assert metrics['herald_limit_rejections_total{limit="connections_per_user"}'] == 1

    # One closes: there is room again (counted down on the node it was on).
    await tabs[3].close()

    async def room_again() -> bool:
        ws = await connect(http, b, "grace")
        first = await ws.receive(timeout=5)
        if first.type == aiohttp.WSMsgType.TEXT:
            tabs[3] = ws
            return True
        await ws.close()
        return False

    await wait_for(room_again, timeout=5, interval=0.1)
    for ws in [*tabs, other]:
        await ws.close()


async def test_close_oldest_closes_the_oldest_on_the_other_node(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    shared = cluster(max_connections_per_user=3, connections_policy="close-oldest")
    a = await node_factory(**shared)
    b = await node_factory(**shared)
    oldest = await connect(http, b, "ivan")
    assert (await recv_json(oldest))["type"] == "welcome"
    middle = await connect(http, a, "ivan")
    assert (await recv_json(middle))["type"] == "welcome"
    sse = SseClient(await http.get(a.url + "/sse", params={"token": token("ivan")}))
    newest = await connect(http, a, "ivan")
    assert (await recv_json(newest))["type"] == "welcome"

    code, reason = await expect_close(oldest)
    assert code == 4029 and "oldest" in reason
    # The others stay.
    for ws in (middle, newest):
        await ws.send_json({"type": "ping", "ref": "x"})
        assert (await recv_json(ws))["type"] == "pong"
    assert not sse.ended
    metrics = await scrape(http, b.url)
    assert metrics['herald_connections_closed_total{reason="replaced",transport="ws"}'] == 1
    for ws in (middle, newest):
        await ws.close()


async def test_a_burst_of_one_users_connects_on_two_nodes_admits_exactly_the_limit(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """A storm of connects at once (each count a compare-and-set, pipelined
    with the others): the limit holds exactly, and other users are admitted."""
    shared = cluster(max_connections_per_user=3)
    a = await node_factory(**shared)
    b = await node_factory(**shared)

    async def first_frame(node: RunningNode, user: str) -> tuple[aiohttp.ClientWebSocketResponse, str]:
        ws = await connect(http, node, user)
        msg = await ws.receive(timeout=10)
        return ws, ("welcome" if msg.type == aiohttp.WSMsgType.TEXT else f"closed {ws.close_code}")

    burst = [first_frame(a if i % 2 else b, "judy") for i in range(12)]
    burst += [first_frame(a if i % 2 else b, f"bystander{i}") for i in range(20)]
    outcomes = await asyncio.gather(*burst)
    judy = [what for _, what in outcomes[:12]]
    assert judy.count("welcome") == 3 and judy.count("closed 4029") == 9, judy
    assert all(what == "welcome" for _, what in outcomes[12:])
    for ws, _ in outcomes:
        await ws.close()


async def test_a_node_started_since_the_live_nodes_were_listed_counts(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """Node A lists the live nodes (kept ttl/3); node B starts after and
    admits the user: A must count B's connection (not take B for a dead
    node), and must not drop it from the user's table either."""
    shared = cluster(max_connections_per_user=1)
    a = await node_factory(**shared)
    warm = await connect(http, a, "zed")  # A lists the live nodes now
    assert (await recv_json(warm))["type"] == "welcome"
    b = await node_factory(**shared)
    first = await connect(http, b, "ann")
    assert (await recv_json(first))["type"] == "welcome"
    for node in (a, a, b):  # refused each time: B's connection is still counted
        second = await connect(http, node, "ann")
        code, reason = await expect_close(second)
        assert code == 4029 and "at most 1 connections" in reason
    for ws in (warm, first):
        await ws.close()


async def test_a_drained_node_counts_its_connections_out_before_it_leaves(
    nats_server: NatsServer, node_factory: NodeFactory, spawn: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """Users hold their limit on node B; B drains (SIGTERM). Its clients,
    told 1012, reconnect to A at once and are admitted: B counted them out
    before leaving. Before, it dropped its NATS link first, most count-outs
    failed, and A (whose listing of live nodes still had B) refused them 4029."""
    limit = 3
    shared = cluster(max_connections_per_user=limit)
    shared["presence"] = {"ttl": 60.0}  # A keeps its listing of live nodes for ttl/3
    a = await node_factory(**shared)
    env = {"HERALD_LIMITS_MAX_CONNECTIONS_PER_USER": str(limit), "HERALD_PRESENCE_TTL": "60"}
    proc, b_url = await spawn_cluster_node(spawn, http, nats_server.url, shared, **env)
    b = RunningNode(a.settings, a.runner, b_url)  # only its URLs are used
    users = [f"d{i}" for i in range(30)]  # 90 sockets: the client session holds 100
    tabs = await asyncio.gather(*(connect(http, b, u) for u in users for _ in range(limit)))
    assert [(await recv_json(ws))["type"] for ws in tabs] == ["welcome"] * len(tabs)
    warm = await connect(http, a, "warm")  # A lists the live nodes now: B among them
    assert (await recv_json(warm))["type"] == "welcome"
    proc.send_signal(signal.SIGTERM)
    assert [c for c, _ in await asyncio.gather(*(expect_close(ws, timeout=10) for ws in tabs)) if c != 1012] == []
    assert await asyncio.to_thread(proc.wait, 20) == 0
    again = await asyncio.gather(*(connect(http, a, u) for u in users for _ in range(limit)))
    frames = [(await recv_json(ws)).get("type") for ws in again]
    assert frames == ["welcome"] * len(again), (frames, proc.err_path.read_text()[-3000:])
    for ws in (*again, warm):
        await ws.close()


async def test_a_slow_consumer_closed_4008_is_counted_out_before_it_is_told(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """4008 tells a client to reconnect at once (with since=<last id>). A user
    at limits.max_connections_per_user = 1 who does so the moment the close
    frame arrives is admitted: the closed connection was counted out of the
    user's table in KV before the close was sent. (Counted out after it, one
    such reconnect in 3 to 10 met 4029 here.)"""
    settings = cluster(max_connections_per_user=1)
    node = await node_factory(**settings, backpressure={"max_messages": 20, "write_delay": 0.1})
    for round_ in range(40):
        user = f"slow{round_}"
        url = f"{node.ws_url}?token={token(user)}"
        slow = await RawWsClient.connect(url, rcvbuf=1 << 20)
        assert b'"welcome"' in (await slow.frame())[1]
        # A burst within write_delay overflows the queue of 20: the slow-consumer close.
        batch = [{"channel": f"user:{user}", "data": i} for i in range(40)]
        async with http.post(node.url + "/api/publish", json=batch, headers=PUBLISH_HEADERS) as resp:
            assert resp.status == 200
        _, code = await slow.messages_until_close()
        assert code == 4008, round_
        again = await RawWsClient.connect(url)  # at once
        opcode, payload = await again.frame()
        assert opcode == 1 and b'"welcome"' in payload, (round_, payload)
        slow.close()
        again.close()
        await wait_for(lambda: not node.node.sessions, interval=0.002)


async def test_users_gone_leave_no_key_behind(
    node_factory: NodeFactory, http: aiohttp.ClientSession, nats_server: NatsServer, monkeypatch: Any
) -> None:
    """Each user's table in ``<stream>_conns`` goes once its last connection
    is counted out (after EMPTY_TABLE_TTL): the bucket holds the users
    connected, not every user ever seen (10,000 users that came and went
    left 10,000 keys of ``{}``, forever)."""
    monkeypatch.setattr("broker.connections.EMPTY_TABLE_TTL", 1)
    shared = cluster()
    node = await node_factory(**shared)
    stream = f"KV_{shared['stream']['name']}_conns"
    users = [f"gone{i}" for i in range(40)]
    tabs = [await connect(http, node, user) for user in users]
    for ws in tabs:
        assert (await recv_json(ws))["type"] == "welcome"
    kept = await connect(http, node, "stays")
    assert (await recv_json(kept))["type"] == "welcome"
    nc = await nats.connect(nats_server.url)
    try:

        async def subjects() -> int:
            info = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=2)
            return int(orjson.loads(info.data)["state"].get("num_subjects") or 0)

        assert await subjects() == len(users) + 1
        for ws in tabs:
            await ws.close()

        async def only_the_connected() -> bool:
            return await subjects() == 1

        await wait_for(only_the_connected, timeout=8)
        # A user back after its key went is counted as before.
        again = await connect(http, node, users[0])
        assert (await recv_json(again))["type"] == "welcome"
        assert await subjects() == 2
        await again.close()
        await kept.close()
    finally:
        await nc.close()


async def conns_table(nats_url: str, stream: str, user: str) -> dict[str, Any]:
    """The user's connections as counted cluster-wide (``<stream>_conns``)."""
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(f"{stream}_conns")
        return orjson.loads((await kv.get(key_token(user))).value or b"{}")  # type: ignore[no-any-return]
    finally:
        await nc.close()


async def api_presence(http: aiohttp.ClientSession, node: RunningNode, room: str) -> list[str]:
    async with http.get(f"{node.url}/api/presence/{room}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
        return (await r.json())["users"]  # type: ignore[no-any-return]


async def test_a_stream_naming_the_one_it_replaces_is_admitted_at_the_limit(
    node_factory: NodeFactory, http: aiohttp.ClientSession, nats_server: NatsServer
) -> None:
    """refuse-new, one connection per user: the old stream is open and silent
    (a network switch left it half-open: its client reads nothing more). The
    client's new stream names it (``replaces=<conn>``) and is admitted at
    once; the old one is closed 4029 and counted out in the same write."""
    shared = cluster(max_connections_per_user=1)
    node = await node_factory(**shared, ws={"heartbeat": 0})
    url = f"{node.ws_url}?token={token('rex')}&room=lobby"
    old = await RawWsClient.connect(url)
    _, payload = await old.frame()
    conn = orjson.loads(payload)["conn"]
    try:
        new = await http.ws_connect(node.ws_url, params={"token": token("rex"), "room": "lobby", "replaces": conn})
        welcome = await recv_json(new)
        assert welcome["type"] == "welcome", welcome
        _, code = await old.messages_until_close()
        assert code == 4029
        await wait_for(lambda: len(node.node.sessions.of_user("rex")) == 1)
        assert await api_presence(http, node, "lobby") == ["rex"]
        assert list(await conns_table(nats_server.url, shared["stream"]["name"], "rex")) == [welcome["conn"]]
        third = await connect(http, node, "rex")  # the limit still holds: the count is 1
        code, reason = await expect_close(third)
        assert code == 4029 and "at most 1 connections" in reason
        metrics = await scrape(http, node.url)
        assert metrics['herald_connections_closed_total{reason="reconnected",transport="ws"}'] == 1
        await new.close()
    finally:
        old.close()


async def test_a_stream_replaces_one_on_another_node(
    node_factory: NodeFactory, http: aiohttp.ClientSession, nats_server: NatsServer
) -> None:
    """The same across nodes, on SSE: the old stream on A, the new one on B
    names it; A closes its session (event: close 4029) when B tells it."""
    shared = cluster(max_connections_per_user=1)
    a = await node_factory(**shared)
    b = await node_factory(**shared)
    old = await open_stream(http, a, token("sal"), ["lobby"])
    assert old.welcome is not None
    new = await open_stream(http, b, token("sal"), ["lobby"], replaces=old.welcome["conn"])
    assert new.welcome is not None
    closing = [ev for ev in await old.read_to_end() if ev.event == "close"]
    assert [ev.json()["code"] for ev in closing] == [4029]
    await wait_for(lambda: not a.node.sessions.of_user("sal"))
    assert await api_presence(http, b, "lobby") == ["sal"]
    assert list(await conns_table(nats_server.url, shared["stream"]["name"], "sal")) == [new.welcome["conn"]]
    assert not new.ended
    metrics = await scrape(http, a.url)
    assert metrics['herald_connections_closed_total{reason="reconnected",transport="sse"}'] == 1
    new.response.close()


async def test_a_replaces_naming_another_users_or_no_connection_is_ignored(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """Another user's conn: the new stream is admitted (or refused) as if it
    named nothing, and the other user's stream is untouched. An unknown or
    malformed one: admitted as usual."""
    shared = cluster(max_connections_per_user=1)
    a = await node_factory(**shared)
    b = await node_factory(**shared)
    alice = await connect(http, a, "alice")
    conn = (await recv_json(alice))["conn"]
    for node in (a, b):  # bob has no connection: admitted; alice's stays
        bob = await http.ws_connect(node.ws_url, params={"token": token("bob"), "replaces": conn})
        assert (await recv_json(bob))["type"] == "welcome"
        await alice.send_json({"type": "ping", "ref": "still"})
        assert (await recv_json(alice))["type"] == "pong"
        again = await http.ws_connect(node.ws_url, params={"token": token("bob"), "replaces": conn})
        code, reason = await expect_close(again)  # bob at his limit: refused as if it named nothing
        assert code == 4029 and "at most 1 connections" in reason
        resp = await http.get(node.url + "/sse", params={"token": token("bob"), "replaces": conn})
        assert resp.status == 429
        await bob.close()
        await wait_for(lambda: not a.node.sessions.of_user("bob") and not b.node.sessions.of_user("bob"))
    for i, named in enumerate(["nope:1", f"{a.node.sessions.new_id()}", "", "x" * 300, conn + "\n"]):
        ws = await http.ws_connect(b.ws_url, params={"token": token(f"carol{i}"), "replaces": named})
        assert (await recv_json(ws))["type"] == "welcome", named
        await ws.close()
    await alice.send_json({"type": "ping", "ref": "still"})
    assert (await recv_json(alice))["type"] == "pong"
    await alice.close()
