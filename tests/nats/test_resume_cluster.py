"""Resume across a cluster (README: Resume, resets and the inbox): a client
that drops off one node and comes back to another with its last id gets every
message of its channels it missed, in id order, each once, then the live flow
— while publishers keep publishing. A position older than retention (or than
one replay may carry) is announced with a reset, never skipped silently. A
long replay is paced within the backpressure limits.

Two nodes are one cluster when they share the subject prefix and the stream
(and, as the contract requires, the history settings).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import nats
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import Channel
from broker.channels import parse_channel
from broker.embedded import NatsServer
from gateway.session import State

from ..helpers import (
    NodeFactory,
    RawWsClient,
    RunningNode,
    SseClient,
    api_publish,
    held_now,
    recv_json,
    scrape,
    token,
    wait_for,
)

# Enough room that the resume tests never hit retention by accident.
ROOMY = {"room_max": 2000, "user_max": 2000}


def cluster_sections(**sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Settings sections that put every node started with them in one cluster."""
    tag = "rc" + uuid.uuid4().hex[:10]
    stream = {"name": tag.upper(), "storage": "memory", **sections.pop("stream", {})}
    return {"subject": {"prefix": tag}, "stream": stream, **sections}


async def start_cluster(node_factory: NodeFactory, n: int = 2, **sections: dict[str, Any]) -> list[RunningNode]:
    shared = cluster_sections(**sections)
    return [await node_factory(**shared) for _ in range(n)]


def tag() -> str:
    return uuid.uuid4().hex[:8]


# -- publishing ----------------------------------------------------------------


@dataclass
class Published:
    """Every message published in a scenario: id → (channel, data)."""

    by_id: dict[int, tuple[str, Any]] = field(default_factory=dict)

    def ids_on(self, channels: Sequence[str], after: int) -> list[int]:
        wanted = set(channels)
        return sorted(i for i, (ch, _) in self.by_id.items() if ch in wanted and i > after)


async def publish(http: aiohttp.ClientSession, node: RunningNode, channel: str, data: Any) -> int:
    return int(await api_publish(http, node, channel, data))


async def publish_many(
    http: aiohttp.ClientSession,
    nodes: Sequence[RunningNode],
    channels: Sequence[str],
    log: Published,
    label: str,
    gap: float = 0.0,
    concurrency: int = 16,
) -> None:
    """Publish one message per entry of ``channels`` through the HTTP API of
    the nodes in turn (``concurrency`` at a time, or one by one with ``gap``)."""

    async def one(i: int, channel: str) -> None:
        data = {"label": label, "i": i, "channel": channel}
        log.by_id[await publish(http, nodes[i % len(nodes)], channel, data)] = (channel, data)

    if gap:
        for i, channel in enumerate(channels):
            await one(i, channel)
            await asyncio.sleep(gap)
        return
    for start in range(0, len(channels), concurrency):
        await asyncio.gather(*(one(start + j, ch) for j, ch in enumerate(channels[start : start + concurrency])))


async def js_flood(nats_url: str, subject: str, payloads: Sequence[bytes]) -> list[int]:
    """JetStream-publish ``payloads`` to an input subject as a backend would,
    pipelined; returns the stream ids, in order."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream(timeout=20)
        ids: list[int] = []
        for start in range(0, len(payloads), 1000):
            futures = [await js.publish_async(subject, p) for p in payloads[start : start + 1000]]
            ids.extend(int(ack.seq) for ack in await asyncio.gather(*futures))
        return ids
    finally:
        await nc.close()


# -- a subscriber's view -------------------------------------------------------


def client_channel(channel: str) -> str:
    return "user" if channel.startswith("user:") else channel


@dataclass
class User:
    """A user with two rooms, and the channels it must never see."""

    name: str
    rooms: list[str]
    foreign: list[str]

    @classmethod
    def make(cls) -> User:
        t = tag()
        return cls(f"u{t}", [f"r{t}a", f"r{t}b"], [f"room:o{t}", f"user:x{t}"])

    @property
    def own(self) -> list[str]:
        return [*(f"room:{r}" for r in self.rooms), f"user:{self.name}", "broadcast"]

    def token(self) -> str:
        return token(self.name, rooms=self.rooms)

    def params(self, **extra: str) -> list[tuple[str, str]]:
        return [("token", self.token()), *(("room", r) for r in self.rooms), *extra.items()]


async def ws_messages_until(
    ws: aiohttp.ClientWebSocketResponse, last_id: int, frames: list[dict[str, Any]], timeout: float = 15.0
) -> None:
    """Append every frame to ``frames`` until the message with ``last_id``."""
    async with asyncio.timeout(timeout):
        while True:
            frame = await recv_json(ws, timeout)
            frames.append(frame)
            if frame.get("type") == "message" and int(frame["id"]) == last_id:
                return


async def assert_ws_quiet(ws: aiohttp.ClientWebSocketResponse, wait: float = 0.2) -> None:
    """Nothing more arrives (a late duplicate would)."""
    try:
        msg = await ws.receive(timeout=wait)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected frame after the end: {msg.type} {msg.data!r}")


async def sse_events_until(sse: SseClient, last_id: int, events: list[Any], timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            ev = await sse.next(timeout)
            events.append(ev)
            if ev.id is not None and int(ev.id) == last_id:
                return


async def stop_when_seen(reader: asyncio.Future[None], seen: Callable[[], bool], timeout: float = 15.0) -> None:
    """Wait until ``seen()``; a reader that failed meanwhile raises its error."""
    await wait_for(lambda: reader.done() or seen(), timeout=timeout)
    if reader.done():
        reader.result()
    reader.cancel()
    await asyncio.wait([reader])


@contextlib.asynccontextmanager
async def in_background(coro: Awaitable[None]) -> AsyncIterator[asyncio.Future[None]]:
    """Run ``coro`` alongside the block; cancelled (and waited for) at its end."""
    task = asyncio.ensure_future(coro)
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.wait([task])


async def session_open(node: RunningNode, user: str) -> bool:
    return any(s.user == user and s.state is State.OPEN for s in node.node.sessions)


def check_resumed(
    ids: list[int], datas: list[Any], channels: list[str | None], log: Published, expected: list[int]
) -> None:
    """The core property: strictly increasing, no duplicates, exactly the
    expected ids, each with the payload (and channel) it was published with."""
    assert ids == sorted(set(ids)), f"not strictly increasing / duplicates: {ids}"
    missing = sorted(set(expected) - set(ids))
    extra = sorted(set(ids) - set(expected))
    assert not missing and not extra, f"missing {missing}, unexpected {extra}"
    for i, data, channel in zip(ids, datas, channels, strict=True):
        published_channel, published_data = log.by_id[i]
        assert data == published_data, (i, data, published_data)
        if channel is not None:
            assert channel == client_channel(published_channel), (i, channel, published_channel)


# -- 1. WebSocket: live on A, drop, missed + concurrent publishing, resume on B --


async def ws_resume_scenario(
    http: aiohttp.ClientSession,
    a: RunningNode,
    b: RunningNode,
    *,
    k: int,
    missed: int,
    concurrent: int,
    pause: float,
    gap: float,
    rng: random.Random,
    bystander: bool = False,
) -> tuple[User, Published, int]:
    """Live on node A, drop, ``missed`` published, reconnect to node B with
    the last id while ``concurrent`` more are published (starting ``pause``
    before the reconnect, ``gap`` apart). With ``bystander``, another user in
    the same rooms stays connected to node B throughout (so B already holds
    the rooms' subscriptions when the client comes back) and must itself get
    every room and broadcast message once, in order."""
    user = User.make()
    log = Published()
    nodes = [a, b]

    # Live on node A: ids 1..k of this user's channels, as they are published.
    ws = await http.ws_connect(a.ws_url, params=user.params())
    welcome = await recv_json(ws)
    assert welcome["type"] == "welcome" and welcome["node"] == a.node.id
    await publish_many(http, nodes, [user.own[i % 4] for i in range(k)], log, "live")
    live = log.ids_on(user.own, 0)
    frames: list[dict[str, Any]] = []
    await ws_messages_until(ws, live[-1], frames)
    assert [int(f["id"]) for f in frames] == live
    since = live[-1]
    await ws.close()

    other: aiohttp.ClientWebSocketResponse | None = None
    other_frames: list[dict[str, Any]] = []
    if bystander:
        other = await http.ws_connect(
            b.ws_url, params=[("token", token(f"x{user.name}", rooms=user.rooms)), *(("room", r) for r in user.rooms)]
        )
        assert (await recv_json(other))["type"] == "welcome"

    # Missed while away: a mix of its channels and others', through both nodes.
    mix = user.own + user.foreign
    await publish_many(http, nodes, [rng.choice(mix) for _ in range(missed)], log, "missed")

    # A publisher keeps going while the client reconnects to node B and replays.
    concurrently = publish_many(http, nodes, [rng.choice(mix) for _ in range(concurrent)], log, "concurrent", gap=gap)
    async with in_background(concurrently) as publisher:
        await asyncio.sleep(pause)
        ws = await http.ws_connect(b.ws_url, params=user.params(since=str(since)))
        welcome = await recv_json(ws)
        assert welcome["type"] == "welcome" and welcome["node"] == b.node.id
        frames = []
        async with in_background(ws_messages_until(ws, 2**62, frames)) as reader:
            await publisher
            # Then live: a marker published after everything else ends the check.
            room = f"room:{user.rooms[0]}"
            marker = await publish(http, rng.choice(nodes), room, {"label": "marker"})
            log.by_id[marker] = (room, {"label": "marker"})
            await stop_when_seen(reader, lambda: any(f.get("id") == str(marker) for f in frames))
    await assert_ws_quiet(ws)
    await ws.close()

    assert all(f["type"] == "message" for f in frames), [f for f in frames if f["type"] != "message"]
    check_resumed(
        [int(f["id"]) for f in frames],
        [f["data"] for f in frames],
        [f["channel"] for f in frames],
        log,
        log.ids_on(user.own, since),
    )

    if other is not None:
        shared = [*(f"room:{r}" for r in user.rooms), "broadcast"]
        await ws_messages_until(other, marker, other_frames)
        await assert_ws_quiet(other)
        await other.close()
        check_resumed(
            [int(f["id"]) for f in other_frames],
            [f["data"] for f in other_frames],
            [f["channel"] for f in other_frames],
            log,
            log.ids_on(shared, since),
        )
    return user, log, since


@pytest.fixture
async def pair(node_factory: NodeFactory) -> list[RunningNode]:
    return await start_cluster(node_factory, history=ROOMY)


@pytest.mark.parametrize("bystander", [False, True], ids=["alone", "bystander"])
async def test_ws_resume_on_other_node_200_missed_while_publishing(
    pair: list[RunningNode], http: aiohttp.ClientSession, bystander: bool
) -> None:
    a, b = pair
    user, log, since = await ws_resume_scenario(
        http, a, b, k=3, missed=200, concurrent=60, pause=0.005, gap=0.001, rng=random.Random(200), bystander=bystander
    )
    # Node B replayed at least every missed message of the user's channels
    # (published before it reconnected), at most all of them since `since`.
    missed_own = [i for i in log.ids_on(user.own, since) if log.by_id[i][1]["label"] == "missed"]
    metrics = await scrape(http, b.url)
    assert len(missed_own) <= metrics["herald_replayed_messages_total"] <= len(log.ids_on(user.own, since))
    assert metrics.get('herald_resets_total{reason="history"}', 0) == 0


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    k=st.integers(1, 6),
    missed=st.integers(0, 150),
    concurrent=st.integers(0, 40),
    pause=st.sampled_from([0.0, 0.002, 0.01, 0.03]),
    gap=st.sampled_from([0.0, 0.001, 0.003]),
    rng=st.randoms(use_true_random=False),
    bystander=st.booleans(),
)
async def test_ws_resume_property(
    pair: list[RunningNode],
    http: aiohttp.ClientSession,
    k: int,
    missed: int,
    concurrent: int,
    pause: float,
    gap: float,
    rng: random.Random,
    bystander: bool,
) -> None:
    # Each example uses a fresh user and rooms, so the cluster is shared.
    a, b = pair
    await ws_resume_scenario(
        http, a, b, k=k, missed=missed, concurrent=concurrent, pause=pause, gap=gap, rng=rng, bystander=bystander
    )


# -- 2. SSE: the same, resuming with Last-Event-ID on the other node -------------


async def test_sse_resume_on_other_node_with_last_event_id(
    pair: list[RunningNode], http: aiohttp.ClientSession
) -> None:
    a, b = pair
    rng = random.Random(7)
    user = User.make()
    log = Published()
    nodes = [a, b]

    resp = await http.get(a.url + "/sse", params=user.params())
    assert resp.status == 200
    sse = SseClient(resp)
    await wait_for(lambda: session_open(a, user.name))
    await publish_many(http, nodes, user.own * 2, log, "live")
    live = log.ids_on(user.own, 0)
    events: list[Any] = []
    await sse_events_until(sse, live[-1], events)
    assert [int(e.id) for e in events] == live
    last_event_id = events[-1].id  # what EventSource remembers
    resp.close()

    mix = user.own + user.foreign
    await publish_many(http, nodes, [rng.choice(mix) for _ in range(200)], log, "missed")
    concurrently = publish_many(http, nodes, [rng.choice(mix) for _ in range(60)], log, "concurrent", gap=0.001)
    async with in_background(concurrently) as publisher:
        await asyncio.sleep(0.005)
        resp = await http.get(b.url + "/sse", params=user.params(), headers={"Last-Event-ID": last_event_id})
        assert resp.status == 200
        sse = SseClient(resp)
        events = []
        async with in_background(sse_events_until(sse, 2**62, events)) as reader:
            await publisher
            marker = await publish(http, a, "broadcast", {"label": "marker"})
            log.by_id[marker] = ("broadcast", {"label": "marker"})
            await stop_when_seen(reader, lambda: any(e.id == str(marker) for e in events))
    # Nothing after the marker (a late duplicate would show here).
    with pytest.raises(TimeoutError):
        await sse.next(timeout=0.2)
    resp.close()

    assert all(e.event == "message" and e.id is not None for e in events), [e for e in events if e.id is None]
    check_resumed(
        [int(e.id) for e in events],
        [e.json() for e in events],
        [None] * len(events),
        log,
        log.ids_on(user.own, int(last_event_id)),
    )


# -- 3. Older than retention, more than one replay carries: reset, then the newest


async def ws_resume_frames(
    http: aiohttp.ClientSession, node: RunningNode, user: User, since: int, until: int
) -> tuple[dict[str, Any], list[dict[str, Any]], aiohttp.ClientWebSocketResponse]:
    ws = await http.ws_connect(node.ws_url, params=user.params(since=str(since)))
    welcome = await recv_json(ws)
    frames: list[dict[str, Any]] = []
    await ws_messages_until(ws, until, frames)
    return welcome, frames, ws


async def position(http: aiohttp.ClientSession, node: RunningNode, user: User) -> int:
    """A position the user had reached: the id of a message to its first room."""
    return await publish(http, node, f"room:{user.rooms[0]}", {"label": "seen"})


async def test_ws_room_max_reset_then_newest_then_live(node_factory: NodeFactory, http: aiohttp.ClientSession) -> None:
    a, b = await start_cluster(node_factory, history={"room_max": 5})
    user = User.make()
    room = f"room:{user.rooms[0]}"
    since = await position(http, a, user)
    ids = [await publish(http, (a, b)[i % 2], room, {"n": i}) for i in range(12)]

    welcome, frames, ws = await ws_resume_frames(http, b, user, since, ids[-1])
    assert welcome["type"] == "welcome"
    assert frames[0]["type"] == "reset" and frames[0]["channel"] == room and frames[0]["reason"]
    assert [int(f["id"]) for f in frames[1:]] == ids[-5:]
    assert [f["data"]["n"] for f in frames[1:]] == list(range(7, 12))
    live = await publish(http, a, room, {"n": "live"})
    frame = await recv_json(ws)
    assert frame["type"] == "message" and int(frame["id"]) == live
    await assert_ws_quiet(ws)

    metrics = await scrape(http, b.url)
    assert metrics['herald_resets_total{reason="history"}'] == 1
    assert metrics["herald_replayed_messages_total"] == 5
    await ws.close()


@pytest.mark.parametrize("via", ["Last-Event-ID", "since"])
async def test_sse_room_max_reset_is_first_event(
    node_factory: NodeFactory, http: aiohttp.ClientSession, via: str
) -> None:
    a, b = await start_cluster(node_factory, history={"room_max": 5})
    user = User.make()
    room = f"room:{user.rooms[1]}"
    since = await position(http, a, user)
    ids = [await publish(http, a, room, {"n": i}) for i in range(12)]

    if via == "since":
        resp = await http.get(b.url + "/sse", params=user.params(since=str(since)))
    else:
        resp = await http.get(b.url + "/sse", params=user.params(), headers={"Last-Event-ID": str(since)})
    sse = SseClient(resp)
    first = await sse.next()
    assert first.event == "reset" and first.id is None
    assert first.json()["type"] == "reset" and first.json()["channel"] == room
    got = [await sse.next() for _ in range(5)]
    assert [int(e.id) for e in got] == ids[-5:]
    live = await publish(http, b, room, {"n": "live"})
    ev = await sse.next()
    assert int(ev.id) == live and ev.json() == {"n": "live"}
    resp.close()


async def test_ws_retention_per_channel_mixed(node_factory: NodeFactory, http: aiohttp.ClientSession) -> None:
    """Each channel is cut by its own family limit: a reset for each channel
    cut (the user channel is called ``user``), none for the others, and the
    kept messages of all channels interleaved in id order."""
    a, b = await start_cluster(node_factory, history={"room_max": 5, "user_max": 3})
    user = User.make()
    cut_room, whole_room, me = f"room:{user.rooms[0]}", f"room:{user.rooms[1]}", f"user:{user.name}"
    since = await position(http, a, user)
    plan = [cut_room] * 12 + [me] * 5 + [whole_room] * 2 + ["broadcast"] * 3 + user.foreign * 4
    random.Random(3).shuffle(plan)
    log = Published()
    await publish_many(http, [a, b], plan, log, "missed", concurrency=1)

    kept = sorted(
        [
            *log.ids_on([cut_room], since)[-5:],
            *log.ids_on([me], since)[-3:],
            *log.ids_on([whole_room, "broadcast"], since),
        ]
    )
    welcome, frames, ws = await ws_resume_frames(http, b, user, since, kept[-1])
    assert welcome["type"] == "welcome"
    resets = [f for f in frames if f["type"] == "reset"]
    assert frames[: len(resets)] == resets, "resets come before any replayed message"
    assert sorted(f["channel"] for f in resets) == sorted([cut_room, "user"])
    messages = frames[len(resets) :]
    assert [int(f["id"]) for f in messages] == kept
    assert [f["channel"] for f in messages] == [client_channel(log.by_id[i][0]) for i in kept]
    await assert_ws_quiet(ws)
    await ws.close()


async def test_ws_room_max_age_reset(node_factory: NodeFactory, http: aiohttp.ClientSession) -> None:
    a, b = await start_cluster(node_factory, history={"room_max_age": 1.0})
    user = User.make()
    room = f"room:{user.rooms[0]}"
    since = await position(http, a, user)
    old = [await publish(http, a, room, {"n": i}) for i in range(3)]
    await asyncio.sleep(1.3)
    fresh = [await publish(http, a, room, {"n": i}) for i in range(3, 5)]
    _, frames, ws = await ws_resume_frames(http, b, user, since, fresh[-1])
    assert frames[0] == {"type": "reset", "channel": room, "reason": frames[0]["reason"]}
    assert [int(f["id"]) for f in frames[1:]] == fresh, old
    await ws.close()


async def test_ws_replay_max_keeps_newest_and_resets_cut_channels(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    a, b = await start_cluster(node_factory, history={"replay_max": 7})
    user = User.make()
    r1, r2 = (f"room:{r}" for r in user.rooms)
    since = await position(http, a, user)
    # Oldest first: r1 three times, then interleaved; the newest 7 hold r2 and one r1.
    plan = [r1, r1, r1, r2, r2, r1, r2, r2, r2, r2]
    log = Published()
    await publish_many(http, [a, b], plan, log, "missed", concurrency=1)
    everything = log.ids_on([r1, r2], since)
    kept = everything[-7:]

    welcome, frames, ws = await ws_resume_frames(http, b, user, since, kept[-1])
    assert welcome["type"] == "welcome"
    assert [(f["type"], f["channel"]) for f in frames[:1]] == [("reset", r1)]
    assert [int(f["id"]) for f in frames[1:]] == kept
    live = await publish(http, a, r2, "live")
    assert int((await recv_json(ws))["id"]) == live
    metrics = await scrape(http, b.url)
    assert metrics['herald_resets_total{reason="history"}'] == 1
    assert metrics["herald_replayed_messages_total"] == 7
    await ws.close()


async def evict_from_stream(http: aiohttp.ClientSession, node: RunningNode, user: User) -> None:
    """Fill a small stream (``stream.max_bytes``) through another room, so
    that everything published before is evicted."""
    padding = "x" * 2000  # 60 x 2 KB: about twice the cap
    await publish_many(http, [node], [user.foreign[0]] * 60, Published(), padding)


SMALL_STREAM = {"max_bytes": 64 * 1024}


async def test_ws_position_older_than_stream_resets(node_factory: NodeFactory, http: aiohttp.ClientSession) -> None:
    """The stream itself dropped what followed the position (its size cap):
    the channels that lost messages get a reset before anything else, then
    what is still held, then live."""
    a, b = await start_cluster(node_factory, stream=SMALL_STREAM)
    user = User.make()
    r1, r2, me = f"room:{user.rooms[0]}", f"room:{user.rooms[1]}", f"user:{user.name}"
    since = await position(http, a, user)
    log = Published()
    await publish_many(http, [a, b], [r1, r1, me], log, "lost", concurrency=1)
    await evict_from_stream(http, a, user)
    await publish_many(http, [a, b], [r2, "broadcast"], log, "kept", concurrency=1)
    kept = log.ids_on([r2, "broadcast"], since)

    welcome, frames, ws = await ws_resume_frames(http, b, user, since, kept[-1])
    assert welcome["type"] == "welcome"
    resets = [f for f in frames if f["type"] == "reset"]
    assert frames[: len(resets)] == resets
    assert {r1, "user"} <= {f["channel"] for f in resets}
    assert [int(f["id"]) for f in frames[len(resets) :]] == kept
    live = await publish(http, a, r1, "live")
    assert int((await recv_json(ws))["id"]) == live
    await ws.close()


async def test_subscribe_since_older_than_stream_resets(node_factory: NodeFactory, http: aiohttp.ClientSession) -> None:
    """``subscribe {room, since}`` after the stream dropped every message of
    the room: a reset, then the ack. (Regression: at 7d10526 the one-channel
    direct-get shortcut found no message, took it for "nothing after the
    position", and acked with no reset: silent loss.)"""
    a, b = await start_cluster(node_factory, stream=SMALL_STREAM)
    user = User.make()
    room = f"room:{user.rooms[1]}"
    since = await position(http, a, user)
    await publish_many(http, [a], [room] * 3, Published(), "lost", concurrency=1)
    await evict_from_stream(http, a, user)

    ws = await http.ws_connect(b.ws_url, params=[("token", user.token())])
    assert (await recv_json(ws))["type"] == "welcome"
    await ws.send_json({"type": "subscribe", "room": user.rooms[1], "since": str(since), "ref": "s"})
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while not frames or frames[-1]["type"] not in ("ack", "error"):
            frames.append(await recv_json(ws))
    await ws.close()
    assert frames[-1] == {"type": "ack", "ref": "s", "channel": room}
    assert [(f["type"], f.get("channel")) for f in frames[:-1]] == [("reset", room)], frames


# -- subscribe {room, since} mid-connection --------------------------------------


async def test_subscribe_since_quiet(pair: list[RunningNode], http: aiohttp.ClientSession) -> None:
    """``subscribe {room, since}`` on an open connection to the other node:
    the room's missed messages (nothing of the rooms not asked for), then the
    ack, then its live ones."""
    a, b = pair
    user = User.make()
    room = f"room:{user.rooms[1]}"
    log = Published()
    since = await publish(http, a, room, "seen")
    await publish_many(http, [a, b], [room, *user.own, *user.foreign] * 3, log, "missed")
    ws = await http.ws_connect(b.ws_url, params=[("token", user.token()), ("room", user.rooms[0])])
    welcome = await recv_json(ws)
    assert welcome["type"] == "welcome" and welcome["unread"] == 3  # its user channel's, sent as the inbox
    await ws.send_json({"type": "subscribe", "room": user.rooms[1], "since": str(since), "ref": "s"})
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while not frames or frames[-1]["type"] != "ack":
            frames.append(await recv_json(ws))
    assert frames[-1] == {"type": "ack", "ref": "s", "channel": room}
    inbox = [f for f in frames[:-1] if f["channel"] == "user"]
    assert [int(f["id"]) for f in inbox] == log.ids_on([f"user:{user.name}"], since)
    replayed = [f for f in frames[:-1] if f["channel"] != "user"]
    assert [int(f["id"]) for f in replayed] == log.ids_on([room], since)
    assert all(f["channel"] == room for f in replayed)
    live = await publish(http, a, room, "live")
    assert int((await recv_json(ws))["id"]) == live
    await assert_ws_quiet(ws)
    await ws.close()


async def test_subscribe_since_with_message_during_join(
    pair: list[RunningNode], http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same when a message is published while the room is being joined:
    it must still come once, in id order. (Regression: at 7d10526 the room
    was joined before live deliveries were held, and such a message came
    first and again in the replay: [22, 2, 3, ..., 21, 22, 23]. Without the
    hook below, a backend flooding the room hit that window in about one
    subscribe of five.)"""
    a, b = pair
    user = User.make()
    room = f"room:{user.rooms[1]}"
    log = Published()
    since = await publish(http, a, room, "seen")
    await publish_many(http, [a, b], [room] * 20, log, "missed")

    broker = b.node.broker
    join = broker.pubsub.want

    channel = parse_channel(room)

    async def want_while_publishing(wanted: Channel) -> None:
        # The node's subscription is in place: a message published now is
        # live for it. Let it arrive before the join returns. (Published
        # through the node's own NATS connection, so that it reaches the
        # server after the SUB: nats-py's flush() may overtake a pending SUB.)
        await join(wanted)
        if wanted == room:
            before = broker.stats().messages_received
            data = {"label": "during-join"}
            log.by_id[await broker.pubsub.publish(channel, orjson.dumps(data))] = (room, data)
            await wait_for(lambda: broker.stats().messages_received > before)

    monkeypatch.setattr(broker.pubsub, "want", want_while_publishing)
    ws = await http.ws_connect(b.ws_url, params=[("token", user.token()), ("room", user.rooms[0])])
    assert (await recv_json(ws))["type"] == "welcome"
    await ws.send_json({"type": "subscribe", "room": user.rooms[1], "since": str(since), "ref": "s"})
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while not frames or frames[-1]["type"] not in ("ack", "error"):
            frames.append(await recv_json(ws))
    assert frames[-1] == {"type": "ack", "ref": "s", "channel": room}
    marker = await publish(http, a, room, "marker")
    log.by_id[marker] = (room, "marker")
    await ws_messages_until(ws, marker, frames)
    await assert_ws_quiet(ws)
    await ws.close()

    messages = [f for f in frames if f["type"] == "message"]
    check_resumed(
        [int(f["id"]) for f in messages],
        [f["data"] for f in messages],
        [f["channel"] for f in messages],
        log,
        log.ids_on([room], since),
    )


# -- 4. A 10,000-message replay within a small queue -----------------------------

BIG = 10_000
SMALL_QUEUE = {"max_bytes": 256 * 1024, "max_messages": 500, "write_buffer": 64 * 1024}


def big_payloads(n: int) -> list[bytes]:
    pad = "x" * 300
    return [orjson.dumps({"n": i, "pad": pad}) for i in range(n)]


async def test_replay_10000_paced_no_slow_consumer(
    node_factory: NodeFactory, nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    a, b = await start_cluster(node_factory, history={"room_max": BIG, "replay_max": BIG}, backpressure=SMALL_QUEUE)
    user = User.make()
    subject = f"{a.settings.subject.prefix}.room.{user.rooms[0]}"
    ids = await js_flood(nats_server.url, subject, big_payloads(BIG + 1))
    since, expected = ids[0], ids[1:]
    assert len(expected) == BIG and expected == sorted(expected)

    peak = 0.0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, held_now(b.node))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    started = time.perf_counter()
    ws = await http.ws_connect(b.ws_url, params=user.params(since=str(since)), max_msg_size=0)
    assert (await recv_json(ws))["type"] == "welcome"
    got: list[int] = []
    ns: list[int] = []
    async with asyncio.timeout(60):
        while len(got) < BIG:
            frame = await recv_json(ws, timeout=20)
            assert frame["type"] == "message", frame
            got.append(int(frame["id"]))
            ns.append(frame["data"]["n"])
    elapsed = time.perf_counter() - started
    watcher.cancel()
    print(
        f"\nreplay of {BIG} messages ({len(big_payloads(1)[0])} B payload): {elapsed:.2f} s, "
        f"{BIG / elapsed:,.0f} msg/s; peak node queue {peak / 1024:.0f} KiB"
    )

    assert got == expected
    assert ns == list(range(1, BIG + 1))
    # Still connected, and live flows after the replay.
    live = await publish(http, a, f"room:{user.rooms[0]}", "live")
    assert int((await recv_json(ws))["id"]) == live
    metrics = await scrape(http, b.url)
    assert metrics['herald_slow_consumer_disconnects_total{transport="ws"}'] == 0
    assert metrics["herald_replayed_messages_total"] == BIG
    assert metrics.get('herald_resets_total{reason="history"}', 0) == 0
    # Paced: the node never held more than the queue limit for this client.
    assert peak <= SMALL_QUEUE["max_bytes"], peak
    await ws.close()


@pytest.mark.parametrize(
    "rate",
    [
        50,
        2000,
    ],
)
async def test_replay_10000_while_room_stays_busy(
    node_factory: NodeFactory, nats_server: NatsServer, rate: int
) -> None:
    """The 10,000-message replay while the room keeps getting ``rate`` live
    messages a second: all replayed, then the live ones, once each, in order."""
    node = await node_factory(history={"room_max": 2 * BIG, "replay_max": 2 * BIG}, backpressure=SMALL_QUEUE)
    user = User.make()
    subject = f"{node.settings.subject.prefix}.room.{user.rooms[0]}"
    ids = await js_flood(nats_server.url, subject, big_payloads(BIG + 1))
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    live: list[int] = []
    stop = asyncio.Event()

    async def keep_publishing() -> None:
        burst = max(1, rate // 100)
        while not stop.is_set():
            acks = await asyncio.gather(*(js.publish(subject, b'{"live":1}') for _ in range(burst)))
            live.extend(int(ack.seq) for ack in acks)
            await asyncio.sleep(0.01)

    got: list[int] = []
    closed: str | None = None
    async with aiohttp.ClientSession() as http, in_background(keep_publishing()) as publisher:
        ws = await http.ws_connect(node.ws_url, params=user.params(since=str(ids[0])), max_msg_size=0)
        async with asyncio.timeout(60):
            while len(got) < BIG:
                msg = await ws.receive(timeout=20)
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    closed = f"closed {ws.close_code} after {len(got)} messages"
                    break
                frame = orjson.loads(msg.data)
                if frame["type"] == "message":
                    got.append(int(frame["id"]))
            stop.set()
            await publisher
            if closed is None:
                while not got or got[-1] < live[-1]:
                    got.append(int((await recv_json(ws))["id"]))
        await ws.close()
    await nc.close()
    assert closed is None, closed
    assert got == ids[1:] + live, "not every message once, in order"


async def raw_ws(url: str, rcvbuf: int = 4096) -> RawWsClient:
    """A WebSocket on a plain socket whose reader buffers little: when the test
    stops reading, the peer really cannot send (helpers.RawWsClient buffers 1 MiB)."""
    client = await RawWsClient.connect(url, rcvbuf)
    client.reader._limit = 2048  # pauses the transport past 4 KiB unread
    return client


async def test_replay_to_slow_reader_is_paced_not_cut(
    node_factory: NodeFactory, nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    """A reader with a tiny receive window that stops reading now and then:
    the replay waits for it instead of queueing ahead and cutting it off 4008."""
    node = await node_factory(history={"room_max": BIG, "replay_max": BIG}, backpressure=SMALL_QUEUE)
    user = User.make()
    count = 4000
    subject = f"{node.settings.subject.prefix}.room.{user.rooms[0]}"
    ids = await js_flood(nats_server.url, subject, big_payloads(count + 1))
    client = await raw_ws(f"{node.ws_url}?token={user.token()}&room={user.rooms[0]}&since={ids[0]}")
    peak = 0.0
    got: list[int] = []
    try:
        opcode, payload = await client.frame()
        assert opcode == 1 and orjson.loads(payload)["type"] == "welcome"
        while len(got) < count:
            if len(got) % 1000 == 100:
                # Stop reading: the node must wait for room, not overflow.
                for _ in range(10):
                    await asyncio.sleep(0.03)
                    peak = max(peak, held_now(node.node))
            opcode, payload = await client.frame(timeout=10)
            assert opcode == 1, (opcode, payload[:2])
            frame = orjson.loads(payload)
            assert frame["type"] == "message", frame
            got.append(int(frame["id"]))
    finally:
        client.close()
    assert got == ids[1:]
    print(f"\nslow reader: peak node queue {peak / 1024:.0f} KiB")
    # The node held some of it while the reader paused, never more than the queue limit.
    assert 0 < peak <= SMALL_QUEUE["max_bytes"], peak
    metrics = await scrape(http, node.url)
    assert metrics['herald_slow_consumer_disconnects_total{transport="ws"}'] == 0
    assert metrics["herald_replayed_messages_total"] == count
