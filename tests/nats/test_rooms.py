"""Rooms as a product: join / leave once per user across nodes, ephemeral
(typing) messages, and which rooms clients may publish into."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from typing import Any

import aiohttp
import nats
import pytest

import broker.presence
from broker.embedded import NatsServer
from broker.kv import key_token

from ..helpers import (
    ADMIN_KEY,
    NodeFactory,
    RunningNode,
    SseClient,
    recv_json,
    spawn_cluster_node,
    token,
    wait_for,
)
from ..helpers import api_publish as publish

_clusters = itertools.count(1)


def cluster(**extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    n = next(_clusters)
    return {
        "subject": {"prefix": f"rm{n}"},
        "stream": {"name": f"RM{n}", "storage": "memory"},
        "rooms": {"join_leave": ["chat-*"]},
        **extra,
    }


async def open_ws(
    http: aiohttp.ClientSession, node: RunningNode | str, user: str, room: str, **claims: Any
) -> aiohttp.ClientWebSocketResponse:
    url = node if isinstance(node, str) else node.ws_url
    ws = await http.ws_connect(url, params={"token": token(user, **claims), "room": room})
    assert (await recv_json(ws))["type"] == "welcome"
    return ws


async def frames_for(ws: aiohttp.ClientWebSocketResponse, seconds: float) -> list[dict[str, Any]]:
    """Every frame that arrives within ``seconds``."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            got.append(await recv_json(ws, timeout=left))
        except TimeoutError:
            break
    return got


async def api_users(http: aiohttp.ClientSession, url: str, room: str) -> Any:
    async with http.get(f"{url}/api/presence/{room}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
        body = await r.json(content_type=None)
        return body.get("users") if r.status == 200 else (r.status, body)


async def spawn_doomed(
    spawn: Any, http: aiohttp.ClientSession, nats_server: NatsServer, shared: dict[str, Any], ttl: float
) -> tuple[Any, str]:
    """A node in its own process (to be killed), announcing joins and leaves of chat-* rooms."""
    return await spawn_cluster_node(
        spawn,
        http,
        nats_server.url,
        shared,
        HERALD_PRESENCE_TTL=str(ttl),
        HERALD_ROOMS_JOIN_LEAVE="chat-*",
        HERALD_NODE_ID="doomed",
    )


def presence_frames(frames: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(f["type"], f["user"]) for f in frames if f["type"] in ("join", "leave")]


async def test_one_join_and_one_leave_per_user_across_two_nodes(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    shared = cluster()
    a = await node_factory(**shared)
    b = await node_factory(**shared)
    observer = await open_ws(http, a, "olga", "chat-1")
    assert presence_frames(await frames_for(observer, 0.5)) == [("join", "olga")]  # its own arrival
    sse = SseClient(await http.get(b.url + "/sse", params={"token": token("sam"), "room": "chat-1"}))

    first = await open_ws(http, b, "alice", "chat-1")
    second = await open_ws(http, a, "alice", "chat-1")  # another tab, another node: no second join
    got = presence_frames(await frames_for(observer, 0.8))
    assert got == [("join", "sam"), ("join", "alice")], got
    await first.close()  # one tab left: no leave
    assert presence_frames(await frames_for(observer, 0.6)) == []
    await second.close()
    assert presence_frames(await frames_for(observer, 1.0)) == [("leave", "alice")]

    # The SSE member saw the same, as events.
    events = []
    while len(events) < 2:
        ev = await sse.next()
        if ev.event in ("join", "leave") and ev.json()["user"] == "alice":
            events.append((ev.event, ev.json()))
    assert events == [
        ("join", {"type": "join", "room": "chat-1", "user": "alice"}),
        ("leave", {"type": "leave", "room": "chat-1", "user": "alice"}),
    ]
    # Rooms outside rooms.join_leave announce nothing.
    quiet = await open_ws(http, a, "quinn", "lobby")
    rita = await open_ws(http, b, "rita", "lobby")
    assert presence_frames(await frames_for(quiet, 0.6)) == []
    await rita.close()
    await observer.close()


async def test_no_leave_while_the_user_is_on_a_node_started_since_the_live_nodes_were_listed(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    shared = cluster()
    a = await node_factory(**shared)
    observer = await open_ws(http, a, "olga", "chat-1")  # A lists the live nodes now (kept ttl/3)
    assert presence_frames(await frames_for(observer, 0.5)) == [("join", "olga")]
    b = await node_factory(**shared)
    on_b = await open_ws(http, b, "alice", "chat-1")
    on_a = await open_ws(http, a, "alice", "chat-1")  # a second tab
    assert presence_frames(await frames_for(observer, 0.8)) == [("join", "alice")]
    await on_a.close()  # alice is still in the room, on B
    assert presence_frames(await frames_for(observer, 1.0)) == []
    await on_b.close()
    assert presence_frames(await frames_for(observer, 1.0)) == [("leave", "alice")]
    await observer.close()


async def test_a_user_back_on_another_node_while_the_last_leave_is_judged_stays_in(
    node_factory: NodeFactory, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alice's last tab on A closes; A lists her entries (none), and before it
    takes the room's marker away she is back, on B (whose join finds the
    marker there: no join of its own). The leave judged on the older listing
    must not go out: she is in the room."""
    shared = cluster()
    a = await node_factory(**shared)
    b = await node_factory(**shared)
    observer = await open_ws(http, a, "olga", "chat-1")
    on_a = await open_ws(http, a, "alice", "chat-1")
    assert presence_frames(await frames_for(observer, 0.8)) == [("join", "olga"), ("join", "alice")]
    listing = broker.presence.live_keys
    back: list[aiohttp.ClientWebSocketResponse] = []

    async def listed_then_back(kv: Any, pattern: str) -> list[str]:
        keys = await listing(kv, pattern)
        if pattern.endswith(key_token("alice")) and not back:
            back.append(await open_ws(http, b, "alice", "chat-1"))
            await asyncio.sleep(0.5)  # B has written its entry and claimed the join by now
        return keys

    monkeypatch.setattr(broker.presence, "live_keys", listed_then_back)
    await on_a.close()
    assert presence_frames(await frames_for(observer, 1.5)) == []
    async with http.get(f"{a.url}/api/presence/chat-1", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
        assert (r.status, (await r.json())["users"]) == (200, ["alice", "olga"])
    await back[0].close()
    assert presence_frames(await frames_for(observer, 1.0)) == [("leave", "alice")]
    await observer.close()


async def test_ephemeral_reaches_members_live_and_is_never_replayed(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    shared = cluster()
    a = await node_factory(**shared)
    b = await node_factory(**shared)
    typist = await open_ws(http, a, "tom", "chat-2", publish=["chat-*"])
    reader = await open_ws(http, b, "uma", "chat-2")
    await frames_for(reader, 0.3)  # join frames
    await typist.send_json({"type": "publish", "room": "chat-2", "data": {"typing": True}, "ephemeral": True, "ref": 1})
    await typist.send_json({"type": "publish", "room": "chat-2", "data": {"text": "hi"}, "ref": 2})
    acks = [f for f in await frames_for(typist, 0.5) if f["type"] == "ack"]
    assert acks[0] == {"type": "ack", "ref": 1, "channel": "room:chat-2"}  # no id: not stored
    stored_id = acks[1]["id"]
    got = [f for f in await frames_for(reader, 0.5) if f["type"] == "message"]
    typing = {"type": "message", "channel": "room:chat-2", "event": "message", "from": "tom", "data": {"typing": True}}
    assert got[0] == typing
    assert (got[1]["id"], got[1]["data"]) == (stored_id, {"text": "hi"})

    # A later resume from before both: only the stored one.
    late = await http.ws_connect(b.ws_url, params={"token": token("vic"), "room": "chat-2", "since": "0"})
    frames = [f for f in await frames_for(late, 0.6) if f["type"] == "message"]
    assert [(f.get("id"), f["data"]) for f in frames] == [(stored_id, {"text": "hi"})]
    for ws in (typist, reader, late):
        await ws.close()


async def test_rooms_client_publish_limits_where_clients_may_publish(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    node = await node_factory(**cluster(rooms={"client_publish": ["chat-*"]}))
    ws = await open_ws(http, node, "will", "news", publish=["*"])
    await ws.send_json({"type": "publish", "room": "news", "data": 1, "ref": "n"})
    err = await recv_json(ws)
    assert (err["type"], err["code"], err["ref"]) == ("error", "forbidden", "n")
    assert "rooms.client_publish" in err["message"]
    await ws.send_json({"type": "publish", "room": "chat-x", "data": 1, "ref": "c"})
    assert (await recv_json(ws))["type"] == "ack"
    await ws.close()


async def test_a_killed_nodes_users_leave_once(
    node_factory: NodeFactory, nats_server: NatsServer, spawn: Any, http: aiohttp.ClientSession
) -> None:
    shared = cluster(presence={"ttl": 1.5})
    survivor = await node_factory(**shared)
    proc, url = await spawn_doomed(spawn, http, nats_server, shared, 1.5)
    watcher = await open_ws(http, survivor, "wes", "chat-9")
    doomed = await open_ws(http, url.replace("http", "ws") + "/ws", "xena", "chat-9")
    assert presence_frames(await frames_for(watcher, 1.0)) == [("join", "wes"), ("join", "xena")]
    proc.send_signal(signal.SIGKILL)
    got = presence_frames(await frames_for(watcher, 6.0))
    assert got == [("leave", "xena")], got
    await watcher.close()
    await doomed.close()  # kept open until its node died


async def test_history_per_room_glob(node_factory: NodeFactory, http: aiohttp.ClientSession) -> None:
    node = await node_factory(**cluster(rooms={"history": ["chat-*=3/3600", "log-?=100/0.5"]}))
    since = await publish(http, node, "room:lobby", "before")
    chat = [await publish(http, node, "room:chat-1", i) for i in range(6)]
    lobby = [await publish(http, node, "room:lobby", i) for i in range(6)]
    ws = await http.ws_connect(
        node.ws_url,
        params=[("token", token("yara")), ("room", "chat-1"), ("room", "lobby"), ("since", since)],
    )
    assert (await recv_json(ws))["type"] == "welcome"
    frames = [f for f in await frames_for(ws, 0.8) if f["type"] in ("reset", "message")]
    assert frames[0]["type"] == "reset" and frames[0]["channel"] == "room:chat-1"
    ids = [f["id"] for f in frames[1:]]
    assert ids == sorted(chat[-3:] + lobby, key=int)  # chat-*: the newest 3; lobby: the default (1000)
    await ws.close()

    # Age: log-? keeps half a second.
    since = await publish(http, node, "room:lobby", "mark")
    await publish(http, node, "room:log-1", "old")
    await asyncio.sleep(0.7)
    fresh = await publish(http, node, "room:log-1", "fresh")
    ws = await http.ws_connect(node.ws_url, params={"token": token("yara"), "room": "log-1", "since": since})
    assert (await recv_json(ws))["type"] == "welcome"
    frames = [f for f in await frames_for(ws, 0.6) if f["type"] in ("reset", "message")]
    assert [(f["type"], f.get("id")) for f in frames] == [("reset", None), ("message", fresh)]
    await ws.close()


async def test_a_stopped_nodes_users_leave_and_may_join_again(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    shared = cluster(presence={"ttl": 1.5})
    a = await node_factory(**shared)
    b = await node_factory(**shared)
    watcher = await open_ws(http, a, "zed", "chat-5")
    amy = await open_ws(http, b, "amy", "chat-5")
    assert presence_frames(await frames_for(watcher, 0.8)) == [("join", "zed"), ("join", "amy")]
    await b.stop()  # graceful: amy's node is gone at once, a survivor announces her leave
    got = presence_frames(await frames_for(watcher, 5.0))
    assert got == [("leave", "amy")], got
    again = await open_ws(http, a, "amy", "chat-5")
    assert presence_frames(await frames_for(watcher, 0.8)) == [("join", "amy")]
    for ws in (again, watcher, amy):
        await ws.close()


async def test_a_drain_whose_leaves_take_long_loses_none(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """A stopped node's close gave its queued presence writes a second, then
    cut them off, also between a batch's entry deletes and the judging of
    their leaves: those users were announced leaving by no one (a survivor's
    sweep finds no entry), and when they came back, joining neither (their
    marker stayed). Here each leave takes 0.1 s to judge: 30 of them."""
    shared = cluster(presence={"ttl": 1.5})
    a = await node_factory(**shared)
    b = await node_factory(**shared)
    watcher = await open_ws(http, a, "zed", "chat-6")
    users = [f"u{i}" for i in range(30)]
    tabs = [await open_ws(http, b, user, "chat-6") for user in users]
    joined = {u for kind, u in presence_frames(await frames_for(watcher, 1.0)) if kind == "join"}
    assert joined == {"zed", *users}
    presence = b.node.broker.presence
    judge = presence._left

    async def slow_left(room: Any, users: Any) -> None:
        await asyncio.sleep(0.1 * len(users))
        await judge(room, users)

    presence._left = slow_left  # type: ignore[method-assign]
    await b.stop()
    left: list[str] = []
    deadline = time.monotonic() + 4.0
    while len(left) < len(users) and time.monotonic() < deadline:
        left += [u for kind, u in presence_frames(await frames_for(watcher, 0.2)) if kind == "leave"]
    assert sorted(left) == sorted(users)
    for ws in (watcher, *tabs):
        await ws.close()


async def test_a_mass_leave_lists_the_room_not_each_user(
    node_factory: NodeFactory, http: aiohttp.ClientSession, nats_server: NatsServer
) -> None:
    """Each leave is judged on the user's entries left on live nodes: listed
    one user at a time, that is a consumer made and deleted per leave (on a
    cluster, proposals of the meta leader), and 2,000 leaves took 10 s."""
    shared = cluster()
    a = await node_factory(**shared)
    b = await node_factory(**shared)
    watcher = await open_ws(http, a, "zed", "chat-9")
    users = [f"u{i}" for i in range(60)]
    tabs = await asyncio.gather(*(open_ws(http, b, user, "chat-9") for user in users))
    joined = {u for kind, u in presence_frames(await frames_for(watcher, 1.5)) if kind == "join"}
    assert joined == {"zed", *users}
    nc = await nats.connect(nats_server.url)
    listings = 0

    async def count(msg: Any) -> None:
        nonlocal listings
        api = msg.subject.split(".")
        if api[2:4] == ["CONSUMER", "CREATE"] and api[4] == f"KV_{shared['stream']['name']}_presence":
            listings += 1

    await nc.subscribe("$JS.API.>", cb=count)  # the same account sees every JetStream request
    await nc.flush()
    await asyncio.gather(*(ws.close() for ws in tabs))
    left: list[str] = []
    deadline = time.monotonic() + 10.0
    while len(left) < len(users) and time.monotonic() < deadline:
        left += [u for kind, u in presence_frames(await frames_for(watcher, 0.2)) if kind == "leave"]
    await nc.close()
    assert sorted(left) == sorted(users)  # each once
    assert listings <= len(users) // 4, f"{listings} listings for {len(users)} leaves"
    await watcher.close()


async def test_a_killed_nodes_leave_comes_when_presence_drops_the_user(
    node_factory: NodeFactory,
    nats_server: NatsServer,
    spawn: Any,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once presence answers no longer list a crashed node's user (within the
    ttl), her leave is announced within ttl/3: members and presence answers
    agree. Sweeps ran once per ttl: the leave came up to a ttl later. The kill
    is timed just after the doomed node's refresh that follows a sweep."""
    ttl = 3.0
    shared = cluster(presence={"ttl": ttl})
    sweeps: list[float] = []
    sweep = broker.presence.KvPresence._sweep

    async def timed_sweep(self: Any) -> None:  # instrumentation only
        sweeps.append(time.monotonic())
        await sweep(self)

    monkeypatch.setattr(broker.presence.KvPresence, "_sweep", timed_sweep)
    survivor = await node_factory(**shared)
    proc, url = await spawn_doomed(spawn, http, nats_server, shared, ttl)
    refreshes: list[float] = []
    nc = await nats.connect(nats_server.url)

    async def on_refresh(msg: Any) -> None:
        if ".doomed-" in msg.subject:
            refreshes.append(time.monotonic())

    await nc.subscribe(f"$KV.{shared['stream']['name']}_nodes.>", cb=on_refresh)
    watcher = await open_ws(http, survivor, "wes", "chat-9")
    xena = await open_ws(http, url.replace("http", "ws") + "/ws", "xena", "chat-9")
    assert presence_frames(await frames_for(watcher, 1.0)) == [("join", "wes"), ("join", "xena")]
    # A survivor's sweep, then the doomed node's next refresh (>0.1 s after it): kill then.
    await wait_for(lambda: bool(sweeps), timeout=3 * ttl)
    swept = sweeps[-1]
    await wait_for(lambda: any(r > swept + 0.1 for r in refreshes), timeout=ttl)
    proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    dropped_at = left_at = None
    while time.monotonic() - killed < 3 * ttl and left_at is None:
        if presence_frames(await frames_for(watcher, 0.05)) == [("leave", "xena")]:
            left_at = time.monotonic() - killed
        if dropped_at is None and await api_users(http, survivor.url, "chat-9") == ["wes"]:
            dropped_at = time.monotonic() - killed
    await nc.close()
    assert dropped_at is not None and dropped_at <= ttl + 1.0
    assert left_at is not None and left_at - dropped_at < ttl / 3 + 0.5, (dropped_at, left_at)
    await watcher.close()
    await xena.close()
