"""Gap repair on a real nats-server: a node that misses live messages (its
NATS connection dropped, or deliveries lost at the NATS level) fetches them
back from the stream, so its clients still see every sequence of their
channels exactly once and in order; what cannot be repaired is a reset
frame, never a silent loss (README: Resume, resets and the inbox)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from broker import BrokerUnavailable
from broker.embedded import NatsServer
from broker.jetstream import NatsBroker

from ..helpers import RunningNode, api_publish, recv_json, scrape, token, wait_for

# -- a TCP proxy that can cut the node off NATS ----------------------------------


class TcpProxy:
    """Forwards TCP connections to ``upstream``. ``cut()`` aborts every current
    connection and refuses new ones (accept, then abort) until ``restore()``."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.refusing = False
        self.accepted = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        if self.refusing:  # cut while connecting upstream
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self.accepted += 1
        self._writers |= {writer, up_writer}
        pumps = [
            asyncio.ensure_future(self._pump(reader, up_writer, writer)),
            asyncio.ensure_future(self._pump(up_reader, writer, up_writer)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._tasks.difference_update(pumps)
            self._writers -= {writer, up_writer}

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, other: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            dst.transport.abort()
            other.transport.abort()

    def cut(self) -> None:
        self.refusing = True
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.refusing = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.sleep(0)


@pytest.fixture
async def proxy(nats_server: NatsServer) -> AsyncIterator[TcpProxy]:
    p = TcpProxy(nats_server.host, nats_server.port)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


# -- helpers ----------------------------------------------------------------------


def cluster(storage: str = "memory") -> dict[str, dict[str, Any]]:
    """Settings sections shared by the nodes of one test-private cluster."""
    tag = uuid.uuid4().hex[:10]
    return {"subject": {"prefix": f"gap{tag}"}, "stream": {"name": f"GAP{tag.upper()}", "storage": storage}}


async def publish(http: aiohttp.ClientSession, node: RunningNode, channel: str, data: Any) -> int:
    return int(await api_publish(http, node, channel, data))


async def receive(ws: aiohttp.ClientWebSocketResponse, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The next ``n`` frames (of any type)."""
    return [await recv_json(ws, timeout) for _ in range(n)]


async def quiet(ws: aiohttp.ClientWebSocketResponse, seconds: float = 0.3) -> None:
    """Nothing more arrives for ``seconds``."""
    try:
        frame = await recv_json(ws, seconds)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected frame {frame}")


def ids(frames: list[dict[str, Any]]) -> list[int]:
    bad = [f for f in frames if f["type"] != "message"]
    assert not bad, f"expected only messages, got {bad}"
    return [int(f["id"]) for f in frames]


async def open_ws(
    http: aiohttp.ClientSession, node: RunningNode, user: str, rooms: list[str]
) -> aiohttp.ClientWebSocketResponse:
    params = [("token", token(user)), *(("room", r) for r in rooms)]
    ws = await http.ws_connect(node.ws_url, params=params)
    welcome = await recv_json(ws)
    assert welcome["type"] == "welcome", welcome
    return ws


class Dropper:
    """White-box: drops live deliveries of chosen channels at the nats-py client
    level (as if NATS had dropped them), by wrapping the subscription's handler
    in ``DispatchingClient._handlers``."""

    def __init__(self, node: RunningNode) -> None:
        self.broker = nats_broker(node)
        self.dropping: set[str] = set()
        self.dropped: dict[str, int] = {}
        # channel → predicate on the n-th delivery seen (1-based): drop it if true
        self.pattern: dict[str, Callable[[int], bool]] = {}

    def wrap(self, channel: str) -> None:
        """Drop ``channel``'s deliveries while it is in ``dropping`` or its
        ``pattern`` says so."""
        nc = self.broker._link.nc
        assert nc is not None
        sid = self.broker.pubsub._subs[channel]._id
        original = nc._handlers[sid]
        seen = [0]

        def handler(subject: bytes, data: bytes, headers: dict[str, str] | None) -> None:
            seen[0] += 1
            pattern = self.pattern.get(channel)
            if channel in self.dropping or (pattern is not None and pattern(seen[0])):
                self.dropped[channel] = self.dropped.get(channel, 0) + 1
                return
            original(subject, data, headers)

        nc._handlers[sid] = handler


async def a_repair_held(
    http: aiohttp.ClientSession, node: RunningNode, publisher: RunningNode, channel: str
) -> tuple[int, int, asyncio.Event]:
    """Hold ``node``'s repair fetches (a slow stream read), lose one live
    message of ``channel`` there, and publish (through ``publisher``) the one
    that reveals the gap: (the lost id, the revealing id, the event that lets
    the repair go)."""
    sequencer = nats_broker(node).pubsub.sequencer
    real_fetch = sequencer._fetch
    go = asyncio.Event()

    async def slow_fetch(channels: Any, after: int, limit: int) -> Any:
        await go.wait()
        return await real_fetch(channels, after, limit)

    sequencer._fetch = slow_fetch
    dropper = Dropper(node)
    dropper.wrap(channel)
    dropper.dropping.add(channel)
    missed = await publish(http, publisher, channel, 1)
    await wait_for(lambda: dropper.dropped.get(channel, 0) == 1)
    dropper.dropping.clear()
    trigger = await publish(http, publisher, channel, 2)
    await wait_for(lambda: sequencer.repairing)
    return missed, trigger, go


def nats_broker(node: RunningNode) -> NatsBroker:
    broker = node.node.broker
    assert isinstance(broker, NatsBroker)
    return broker


async def metrics_of(http: aiohttp.ClientSession, node: RunningNode) -> dict[str, float]:
    return await scrape(http, node.url)


async def wants(node: RunningNode, count: int) -> None:
    await wait_for(lambda: node.node.broker.stats().subscriptions >= count)


# -- 1. NATS-level gap: the node's connection is cut and comes back ------------------


@pytest.mark.parametrize(
    ("storage", "user_subscriptions"), [("file", "per-user"), ("memory", "per-user"), ("file", "shared")]
)
async def test_reconnect_catches_up_what_was_stored_while_away(
    storage: str,
    user_subscriptions: str,
    proxy: TcpProxy,
    node_factory: Callable[..., Any],
    http: aiohttp.ClientSession,
) -> None:
    shared = cluster(storage)
    publisher: RunningNode = await node_factory(**shared)  # connected directly
    node: RunningNode = await node_factory(
        nats_url=proxy.url, nats={"reconnect_wait": 0.1, "user_subscriptions": user_subscriptions}, **shared
    )
    ws = await open_ws(http, node, "alice", ["lobby"])
    await wants(node, 3)
    broker = nats_broker(node)
    expected: list[int] = []

    # Before: the live flow.
    for i in range(3):
        expected.append(await publish(http, publisher, "room:lobby", {"phase": 1, "i": i}))
        expected.append(await publish(http, publisher, "user:alice", {"phase": 1, "i": i}))
    got = ids(await receive(ws, 6))
    assert got == expected

    # Cut off: what is published now is stored but never reaches the node live.
    proxy.cut()
    await wait_for(lambda: not broker.connected)
    away: list[int] = []
    for i in range(4):
        away.append(await publish(http, publisher, "room:lobby", {"phase": 2, "i": i}))
        away.append(await publish(http, publisher, "user:alice", {"phase": 2, "i": i}))
        await publish(http, publisher, "room:elsewhere", {"phase": 2, "i": i})  # not held by the node
    await asyncio.sleep(0.2)
    assert broker.stats().connected is False
    proxy.restore()
    await wait_for(lambda: broker.ready, timeout=10)

    # Nothing new is published: the catch-up alone brings what was missed.
    got = ids(await receive(ws, len(away)))
    assert got == away
    await quiet(ws)

    # Live again, in order after the caught-up ones.
    after = [await publish(http, publisher, "room:lobby", {"phase": 3, "i": i}) for i in range(3)]
    assert ids(await receive(ws, 3)) == after

    # A second outage where only the user channel gets messages.
    proxy.cut()
    await wait_for(lambda: not broker.connected)
    away2 = [await publish(http, publisher, "user:alice", {"phase": 4, "i": i}) for i in range(3)]
    proxy.restore()
    # Published while the node reconnects: live (held until the catch-up is
    # done) or caught up, either way after what it missed, and once.
    racing = [await publish(http, publisher, "room:lobby", {"phase": 5, "i": i}) for i in range(3)]
    await wait_for(lambda: broker.ready, timeout=10)
    assert ids(await receive(ws, 6)) == away2 + racing
    live = await publish(http, publisher, "user:alice", {"phase": 6})
    assert ids(await receive(ws, 1)) == [live]
    await quiet(ws)

    metrics = await metrics_of(http, node)
    assert metrics["herald_nats_reconnects_total"] >= 2
    assert metrics["herald_gap_repairs_total"] >= 1
    assert metrics["herald_gap_repaired_messages_total"] >= len(away) + len(away2)
    assert metrics["herald_gaps_lost_total"] == 0
    assert metrics['herald_resets_total{reason="gap"}'] == 0
    await ws.close()


async def test_reconnect_catches_up_even_if_nothing_was_delivered_before(
    proxy: TcpProxy, node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    shared = cluster("file")
    publisher: RunningNode = await node_factory(**shared)
    node: RunningNode = await node_factory(nats_url=proxy.url, nats={"reconnect_wait": 0.1}, **shared)
    ws = await open_ws(http, node, "alice", ["lobby"])  # welcome: the channels are live
    await wants(node, 3)
    broker = nats_broker(node)
    proxy.cut()
    await wait_for(lambda: not broker.connected)
    away = [
        await publish(http, publisher, "room:lobby", {"i": 0}),
        await publish(http, publisher, "user:alice", {"i": 1}),
    ]
    proxy.restore()
    await wait_for(lambda: broker.ready, timeout=10)
    try:
        frames = await receive(ws, 2, timeout=2.0)
    except TimeoutError:
        frames = []
    # Either the messages arrive, or the client is told they are lost: never nothing.
    resets = {f["channel"] for f in frames if f["type"] == "reset"}
    assert [int(f["id"]) for f in frames if f["type"] == "message"] == away or {"room:lobby", "user"} <= resets, (
        f"client connected throughout got {frames} for {away} published while the node was away"
    )
    await ws.close()


# -- 2. Gap made by dropping deliveries in the node's NATS client (white-box) --------


async def test_whitebox_dropped_deliveries_repaired_when_next_arrives(
    node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    node: RunningNode = await node_factory()
    ws = await open_ws(http, node, "alice", ["lobby"])
    await wants(node, 3)
    first = await publish(http, node, "room:lobby", {"i": 0})
    assert ids(await receive(ws, 1)) == [first]

    dropper = Dropper(node)
    dropper.wrap("room:lobby")
    dropper.dropping.add("room:lobby")
    n = 5
    missed = [await publish(http, node, "room:lobby", {"i": i + 1}) for i in range(n)]
    await wait_for(lambda: dropper.dropped.get("room:lobby", 0) == n)
    await quiet(ws, 0.2)  # really dropped: the client saw nothing
    dropper.dropping.clear()

    last = await publish(http, node, "room:lobby", {"i": n + 1})
    assert ids(await receive(ws, n + 1)) == [*missed, last]
    await quiet(ws)
    metrics = await metrics_of(http, node)
    assert metrics["herald_gap_repairs_total"] == 1
    assert metrics["herald_gap_repaired_messages_total"] >= n
    assert metrics["herald_gaps_lost_total"] == 0
    assert metrics['herald_resets_total{reason="gap"}'] == 0
    # And the flow goes on without another repair.
    more = await publish(http, node, "room:lobby", {"i": n + 2})
    assert ids(await receive(ws, 1)) == [more]
    assert (await metrics_of(http, node))["herald_gap_repairs_total"] == 1
    await ws.close()


async def test_whitebox_gap_larger_than_replay_max_is_a_reset(
    node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    node: RunningNode = await node_factory(history={"replay_max": 3})
    ws = await open_ws(http, node, "alice", ["lobby"])
    other = await open_ws(http, node, "bob", ["lobby"])
    await wants(node, 4)
    first = await publish(http, node, "room:lobby", 0)
    assert ids(await receive(ws, 1)) == [first]
    assert ids(await receive(other, 1)) == [first]

    dropper = Dropper(node)
    dropper.wrap("room:lobby")
    dropper.dropping.add("room:lobby")
    missed = [await publish(http, node, "room:lobby", i + 1) for i in range(6)]
    await wait_for(lambda: dropper.dropped.get("room:lobby", 0) == 6)
    dropper.dropping.clear()
    last = await publish(http, node, "room:lobby", "last")

    # A reset, then the newest replay_max of the gap, then the live flow.
    for client in (ws, other):
        reset, *messages = await receive(client, 5)
        assert reset == {"type": "reset", "channel": "room:lobby", "reason": "messages were lost in transit"}
        assert ids(messages) == [*missed[-3:], last]
        await quiet(client, 0.2)
    metrics = await metrics_of(http, node)
    assert metrics["herald_gaps_lost_total"] == 1
    assert metrics['herald_resets_total{reason="gap"}'] == 2  # one frame per session
    # Continuity restarts after the reset: the next message is live again.
    more = await publish(http, node, "room:lobby", "more")
    assert ids(await receive(ws, 1)) == [more]
    await ws.close()
    await other.close()


async def test_whitebox_stream_unreachable_for_repair_is_a_reset(
    node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    node: RunningNode = await node_factory()
    ws = await open_ws(http, node, "alice", ["lobby"])
    await wants(node, 3)
    first = await publish(http, node, "room:lobby", 0)
    assert ids(await receive(ws, 1)) == [first]

    sequencer = nats_broker(node).pubsub.sequencer
    sequencer._retry_wait = 0.05
    calls = []

    async def unreachable(channels: Any, after: int, limit: int) -> Any:
        calls.append(after)
        raise BrokerUnavailable("stream unreachable (test)")

    sequencer._fetch = unreachable
    dropper = Dropper(node)
    dropper.wrap("room:lobby")
    dropper.dropping.add("room:lobby")
    await publish(http, node, "room:lobby", 1)
    await wait_for(lambda: dropper.dropped.get("room:lobby", 0) == 1)
    dropper.dropping.clear()
    last = await publish(http, node, "room:lobby", 2)
    reset, message = await receive(ws, 2)
    assert reset["type"] == "reset" and reset["channel"] == "room:lobby"
    assert ids([message]) == [last]
    assert calls == [first] * 3  # three tries
    metrics = await metrics_of(http, node)
    assert metrics["herald_gaps_lost_total"] == 1
    assert metrics['herald_resets_total{reason="gap"}'] == 1
    await ws.close()


# -- 3. Several clients and channels while repairs happen -----------------------------


async def test_two_clients_two_channels_order_kept_no_duplicates_during_repairs(
    node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    node: RunningNode = await node_factory()
    a = await open_ws(http, node, "alice", ["r1"])
    b = await open_ws(http, node, "bob", ["r2"])
    both = await open_ws(http, node, "carol", ["r1", "r2"])
    await wants(node, 5)  # user:alice, user:bob, user:carol, room:r1, room:r2 (+broadcast)

    dropper = Dropper(node)
    dropper.wrap("room:r1")
    dropper.wrap("room:r2")
    # Drop two of every five deliveries on r1, one of every three on r2.
    dropper.pattern["room:r1"] = lambda n: n % 5 in (2, 3)
    dropper.pattern["room:r2"] = lambda n: n % 3 == 0

    async def burst(channel: str, count: int) -> list[int]:
        return [await publish(http, node, channel, {"c": channel, "i": i}) for i in range(count)]

    r1, r2 = await asyncio.gather(burst("room:r1", 30), burst("room:r2", 30))
    to_drop = sum(1 for n in range(1, 31) if n % 5 in (2, 3)) + sum(1 for n in range(1, 31) if n % 3 == 0)
    await wait_for(lambda: sum(dropper.dropped.values()) == to_drop)
    # Stop dropping, and one last message on each so that trailing gaps are seen.
    dropper.pattern.clear()
    r1.append(await publish(http, node, "room:r1", "end"))
    r2.append(await publish(http, node, "room:r2", "end"))

    got_a = ids(await receive(a, len(r1)))
    got_b = ids(await receive(b, len(r2)))
    frames = await receive(both, len(r1) + len(r2))
    for ws in (a, b, both):
        await quiet(ws, 0.2)
    assert got_a == r1
    assert got_b == r2
    per_channel: dict[str, list[int]] = {"room:r1": [], "room:r2": []}
    for f in frames:
        assert f["type"] == "message", f
        per_channel[f["channel"]].append(int(f["id"]))
    assert per_channel == {"room:r1": r1, "room:r2": r2}

    metrics = await metrics_of(http, node)
    assert metrics["herald_gap_repairs_total"] >= 2
    assert metrics["herald_gap_repaired_messages_total"] >= sum(dropper.dropped.values())
    assert metrics["herald_gaps_lost_total"] == 0
    for ws in (a, b, both):
        await ws.close()


async def test_whitebox_repair_keeps_order_across_channels_of_one_client(
    node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    node: RunningNode = await node_factory()
    ws = await open_ws(http, node, "carol", ["ra", "rb"])
    await wants(node, 4)
    first = await publish(http, node, "room:ra", 0)
    assert ids(await receive(ws, 1)) == [first]

    missed, trigger, go = await a_repair_held(http, node, node, "room:ra")  # the repair waits
    older = await publish(http, node, "room:rb", 3)  # waits in the backlog
    newer = await publish(http, node, "room:ra", 4)  # waits in the backlog
    await asyncio.sleep(0.2)
    go.set()
    got = ids(await receive(ws, 4))
    assert sorted(got) == [missed, trigger, older, newer]  # each once
    assert got == [missed, trigger, older, newer]
    await ws.close()


async def test_whitebox_gap_partly_evicted_from_stream_is_a_reset(
    node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    # The stream keeps max(user_max, room_max) + 1 = 4 messages per subject.
    node: RunningNode = await node_factory(history={"user_max": 3, "room_max": 3})
    ws = await open_ws(http, node, "alice", ["lobby"])
    await wants(node, 3)
    first = await publish(http, node, "room:lobby", 0)
    assert ids(await receive(ws, 1)) == [first]
    dropper = Dropper(node)
    dropper.wrap("room:lobby")
    dropper.dropping.add("room:lobby")
    missed = [await publish(http, node, "room:lobby", i + 1) for i in range(6)]
    await wait_for(lambda: dropper.dropped.get("room:lobby", 0) == 6)
    dropper.dropping.clear()
    last = await publish(http, node, "room:lobby", "last")  # the stream now holds missed[-3:] and last
    frames: list[dict[str, Any]] = []
    with contextlib.suppress(TimeoutError):
        while True:
            frames.append(await recv_json(ws, 0.5))
    got = [int(f["id"]) for f in frames if f["type"] == "message"]
    resets = [f for f in frames if f["type"] == "reset"]
    assert got[-1] == last
    told = bool(resets) and frames[0] == {
        "type": "reset",
        "channel": "room:lobby",
        "reason": "messages were lost in transit",
    }
    assert got == [*missed, last] or told, f"missed {missed}, got {frames}"
    await ws.close()
