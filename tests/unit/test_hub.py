"""Fast unit tests of the delivery path: Hub + Session + Outbound/Flusher + resume,
with the in-memory broker and a fake wire (no sockets, no nats-server)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
import pytest

from broker import BrokerUnavailable, Delivery, Replay
from broker.channels import parse_channel
from gateway.auth import Identity
from gateway.disconnect import CLIENT_CLOSED, SHUTDOWN, SLOW_CONSUMER, STALLED, TOKEN_EXPIRED, Disconnect
from gateway.flusher import Flusher
from gateway.frames import SSE, WS, SseCodec, WsCodec
from gateway.hub import Hub
from gateway.metrics import Metrics
from gateway.outbound import QueueLimits
from gateway.resume import Resumer
from gateway.session import Session, State
from gateway.settings import Settings
from gateway.subscriptions import Subscriptions

from ..helpers import broker_events
from ..memory_broker import MemoryBroker, MemoryHistory

LIMITS = QueueLimits(max_bytes=1 << 20, max_messages=1000, write_buffer=64 * 1024, stall_timeout=5.0)


class FakeWire:
    """Records writes. ``level`` is what the transport holds unread (settable); with
    ``grow`` every write adds to it, as a real transport whose peer reads nothing.
    ``drained()`` returns once the level is back to 0 (the peer read everything),
    or at once when ``paused`` is False (a transport below its high-water mark)."""

    def __init__(self, grow: bool = False) -> None:
        self.name, self.duplex, self.codec, self.close = "", True, None, None  # see Env.session
        self.writes: list[bytes] = []
        self.send = self.write
        self.grow = grow
        self.paused = True
        self.drain_calls = 0
        self._level = 0
        self._empty = asyncio.Event()
        self._empty.set()

    @property
    def level(self) -> int:
        return self._level

    @level.setter
    def level(self, value: int) -> None:
        self._level = value
        if value <= 0:
            self._empty.set()
        else:
            self._empty.clear()

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        if self.grow:
            self.level += len(data)

    def buffered(self) -> int:
        return self._level

    async def drained(self) -> None:
        self.drain_calls += 1
        if self.paused:
            await self._empty.wait()
        else:
            await asyncio.sleep(0)

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)


class RecordingCloser:
    def __init__(self) -> None:
        self.calls: list[Disconnect] = []

    def __call__(self, reason: Disconnect) -> None:
        self.calls.append(reason)


def transport_name(codec: Any) -> str:
    return "sse" if isinstance(codec, SseCodec) else "ws"


class CountingWs(WsCodec):
    def __init__(self) -> None:
        self.calls = 0

    def message(self, d: Delivery) -> bytes:
        self.calls += 1
        return super().message(d)


class CountingSse(SseCodec):
    def __init__(self) -> None:
        self.calls = 0

    def message(self, d: Delivery) -> bytes:
        self.calls += 1
        return super().message(d)


class Env:
    """The delivery path's parts wired as ``build_node`` wires them, over the
    memory broker. Channels are given by name and parsed here."""

    def __init__(self, hub: Hub | None = None) -> None:
        self.hub = hub or Hub()
        events = broker_events(self.hub.deliver)
        self.broker = MemoryBroker(dataclasses.replace(events, lost=self.hub.lost))
        self.subscriptions = Subscriptions(self.hub, self.broker.pubsub, self.broker.presence)
        self.history: Any = self.broker.history  # a test may wrap it (ReplayHook)
        self.settings = Settings()
        self.metrics = Metrics(("ws", "sse"))
        self.dropped: list[int] = []
        self.flusher = Flusher(self.dropped.append)
        self.sessions: list[Session] = []

    async def join(self, session: Session, name: str) -> None:
        await self.subscriptions.join(session, parse_channel(name))

    async def leave(self, session: Session, name: str) -> None:
        await self.subscriptions.leave(session, parse_channel(name))

    async def publish(self, name: str, payload: bytes, event: str | None = None) -> int:
        return await self.broker.pubsub.publish(parse_channel(name), payload, event)

    async def publish_ephemeral(self, name: str, payload: bytes) -> None:
        await self.broker.pubsub.publish_ephemeral(parse_channel(name), payload)

    async def resume(self, session: Session, names: Sequence[str], since: int) -> None:
        resumer = Resumer(
            self.subscriptions, self.history, self.broker.reads, self.hub.droppable, self.settings.history, self.metrics
        )
        await resumer.resume(session, [parse_channel(n) for n in names], since)

    def session(
        self,
        codec: Any = WS,
        identity: Identity | None = None,
        limits: QueueLimits = LIMITS,
        wire: FakeWire | None = None,
    ) -> tuple[Session, FakeWire, RecordingCloser]:
        wire = wire or FakeWire()
        closer = RecordingCloser()
        # The wire made the session's Transport: a name, a codec and a closer.
        wire.name, wire.duplex, wire.codec, wire.close = transport_name(codec), True, codec, closer
        session = Session(
            f"c{len(self.sessions) + 1}",
            identity or Identity("u"),
            wire,  # type: ignore[arg-type]
            self.flusher,
            limits,
            self.metrics.transport[wire.name],
        )
        session.early = None  # as if welcomed: control frames go out at once
        session.opened()
        self.sessions.append(session)
        return session, wire, closer

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def aclose(self) -> None:
        for session in self.sessions:
            session.closed(SLOW_CONSUMER)  # cancels drain waiters and expiry timers
        await self.broker.close()


@pytest.fixture
async def make_env() -> Any:
    envs: list[Env] = []

    async def make(hub: Hub | None = None) -> Env:
        e = Env(hub)
        await e.broker.start()
        envs.append(e)
        return e

    yield make
    for e in envs:
        await e.aclose()


@pytest.fixture
async def env(make_env: Any) -> Env:
    return await make_env()  # type: ignore[no-any-return]


async def settle(passes: int = 5) -> None:
    for _ in range(passes):
        await asyncio.sleep(0)


def delivery(channel: str, seq: int, payload: bytes = b"{}", ts: float | None = None) -> Delivery:
    return Delivery(parse_channel(channel), seq, 0, time.time() if ts is None else ts, "message", payload)


def ws_frames(data: bytes) -> list[dict[str, Any]]:
    """Split concatenated unmasked WebSocket text frames into their JSON objects."""
    out = []
    i = 0
    while i < len(data):
        assert data[i] == 0x81, f"expected a final text frame at {i}"
        n = data[i + 1] & 0x7F
        head = 2
        if n == 126:
            n, head = int.from_bytes(data[i + 2 : i + 4], "big"), 4
        elif n == 127:
            n, head = int.from_bytes(data[i + 2 : i + 10], "big"), 10
        out.append(orjson.loads(data[i + head : i + head + n]))
        i += head + n
    assert i == len(data)
    return out


def ids(wire: FakeWire) -> list[str]:
    return [f.get("id", "-") for f in ws_frames(wire.data) if f["type"] == "message"]


# --- encode once, fan out ------------------------------------------------------------------------------------


async def test_one_delivery_to_100_ws_sessions_encodes_once(env: Env) -> None:
    codec = CountingWs()
    sessions = [env.session(codec) for _ in range(100)]
    for s, _, _ in sessions:
        await env.join(s, "room:a")
    await env.publish("room:a", b'{"n":1}')
    await settle()
    assert codec.calls == 1
    first = sessions[0][1].writes[0]
    for _, wire, closer in sessions:
        assert len(wire.writes) == 1
        assert wire.writes[0] is first  # the same bytes object, not an equal copy
        assert closer.calls == []
    assert ws_frames(first) == [
        {"type": "message", "channel": "room:a", "id": "1", "event": "message", "data": {"n": 1}}
    ]
    assert env.sample("herald_messages_delivered_total", transport="ws") == 100


async def test_ws_and_sse_sessions_get_their_own_encoding_once_each(env: Env) -> None:
    ws_codec, sse_codec = CountingWs(), CountingSse()
    ws = [env.session(ws_codec) for _ in range(20)]
    sse = [env.session(sse_codec) for _ in range(20)]
    for s, _, _ in ws + sse:
        await env.join(s, "broadcast")
    await env.publish("broadcast", b'{"hello":"all"}', "greet")
    await settle()
    assert (ws_codec.calls, sse_codec.calls) == (1, 1)
    ws_bytes = {id(w.writes[0]) for _, w, _ in ws}
    sse_bytes = {id(w.writes[0]) for _, w, _ in sse}
    assert len(ws_bytes) == 1 and len(sse_bytes) == 1
    assert ws_frames(ws[0][1].data)[0]["event"] == "greet"
    assert sse[0][1].data == b'id: 1\nevent: greet\ndata: {"hello":"all"}\n\n'
    assert env.sample("herald_messages_delivered_total", transport="sse") == 20


async def test_deliveries_in_one_loop_pass_are_one_write_in_order(env: Env) -> None:
    s, wire, _ = env.session()
    await env.join(s, "room:a")
    await env.join(s, "room:b")
    for i in range(5):
        await env.publish("room:a" if i % 2 else "room:b", b'{"i":%d}' % i)
    await settle()
    assert len(wire.writes) == 1
    frames = ws_frames(wire.writes[0])
    assert [f["id"] for f in frames] == ["1", "2", "3", "4", "5"]
    assert [f["data"]["i"] for f in frames] == [0, 1, 2, 3, 4]
    # The next pass is the next write.
    await env.publish("room:a", b"6")
    await settle()
    assert len(wire.writes) == 2
    assert ids(wire) == ["1", "2", "3", "4", "5", "6"]


async def test_control_frames_and_deliveries_keep_push_order(env: Env) -> None:
    s, wire, _ = env.session()
    await env.join(s, "room:a")
    s.send({"type": "welcome"})
    env.hub.deliver(delivery("room:a", 1))
    s.send({"type": "ack", "ref": "1"})
    env.hub.deliver(delivery("room:a", 2))
    s.send({"type": "pong"})
    await settle()
    assert len(wire.writes) == 1
    assert [(f["type"], f.get("id")) for f in ws_frames(wire.data)] == [
        ("welcome", None),
        ("message", "1"),
        ("ack", None),
        ("message", "2"),
        ("pong", None),
    ]
    assert env.sample("herald_messages_delivered_total", transport="ws") == 2  # control frames are not deliveries
    assert env.sample("herald_delivery_latency_seconds_count") == 2


async def test_control_frames_sent_before_the_welcome_follow_it(env: Env) -> None:
    s, wire, _ = env.session()
    s.early = []  # still connecting: its welcome is not out yet
    s.send({"type": "subscribed", "room": "x"})
    s.send({"type": "reset", "channel": "room:a"})
    s.welcome({"type": "welcome"})
    s.send({"type": "pong"})
    await settle()
    assert [f["type"] for f in ws_frames(wire.data)] == ["welcome", "subscribed", "reset", "pong"]


async def test_sse_control_and_delivery_order(env: Env) -> None:
    s, wire, _ = env.session(SSE)
    await env.join(s, "room:a")
    s.send({"type": "welcome"})
    env.hub.deliver(delivery("room:a", 7, b"x"))
    await settle()
    assert wire.writes == [b'event: welcome\ndata: {"type":"welcome"}\n\nid: 7\nevent: message\ndata: x\n\n']


async def test_a_closed_session_is_freed_without_the_cyclic_gc(env: Env) -> None:
    """Nothing of a closed session is left in a reference cycle: a storm's
    closed sessions were freed only by the GC's full passes (80-270 ms each
    over thousands of sessions) and grew the node's memory meanwhile."""
    gc.collect()  # what earlier tests left
    gc.disable()
    try:
        session, wire, _ = env.session()
        await env.join(session, "room:r1")
        await env.publish("room:r1", b'{"n":1}')
        await settle()
        assert ids(wire)
        session.close(CLIENT_CLOSED)
        session.closed(CLIENT_CLOSED)
        await env.leave(session, "room:r1")
        env.sessions.remove(session)
        del session, wire
        assert not [o for o in gc.get_objects() if type(o) is Session]
    finally:
        gc.enable()


async def test_no_delivery_without_sessions_or_after_leave(env: Env) -> None:
    s, wire, _ = env.session()
    env.hub.deliver(delivery("room:nobody", 1))
    await env.join(s, "room:a")
    await env.leave(s, "room:a")
    env.hub.deliver(delivery("room:a", 2))
    await settle()
    assert wire.writes == []


# --- backpressure --------------------------------------------------------------------------------------------


async def test_full_wire_buffer_defers_the_write_until_it_drains(env: Env) -> None:
    s, wire, closer = env.session()
    await env.join(s, "room:a")
    wire.level = LIMITS.write_buffer + 1
    env.hub.deliver(delivery("room:a", 1))
    await settle()
    assert wire.writes == []
    assert wire.drain_calls == 1  # one waiter, waiting for the transport
    env.hub.deliver(delivery("room:a", 2))  # more arrives while backed up: queued, not written
    await settle()
    assert wire.writes == []
    assert len(s.outbound) == 2
    assert s.outbound.pending_bytes() > wire.level
    wire.level = 0  # the peer reads
    await settle()
    assert len(wire.writes) == 1  # both, in one write
    assert ids(wire) == ["1", "2"]
    assert closer.calls == []
    # Back to normal: the next delivery goes through the flusher again.
    env.hub.deliver(delivery("room:a", 3))
    await settle()
    assert ids(wire) == ["1", "2", "3"]
    assert wire.drain_calls == 1


async def test_writes_never_overfill_write_buffer(env: Env) -> None:
    limits = QueueLimits(max_bytes=1 << 20, max_messages=1000, write_buffer=1024, stall_timeout=5.0)
    s, wire, closer = env.session(limits=limits, wire=FakeWire(grow=True))
    await env.join(s, "room:a")
    payload = b'"' + b"x" * 560 + b'"'
    for seq in (1, 2, 3):
        env.hub.deliver(delivery("room:a", seq, payload))
    await settle()
    assert len(wire.writes) == 1  # only what fits below write_buffer
    assert ids(wire) == ["1"]
    for expected in (["1", "2"], ["1", "2", "3"]):
        wire.level = 0
        await settle()
        assert ids(wire) == expected
    assert all(len(w) <= 1024 for w in wire.writes)
    assert closer.calls == []
    # A single frame bigger than write_buffer still goes out on an empty transport.
    wire.level = 0
    env.hub.deliver(delivery("room:a", 4, b'"' + b"y" * 3000 + b'"'))
    await settle()
    assert ids(wire)[-1] == "4"


@pytest.mark.parametrize(
    ("limits", "payload", "count"),
    [
        # too many messages: the first of a pass is written at once, 4 more are queued
        (QueueLimits(1 << 20, 3, 65536, 5.0), b"{}", 5),
        (QueueLimits(2048, 1000, 1024, 5.0), b'"' + b"x" * 600 + b'"', 4),  # too many bytes
    ],
    ids=["max_messages", "max_bytes"],
)
@pytest.mark.parametrize("codec", [WS, SSE], ids=["ws", "sse"])
async def test_queue_overflow_disconnects_slow_consumer(
    env: Env, limits: QueueLimits, payload: bytes, count: int, codec: Any
) -> None:
    s, wire, closer = env.session(codec, limits=limits)
    other, other_wire, other_closer = env.session(codec)
    await env.join(s, "room:a")
    await env.join(other, "room:a")
    wire.level = 1000  # the client reads nothing
    for seq in range(1, count + 1):
        env.hub.deliver(delivery("room:a", seq, payload))
    assert [c.code for c in closer.calls] == [4008]
    assert closer.calls[0] is SLOW_CONSUMER
    assert s.state is State.CLOSING
    assert s.disconnect is SLOW_CONSUMER
    assert env.sample("herald_slow_consumer_disconnects_total", transport=transport_name(codec)) == 1
    # Later pushes are ignored: nothing queued, no second close.
    for seq in range(count + 1, count + 10):
        env.hub.deliver(delivery("room:a", seq, payload))
    s.send({"type": "pong"})
    assert len(s.outbound) == 0 and s.outbound.bytes == 0
    wire.level = 0
    await settle()
    assert wire.writes == []
    assert len(closer.calls) == 1
    assert env.sample("herald_slow_consumer_disconnects_total", transport=transport_name(codec)) == 1
    # The other session on the channel is unaffected.
    assert other_closer.calls == []
    assert len(other_wire.writes) >= 1


async def test_max_bytes_counts_the_transport_buffer(env: Env) -> None:
    limits = QueueLimits(max_bytes=4096, max_messages=1000, write_buffer=1024, stall_timeout=5.0)
    s, wire, closer = env.session(limits=limits, wire=FakeWire(grow=True))
    await env.join(s, "room:a")
    frame = b'"' + b"x" * 900 + b'"'
    for seq in range(1, 5):  # each fits below write_buffer on its own: written, never read
        env.hub.deliver(delivery("room:a", seq, frame))
        await settle()
    assert len(wire.writes) == 2 and wire.level > 1024  # then the transport is backed up
    assert closer.calls == []
    env.hub.deliver(delivery("room:a", 5, frame))
    # queued (2 frames + this one) + transport (2 frames) > max_bytes, though the queue alone is not
    assert s.outbound.bytes < 4096
    assert [c.code for c in closer.calls] == [4008]


async def test_droppable_room_sheds_oldest_and_does_not_disconnect(make_env: Any) -> None:
    env = await make_env(Hub(drop_oldest_rooms=("typing-*",)))
    s, wire, closer = env.session(limits=QueueLimits(1 << 20, 3, 65536, 5.0))
    await env.join(s, "room:chat")
    await env.join(s, "room:typing-1")
    assert env.hub.droppable(parse_channel("room:typing-1"))
    assert not env.hub.droppable(parse_channel("room:chat"))
    assert not env.hub.droppable(parse_channel("user:typing-1"))
    assert not env.hub.droppable(parse_channel("broadcast"))
    env.hub.deliver(delivery("room:chat", 1))
    for seq in range(2, 7):
        env.hub.deliver(delivery("room:typing-1", seq))
    assert closer.calls == []
    # The first message of the pass went to the socket at once (nothing can
    # shed it); of the 5 queued after it, the 2 oldest typing ones went.
    assert sum(env.dropped) == 2
    await settle()
    assert ids(wire) == ["1", "4", "5", "6"]
    assert closer.calls == []


async def test_droppable_room_sheds_by_bytes_too(make_env: Any) -> None:
    env = await make_env(Hub(drop_oldest_rooms=("typing-*",)))
    limits = QueueLimits(max_bytes=2048, max_messages=1000, write_buffer=1024, stall_timeout=5.0)
    s, wire, closer = env.session(limits=limits)
    await env.join(s, "room:typing-1")
    wire.level = 1000  # backed up: nothing is written, the queue fills
    big = b'"' + b"x" * 400 + b'"'
    for seq in range(1, 6):
        env.hub.deliver(delivery("room:typing-1", seq, big))
    assert closer.calls == []
    assert sum(env.dropped) >= 3
    assert s.outbound.bytes + wire.level <= 2048
    wire.level = 0
    await settle()
    assert ids(wire)[-1] == "5"  # the newest survive


async def test_droppable_room_cannot_save_a_queue_full_of_undroppable(make_env: Any) -> None:
    env = await make_env(Hub(drop_oldest_rooms=("typing-*",)))
    s, _, closer = env.session(limits=QueueLimits(1 << 20, 3, 65536, 5.0))
    await env.join(s, "room:chat")
    await env.join(s, "room:typing-1")
    for seq in (1, 2, 3, 4):  # 1 is written at once, 3 are queued
        env.hub.deliver(delivery("room:chat", seq))
    env.hub.deliver(delivery("room:typing-1", 5))  # sheds itself: still within limits
    assert closer.calls == []
    assert sum(env.dropped) == 1
    env.hub.deliver(delivery("room:chat", 6))
    assert [c.code for c in closer.calls] == [4008]


async def test_drop_oldest_all(make_env: Any) -> None:
    env = await make_env(Hub(drop_oldest_all=True))
    s, wire, closer = env.session(limits=QueueLimits(1 << 20, 2, 65536, 5.0))
    await env.join(s, "user:u")
    for seq in range(1, 6):
        env.hub.deliver(delivery("user:u", seq))
    await settle()
    assert closer.calls == []
    assert ids(wire) == ["1", "4", "5"]  # 1 was written at once; of 2..5, 2 and 3 were shed
    assert sum(env.dropped) == 2


async def test_stalled_session_is_closed_after_stall_timeout(env: Env) -> None:
    s, wire, closer = env.session(SSE, limits=QueueLimits(1 << 20, 1000, 65536, 0.05))
    await env.join(s, "room:a")
    wire.level = 10**6  # never drains
    env.hub.deliver(delivery("room:a", 1))
    await asyncio.sleep(0.02)
    assert closer.calls == []
    await asyncio.sleep(0.1)
    assert closer.calls == [STALLED]
    assert closer.calls[0].code == 4008
    assert s.disconnect is STALLED
    assert env.sample("herald_slow_consumer_disconnects_total", transport="sse") == 1
    assert wire.writes == []
    assert len(s.outbound) == 0


async def test_slow_but_draining_session_is_not_stalled(env: Env) -> None:
    s, wire, closer = env.session(limits=QueueLimits(1 << 20, 1000, 65536, 0.05))
    await env.join(s, "room:a")
    wire.level = 10**6
    env.hub.deliver(delivery("room:a", 1))
    await asyncio.sleep(0.03)
    wire.level = 0
    await settle()
    assert ids(wire) == ["1"]
    wire.level = 10**6
    env.hub.deliver(delivery("room:a", 2))
    await asyncio.sleep(0.03)  # 0.06 since the first block, but the transport made progress in between
    assert closer.calls == []


async def test_stall_detected_when_drained_returns_but_nothing_moves(env: Env) -> None:
    s, wire, closer = env.session(limits=QueueLimits(1 << 20, 1000, 1024, 0.05))
    await env.join(s, "room:a")
    wire.paused = False  # asyncio pauses only above the high-water mark
    wire.level = 1024  # == write_buffer, and the peer reads nothing
    env.hub.deliver(delivery("room:a", 1))
    await asyncio.sleep(0.2)
    assert wire.writes == []
    assert wire.drain_calls > 1  # it kept checking without spinning...
    assert [c.code for c in closer.calls] == [4008]  # ...and gave up after stall_timeout


# --- resume --------------------------------------------------------------------------------------------------


class ReplayHook:
    """Wraps a history so live deliveries can arrive while a replay is in flight:
    ``before`` runs before the stream is read, ``during`` after it was read."""

    def __init__(
        self,
        history: MemoryHistory,
        during: Callable[[], Awaitable[None]] | None = None,
        before: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._history = history
        self._during = during
        self._before = before
        self.fail = False

    async def replay(
        self, channels: Sequence[str], after_seq: int, limit: int, lasts: Sequence[int] | None = None
    ) -> Replay:
        if self.fail:
            await settle()
            raise BrokerUnavailable("replay failed")
        if self._before is not None:
            await self._before()
            await settle()
        found = await self._history.replay(channels, after_seq, limit, lasts)
        if self._during is not None:
            await self._during()
        await settle()
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self._history, name)


async def test_held_session_buffers_deliveries(env: Env) -> None:
    s, wire, _ = env.session()
    await env.join(s, "room:a")
    s.start_holding()
    d = delivery("room:a", 1)
    env.hub.deliver(d)
    await settle()
    assert s.held == [d]
    assert wire.writes == []
    assert len(s.outbound) == 0


async def test_resume_replays_then_releases_held_without_duplicates(env: Env) -> None:
    for i in range(1, 4):
        await env.publish("room:a", b'{"i":%d}' % i)  # seq 1..3, stored only (no subscriber yet)
    await env.publish("room:other", b"{}")  # seq 4, another channel
    s, wire, closer = env.session()
    await env.join(s, "room:a")

    async def live_while_replaying() -> None:
        env.hub.deliver(env.broker.log[2])  # the live copy of seq 3, which the replay also returned
        await env.publish("room:a", b'{"i":5}')  # seq 5: only live
        await env.publish_ephemeral("room:a", b'{"typing":true}')  # no id, never replayed

    env.history = ReplayHook(env.broker.history, live_while_replaying)
    await env.resume(s, ["room:a"], 1)
    assert s.held is None
    await settle()
    frames = [f for f in ws_frames(wire.data) if f["type"] == "message"]
    assert [f.get("id", "-") for f in frames] == ["2", "3", "5", "-"]
    assert [f["data"] for f in frames] == [{"i": 2}, {"i": 3}, {"i": 5}, {"typing": True}]
    assert env.sample("herald_replayed_messages_total") == 2
    assert closer.calls == []
    # Live flow afterwards.
    await env.publish("room:a", b"{}")
    await settle()
    assert ids(wire)[-1] == "6"


async def test_resume_with_nothing_to_replay_releases_held(env: Env) -> None:
    await env.publish("room:a", b"1")
    s, wire, _ = env.session()
    await env.join(s, "room:a")

    async def live() -> None:
        await env.publish("room:a", b"2")  # newer than the replay read

    env.history = ReplayHook(env.broker.history, live)
    await env.resume(s, ["room:a"], 1)  # the client has seq 1
    await settle()
    assert ids(wire) == ["2"]
    assert env.sample("herald_replayed_messages_total") == 0


async def test_resume_releases_held_when_replay_fails(env: Env) -> None:
    s, wire, _ = env.session()
    await env.join(s, "room:a")
    hook = ReplayHook(env.broker.history)
    hook.fail = True
    env.history = hook
    task = asyncio.create_task(env.resume(s, ["room:a"], 0))
    await asyncio.sleep(0)
    await env.publish("room:a", b"1")  # arrives while the replay is failing
    with pytest.raises(BrokerUnavailable):
        await task
    assert s.held is None
    await settle()
    assert ids(wire) == ["1"]


async def test_resume_of_one_channel_keeps_held_deliveries_of_other_channels(env: Env) -> None:
    s, wire, _ = env.session()
    await env.join(s, "room:a")
    await env.join(s, "room:b")

    async def publish_during_resume() -> None:
        await env.publish("room:a", b'"a1"')  # seq 1: live on room:a, held
        await env.publish("room:b", b'"b1"')  # seq 2: replayed (and live, held)

    env.history = ReplayHook(env.broker.history, before=publish_during_resume)
    await env.resume(s, ["room:b"], 0)
    await settle()
    got = {(f["channel"], f["id"]) for f in ws_frames(wire.data)}
    assert got == {("room:b", "2"), ("room:a", "1")}


async def test_resume_longer_than_max_replay_is_not_silently_truncated(env: Env) -> None:
    settings = Settings()
    env.settings = dataclasses.replace(settings, history=dataclasses.replace(settings.history, replay_max=3))
    for i in range(1, 7):
        await env.publish("room:a", b"%d" % i)  # seq 1..6, stored
    s, wire, _ = env.session()
    await env.join(s, "room:a")
    await env.resume(s, ["room:a"], 0)
    await env.publish("room:a", b"7")
    await settle()
    frames = ws_frames(wire.data)
    assert frames[0] == {"type": "reset", "channel": "room:a", "reason": "messages missed are no longer held"}
    assert ids(wire) == ["4", "5", "6", "7"]  # the newest replay_max, then live


# --- token expiry --------------------------------------------------------------------------------------------


async def test_token_expiry_closes_4001(env: Env) -> None:
    s, _, closer = env.session(identity=Identity("u", expires=time.time() + 0.05))
    await asyncio.sleep(0.01)
    assert closer.calls == []
    await asyncio.sleep(0.1)
    assert closer.calls == [TOKEN_EXPIRED]
    assert closer.calls[0].code == 4001
    assert s.state is State.CLOSING


async def test_already_expired_token_closes_at_once(env: Env) -> None:
    _, _, closer = env.session(identity=Identity("u", expires=time.time() - 10))
    await settle()
    assert [c.code for c in closer.calls] == [4001]


async def test_refresh_moves_the_expiry(env: Env) -> None:
    s, _, closer = env.session(identity=Identity("u", expires=time.time() + 0.03))
    s.set_expiry(time.time() + 3600)
    t, _, t_closer = env.session(identity=Identity("v", expires=time.time() + 0.03))
    t.set_expiry(None)
    await asyncio.sleep(0.08)
    assert closer.calls == [] and t_closer.calls == []
    s.set_expiry(time.time() + 0.01)
    await asyncio.sleep(0.05)
    assert [c.code for c in closer.calls] == [4001]


async def test_closed_session_does_not_expire_later(env: Env) -> None:
    s, _, closer = env.session(identity=Identity("u", expires=time.time() + 0.03))
    assert s.closed(SLOW_CONSUMER) is SLOW_CONSUMER
    await asyncio.sleep(0.06)
    assert closer.calls == []
    assert s.state is State.CLOSED


async def test_close_is_idempotent_and_first_reason_counts(env: Env) -> None:
    s, _, closer = env.session()
    s.close(SLOW_CONSUMER)
    s.close(TOKEN_EXPIRED)
    assert closer.calls == [SLOW_CONSUMER]
    assert s.closed(TOKEN_EXPIRED) is SLOW_CONSUMER
    assert not s.active


# --- join / leave and broker interest ------------------------------------------------------------------------


async def test_join_leave_follow_broker_subscriptions(env: Env) -> None:
    sessions = [env.session(identity=Identity(f"u{i}"))[0] for i in range(10)]
    for s in sessions:
        await env.join(s, "room:a")
        await env.join(s, "room:a")  # twice: no second reference
    assert env.broker.stats().subscriptions == 1
    assert env.hub.channel_count == 1
    for s in sessions:
        await env.join(s, f"user:{s.user}")
        await env.join(s, "broadcast")
    assert env.broker.stats().subscriptions == 12
    for s in sessions[:9]:
        await env.leave(s, "room:a")
        await env.leave(s, "room:a")  # twice: no second unwant
    assert env.broker.stats().subscriptions == 12
    await env.leave(sessions[9], "room:a")
    assert env.broker.stats().subscriptions == 11
    for s in sessions:
        await env.subscriptions.leave_all(s)
        assert s.channels == set()
    assert env.broker.stats().subscriptions == 0
    assert env.hub.channel_count == 0


async def test_failed_join_leaves_no_trace(env: Env) -> None:
    s, _, _ = env.session()

    class Refusing:
        def __init__(self) -> None:
            self.present: list[tuple[str, str, bool]] = []

        async def want(self, channel: str) -> None:
            raise BrokerUnavailable("down")

        def mark(self, channel: str, user: str, present: bool) -> None:
            self.present.append((channel, user, present))

    refusing = Refusing()
    working = env.subscriptions
    env.subscriptions = Subscriptions(env.hub, refusing, refusing)  # type: ignore[arg-type]
    with pytest.raises(BrokerUnavailable):
        await env.join(s, "room:a")
    assert s.channels == set()
    assert env.hub.channel_count == 0
    assert env.subscriptions.local_rooms() == {}
    assert refusing.present[-1:] == [("room:a", s.user, False)]  # presence not left behind
    env.subscriptions = working
    await env.join(s, "room:a")
    assert env.broker.stats().subscriptions == 1


# --- the direct write of a pass's first message ----------------------------------------------------------------


async def test_a_session_closed_in_the_pass_of_a_delivery_gets_nothing_after_its_close(env: Env) -> None:
    """The first message of a pass is noted for writing at the end of the pass; a
    close before then (its close frame goes out at once) cancels that write."""
    s, wire, closer = env.session()
    await env.join(s, "room:a")
    env.hub.deliver(delivery("room:a", 1))
    s.close(SLOW_CONSUMER)
    wire.write(b"<close frame>")  # what the transport's closer writes at once
    await settle()
    assert wire.writes == [b"<close frame>"]
    assert [c.code for c in closer.calls] == [4008]


async def test_a_close_writes_out_the_direct_write_of_its_pass_before_what_queued_behind_it(env: Env) -> None:
    """Two messages in one pass (the first noted as a direct write, the second
    queued behind it), then a graceful close: the client gets both, in order,
    before the close frame. Writing only the queued one would leave a hole
    that resuming from the last id received can never fill."""
    s, wire, _ = env.session()
    await env.join(s, "room:a")
    env.hub.deliver(delivery("room:a", 1))
    env.hub.deliver(delivery("room:a", 2))
    s.close(SHUTDOWN)
    wire.write(b"<close frame>")
    await settle()
    assert [f["id"] for f in ws_frames(b"".join(wire.writes[:-1]))] == ["1", "2"]
    assert wire.writes[-1] == b"<close frame>"


async def test_a_message_is_written_once_per_pass_to_every_recipient(env: Env) -> None:
    wires = []
    for _ in range(5):
        s, wire, _ = env.session(SSE)
        await env.join(s, "room:a")
        wires.append(wire)
    env.hub.deliver(delivery("room:a", 1))
    await settle()
    assert len({w.data for w in wires}) == 1 and all(len(w.writes) == 1 for w in wires)
    # A burst in one pass: the first message is written as noted, the rest join
    # it in the same write.
    for seq in (2, 3, 4):
        env.hub.deliver(delivery("room:a", seq))
    await settle()
    assert all(len(w.writes) == 2 for w in wires)
    assert wires[0].writes[1].count(b"id: ") == 3


async def test_latency_and_delivered_are_counted_once_per_recipient(env: Env) -> None:
    sessions = []
    for _ in range(4):
        s, _, _ = env.session()
        await env.join(s, "room:a")
        sessions.append(s)
    env.hub.deliver(delivery("room:a", 1, ts=time.time() - 0.2))  # written directly
    env.hub.deliver(delivery("room:a", 2, ts=time.time() - 0.2))  # queued behind it
    await settle()
    assert env.metrics.transport["ws"].delivered == 8
    latency = env.metrics.latency
    assert sum(latency.counts) == 8
    assert 8 * 0.2 <= latency.sum < 8 * 0.3


async def test_write_delay_joins_what_arrives_within_it_into_one_write(env: Env) -> None:
    env.flusher = Flusher(env.dropped.append, delay=0.1)  # backpressure.write_delay
    s, wire, _ = env.session()
    await env.join(s, "room:a")
    env.hub.deliver(delivery("room:a", 1))
    await asyncio.sleep(0.03)
    assert wire.writes == []  # held for the delay
    env.hub.deliver(delivery("room:a", 2))
    s.send({"type": "ack", "ref": 1})  # answers wait too: order is kept
    await asyncio.sleep(0.15)
    assert len(wire.writes) == 1
    assert ids(wire) == ["1", "2"]
    assert ws_frames(wire.data)[-1] == {"type": "ack", "ref": 1}


async def test_a_close_after_the_peer_left_does_not_raise_on_the_pending_direct_write(env: Env) -> None:
    """A peer gone mid-pass: its transport refuses writes (uvloop raises); the
    close that follows (from connection_lost) must not."""

    class GoneWire(FakeWire):
        def write(self, data: bytes) -> None:
            raise RuntimeError("transport is closed")

    s, _, closer = env.session(wire=GoneWire())
    await env.join(s, "room:a")
    env.hub.deliver(delivery("room:a", 1))
    env.hub.deliver(delivery("room:a", 2))
    s.close(SHUTDOWN)  # must not raise
    await settle()
    assert [c.code for c in closer.calls] == [1012]
