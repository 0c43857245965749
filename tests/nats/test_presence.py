"""Cluster-wide presence: ``presence {room}`` and ``GET /api/presence/<room>``
give the same users on every node, each user once, and a node that dies
takes its users out within ``presence.ttl``."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import signal
import time
from typing import Any

import aiohttp
import pytest

from broker.channels import Subjects, room_channel
from broker.embedded import NatsServer
from broker.jetstream import NatsBroker, NatsConfig

from ..helpers import (
    ADMIN_KEY,
    NodeFactory,
    RunningNode,
    broker_events,
    recv_json,
    recv_until,
    spawn_cluster_node,
    token,
    wait_for,
)
from .test_rooms import frames_for, presence_frames

_clusters = itertools.count(1)


def cluster(**extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    n = next(_clusters)
    return {"subject": {"prefix": f"pr{n}"}, "stream": {"name": f"PR{n}", "storage": "memory"}, **extra}


async def open_ws(
    http: aiohttp.ClientSession, node: RunningNode, user: str, rooms: list[str]
) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(node.ws_url, params=[("token", token(user)), *(("room", r) for r in rooms)])
    assert (await recv_json(ws))["type"] == "welcome"
    return ws


async def ask(ws: aiohttp.ClientWebSocketResponse, room: str, ref: str = "p") -> dict[str, Any]:
    await ws.send_json({"type": "presence", "room": room, "ref": ref})
    return await recv_until(ws, "presence")


async def api_presence(http: aiohttp.ClientSession, node_url: str, room: str) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with http.get(f"{node_url}/api/presence/{room}", headers=headers) as r:
        return r.status, await r.json()


async def eventually_users(http: aiohttp.ClientSession, url: str, room: str, users: list[str], timeout: float) -> None:
    async def check() -> bool:
        return (await api_presence(http, url, room))[1].get("users") == users

    await wait_for(check, timeout=timeout, interval=0.1)


async def test_presence_is_the_same_on_every_node_and_each_user_once(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    shared = cluster()
    a = await node_factory(**shared)
    b = await node_factory(**shared)
    tabs = [
        await open_ws(http, a, "alice", ["lobby"]),
        await open_ws(http, a, "alice", ["lobby"]),
        await open_ws(http, b, "alice", ["lobby", "other"]),
    ]
    bob = await open_ws(http, b, "bob", ["lobby"])
    carol = await open_ws(http, a, "carol", ["other"])
    await eventually_users(http, a.url, "lobby", ["alice", "bob"], timeout=5)

    answer = await ask(tabs[0], "lobby", ref="q1")
    assert answer == {"type": "presence", "room": "lobby", "users": ["alice", "bob"], "ref": "q1"}
    assert (await ask(bob, "lobby"))["users"] == ["alice", "bob"]
    assert (await ask(carol, "other"))["users"] == ["alice", "carol"]
    assert await api_presence(http, b.url, "lobby") == (200, {"room": "lobby", "users": ["alice", "bob"]})

    # /api/stats counts this node's users per room.
    async with http.get(a.url + "/api/stats", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
        stats = await r.json()
    assert stats["rooms"] == {"lobby": 1, "other": 1}

    # Alice stays while any tab is in the room; leaves with the last one.
    await tabs[0].close()
    await tabs[2].send_json({"type": "unsubscribe", "room": "lobby", "ref": "u"})
    await recv_until(tabs[2], "ack")
    await asyncio.sleep(0.3)
    assert (await ask(bob, "lobby"))["users"] == ["alice", "bob"]
    await tabs[1].close()
    await eventually_users(http, b.url, "lobby", ["bob"], timeout=5)
    assert (await ask(carol, "other"))["users"] == ["alice", "carol"]  # still in "other" on b
    for ws in (tabs[2], bob, carol):
        await ws.close()
    await eventually_users(http, a.url, "lobby", [], timeout=5)


async def test_presence_needs_the_room_in_the_token(node_factory: NodeFactory, http: aiohttp.ClientSession) -> None:
    node = await node_factory(**cluster())
    ws = await http.ws_connect(node.ws_url, params={"token": token("dave", rooms=["lobby"])})
    assert (await recv_json(ws))["type"] == "welcome"
    await ws.send_json({"type": "presence", "room": "secret", "ref": 1})
    err = await recv_json(ws)
    assert (err["type"], err["code"], err["ref"]) == ("error", "forbidden", 1)
    await ws.send_json({"type": "presence", "room": "a.b", "ref": 2})
    err = await recv_json(ws)
    assert (err["type"], err["code"], err["ref"]) == ("error", "bad_request", 2)
    assert "'a.b'" in err["message"], err  # the value sent, quoted
    status, body = await api_presence(http, node.url, "a*b")
    assert status == 400 and "'a*b'" in body["message"], body
    async with http.get(node.url + "/api/presence/lobby") as r:
        assert r.status == 401
    await ws.close()


async def test_a_killed_node_leaves_every_room_within_the_ttl(
    node_factory: NodeFactory, nats_server: NatsServer, spawn: Any, http: aiohttp.ClientSession
) -> None:
    shared = cluster(presence={"ttl": 2.0})
    survivor = await node_factory(**shared)
    proc, url = await spawn_cluster_node(
        spawn, http, nats_server.url, shared, HERALD_PRESENCE_TTL="2.0", HERALD_NODE_ID="doomed"
    )
    doomed = await http.ws_connect(url.replace("http", "ws") + "/ws", params={"token": token("erin"), "room": "lobby"})
    assert (await recv_json(doomed))["type"] == "welcome"
    stays = await open_ws(http, survivor, "frank", ["lobby"])
    await eventually_users(http, survivor.url, "lobby", ["erin", "frank"], timeout=5)

    proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    await eventually_users(http, survivor.url, "lobby", ["frank"], timeout=10)
    gone_after = time.monotonic() - killed
    assert gone_after <= 2.0 + 1.5, gone_after  # the ttl, plus the stream's expiry granularity
    assert (await ask(stays, "lobby"))["users"] == ["frank"]
    await stays.close()


async def test_key_listings_end_promptly_and_exactly_while_keys_churn(nats_server: NatsServer) -> None:
    """Listing keys (presence queries, the live nodes behind every connect) is
    a snapshot that ends by itself. A KV watcher waited for nats-py's end mark,
    which comes late or never while the bucket changes (nats-io/nats.py#842),
    and then for writes to pause: here listings took seconds, some never
    ended, and one stuck listing of the live nodes held up every connect."""
    import nats
    from nats.js.api import KeyValueConfig, StorageType

    from broker.kv import live_keys

    nc = await nats.connect(nats_server.url)
    stop = asyncio.Event()
    churners: list[asyncio.Task[None]] = []
    try:
        kv = await nc.jetstream().create_key_value(
            KeyValueConfig(bucket=f"churn{next(_clusters)}", history=1, storage=StorageType.MEMORY)
        )
        for key in ("n1.lobby.alice", "n2.lobby.bob", "n1.attic.carol", "n3.lobby.dave"):
            await kv.put(key, b"1")
        await kv.delete("n3.lobby.dave")

        async def churn(i: int) -> None:
            while not stop.is_set():
                await kv.put(f"c{i}.lobby.x", b"1")
                await kv.delete(f"c{i}.lobby.x")
                await asyncio.sleep(0.002)

        churners += [asyncio.create_task(churn(i)) for i in range(5)]
        started = time.monotonic()
        for _ in range(20):
            listings = await asyncio.wait_for(asyncio.gather(*(live_keys(kv, "*.lobby.*") for _ in range(5))), 10)
            for keys in listings:
                # The stable keys, no deleted one; a churning key may or may not be there.
                assert {k for k in keys if not k.startswith("c")} == {"n1.lobby.alice", "n2.lobby.bob"}
        assert time.monotonic() - started < 10
        assert sorted(await live_keys(kv, "n1.*.*")) == ["n1.attic.carol", "n1.lobby.alice"]
    finally:
        stop.set()
        await asyncio.gather(*churners, return_exceptions=True)
        await nc.close()


async def test_a_client_asking_right_after_its_welcome_is_among_the_members(
    node_factory: NodeFactory, http: aiohttp.ClientSession, monkeypatch: Any
) -> None:
    """The node's own users come from what it knows now, not from its KV
    writes, which are queued (here: held back half a second)."""
    node = await node_factory(**cluster())
    presence = node.node.broker.presence
    await wait_for(lambda: presence._acks is not None)
    write = presence._acks.publish

    async def slow(messages: Any) -> Any:
        await asyncio.sleep(0.5)
        return await write(messages)

    monkeypatch.setattr(presence._acks, "publish", slow)
    alice = await open_ws(http, node, "alice", ["lobby"])
    assert (await ask(alice, "lobby"))["users"] == ["alice"]
    bob = await open_ws(http, node, "bob", ["lobby"])
    assert (await ask(bob, "lobby"))["users"] == ["alice", "bob"]
    await alice.close()
    await wait_for(lambda: len(node.node.sessions) == 1)
    assert (await ask(bob, "lobby", "q"))["users"] == ["bob"]
    await bob.close()


# -- a store lost with NATS ------------------------------------------------------

STORE_TTL = 3.0


def announcing(**extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A cluster of memory storage (a restarted NATS has a fresh store) announcing chat-* rooms."""
    return cluster(rooms={"join_leave": ["chat-*"]}, presence={"ttl": STORE_TTL}, **extra)


async def restart_with_a_fresh_store(
    server: NatsServer,
    http: aiohttp.ClientSession,
    nodes: list[RunningNode],
    leaving: list[aiohttp.ClientWebSocketResponse],
) -> None:
    """Kill NATS, close ``leaving`` while it is away, start it again (memory
    storage: every stream and bucket is gone) and wait for every node to be ready."""
    server.kill()
    await wait_for(lambda: not any(n.node.broker.connected for n in nodes), timeout=5)
    for ws in leaving:
        await ws.close()
    await asyncio.sleep(0.3)  # their leaves are queued
    server.start()

    async def ready(node: RunningNode) -> bool:
        async with http.get(node.url + "/readyz") as r:
            return r.status == 200

    for node in nodes:
        await wait_for(lambda: ready(node), timeout=10, interval=0.1)  # noqa: B023


async def test_a_store_lost_with_nats_announces_who_left_meanwhile_and_no_one_else(
    own_nats: NatsServer, node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """NATS restarts with a fresh store, which has lost the join / leave
    markers. Writing its entries back, the node announced everyone still in
    the room joining again, and bob, who left meanwhile, leaving never."""
    node = await node_factory(nats_url=own_nats.url, nats={"reconnect_wait": 0.2}, **announcing())
    observer = await open_ws(http, node, "olga", ["chat-1"])
    alice = await open_ws(http, node, "alice", ["chat-1"])
    bob = await open_ws(http, node, "bob", ["chat-1"])
    joined = presence_frames(await frames_for(observer, 1.0))
    assert sorted(joined) == [("join", "alice"), ("join", "bob"), ("join", "olga")]

    await restart_with_a_fresh_store(own_nats, http, [node], leaving=[bob])
    got = presence_frames(await frames_for(observer, STORE_TTL + 2.0))
    assert got == [("leave", "bob")], got
    assert await api_presence(http, node.url, "chat-1") == (200, {"room": "chat-1", "users": ["alice", "olga"]})

    # Announcements carry on as before: alice's marker is there to take away.
    carl = await open_ws(http, node, "carl", ["chat-1"])
    await alice.close()
    assert sorted(presence_frames(await frames_for(observer, 1.5))) == [("join", "carl"), ("leave", "alice")]
    for ws in (observer, carl):
        await ws.close()


async def test_a_store_lost_with_nats_waits_for_the_other_nodes_before_a_leave(
    own_nats: NatsServer, node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """Two nodes, the second slower to reconnect. Alice's tab on A closed
    while NATS was away, but she is still in the room on B: no leave (nor
    any join); carl's only tab, on A, closed: his leave."""
    shared = announcing()
    a = await node_factory(nats_url=own_nats.url, nats={"reconnect_wait": 0.2}, **shared)
    b = await node_factory(nats_url=own_nats.url, nats={"reconnect_wait": 1.5}, **shared)
    observer = await open_ws(http, a, "olga", ["chat-1"])
    alice_a = await open_ws(http, a, "alice", ["chat-1"])
    alice_b = await open_ws(http, b, "alice", ["chat-1"])
    bob = await open_ws(http, b, "bob", ["chat-1"])
    carl = await open_ws(http, a, "carl", ["chat-1"])
    joined = presence_frames(await frames_for(observer, 1.0))
    assert sorted(joined) == [("join", "alice"), ("join", "bob"), ("join", "carl"), ("join", "olga")]

    await restart_with_a_fresh_store(own_nats, http, [a, b], leaving=[alice_a, carl])
    got = presence_frames(await frames_for(observer, STORE_TTL + 2.0))
    assert got == [("leave", "carl")], got
    assert (await api_presence(http, a.url, "chat-1"))[1]["users"] == ["alice", "bob", "olga"]

    await alice_b.close()
    assert presence_frames(await frames_for(observer, 1.5)) == [("leave", "alice")]
    await bob.close()
    assert presence_frames(await frames_for(observer, 1.5)) == [("leave", "bob")]
    await observer.close()


async def test_a_join_claim_a_close_cut_off_leaves_no_unread_failure(
    own_nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A join's marker claim is shielded from a close (the marker must not be
    separated from its announcement). A close while NATS is away cancels the
    write loop at once; the claim, still waiting on NATS, failed at its
    timeout with nobody to read it: asyncio logged "Task exception was never
    retrieved" once it was collected."""
    config = NatsConfig(
        urls=(own_nats.url,),
        subjects=Subjects("pcut", "pcut_live"),
        stream="PCUT",
        storage="memory",
        join_leave_rooms=("*",),
        publish_timeout=0.3,
        reconnect_wait=0.1,
    )
    broker = NatsBroker(config, broker_events())
    await broker.start()
    kv = broker.presence._kv
    assert kv is not None
    claiming, cut = asyncio.Event(), asyncio.Event()
    create = kv.create

    async def create_once_nats_is_gone(*args: Any, **kwargs: Any) -> int:
        claiming.set()
        await cut.wait()
        return await create(*args, **kwargs)

    kv.create = create_once_nats_is_gone  # type: ignore[method-assign]
    broker.presence.mark(room_channel("lobby"), "alice", True)
    await asyncio.wait_for(claiming.wait(), timeout=5)
    own_nats.kill()
    await wait_for(lambda: not broker.connected, timeout=5)
    cut.set()  # the claim's request now waits for a NATS that does not come back
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        await broker.close()
        await asyncio.sleep(0.6)  # past the claim's timeout
        gc.collect()
    assert not [r.getMessage() for r in caplog.records if r.name == "asyncio"]
