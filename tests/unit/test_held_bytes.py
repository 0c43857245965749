"""herald_outbound_queue_bytes: what the node's outbound queues hold, kept as
it changes (outbound.HeldBytes), so that a scrape reads no connection."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import generate_latest

from gateway.auth import Identity
from gateway.disconnect import CLIENT_CLOSED
from gateway.frames import WS
from gateway.hub import Hub
from gateway.node import build_node
from gateway.outbound import REPLAYED, QueueLimits
from gateway.session import Session
from gateway.settings import Settings

from ..memory_broker import MemoryBroker
from .test_hub import LIMITS, Env, FakeWire, RecordingCloser, delivery, env, make_env, settle  # noqa: F401 - the fixtures


def queued_everywhere(sessions: list[Session]) -> int:
    return sum(s.outbound.bytes for s in sessions)


async def test_the_queued_total_follows_every_queue_and_returns_to_zero(make_env: Any) -> None:  # noqa: F811
    """Every way a queue's bytes change — queued behind a pass's direct write,
    written, held while the transport is backed up, shed (drop-oldest), cut
    (slow consumer), written out before a close, dropped by a close — moves the
    node's total by as much: it is the sum of the queues at every step, and 0
    once they are closed."""
    parts: Env = await make_env(Hub(drop_oldest_rooms=("typing-*",)))
    held = parts.flusher.held
    plain, plain_wire, _ = parts.session()
    backed, backed_wire, _ = parts.session()
    shedding, _, _ = parts.session(limits=QueueLimits(1 << 20, 3, 65536, 5.0))
    small = QueueLimits(max_bytes=4096, max_messages=1000, write_buffer=1024, stall_timeout=5.0)
    slow, slow_wire, slow_closer = parts.session(limits=small)
    everyone = [plain, backed, shedding, slow]

    def check() -> None:
        assert held.queued == queued_everywhere(everyone), (held.queued, queued_everywhere(everyone))

    for s in everyone:
        await parts.join(s, "room:a")
    await parts.join(shedding, "room:typing-1")
    backed_wire.level = LIMITS.write_buffer + 1  # backed up: what comes stays queued
    slow_wire.level = 1000
    payload = b'"' + b"x" * 300 + b'"'
    for seq in range(1, 4):  # the first of the pass is a direct write, the rest queue behind it
        parts.hub.deliver(delivery("room:a", seq, payload))
        check()
    assert held.queued > 0
    await settle()
    check()
    assert backed.outbound.bytes > 0 and plain.outbound.bytes == 0
    plain.send({"type": "pong"})  # a control frame: queued, then written alone
    check()
    assert plain.outbound.bytes > 0
    await settle()
    check()
    assert plain.outbound.bytes == 0
    for seq in range(4, 10):  # typing messages past max_messages: the oldest are shed
        parts.hub.deliver(delivery("room:typing-1", seq))
        check()
    assert sum(parts.dropped) > 0
    for seq in range(10, 30):  # past max_bytes on the slow one: cut as a slow consumer
        parts.hub.deliver(delivery("room:a", seq, payload))
        check()
    assert [c.code for c in slow_closer.calls] == [4008]
    backed_wire.level = 0  # the peer reads: its queue is written
    await settle()
    check()
    backed.outbound.push(b"x" * 5000, REPLAYED)  # one frame past write_buffer goes out alone
    shedding.send({"type": "pong"})
    check()
    backed_wire.level = LIMITS.write_buffer + 1
    backed.outbound.push(b"y" * 700, REPLAYED)
    check()
    backed.close(CLIENT_CLOSED)  # written out before its close
    plain.outbound.push(b"z" * 100)
    plain.closed(CLIENT_CLOSED)  # dropped with the queue
    check()
    await settle()
    for s in everyone:
        s.closed(CLIENT_CLOSED)
    assert held.queued == 0 and held.total() == 0
    assert plain_wire.writes  # it did get its messages


async def test_transport_samples_count_until_their_queue_closes(env: Env) -> None:  # noqa: F811
    """What a transport held at its link's last tick counts in the total
    until the next tick replaces it, and leaves it with its connection."""
    held = env.flusher.held
    a, _, _ = env.session()
    b, _, _ = env.session()
    a.outbound.sample_wire(1000)
    b.outbound.sample_wire(300)
    assert held.sampled == 1300
    a.outbound.sample_wire(200)  # the peer read some
    assert held.sampled == 500
    b.closed(CLIENT_CLOSED)
    b.outbound.sample_wire(999)  # a tick that raced its close: not counted
    assert held.sampled == 200
    a.close(CLIENT_CLOSED)
    assert held.sampled == 0 and held.total() == 0


class CountingWire(FakeWire):
    """A wire that counts how often its transport's buffer is read."""

    reads = 0

    def buffered(self) -> int:
        CountingWire.reads += 1
        return super().buffered()


async def test_a_scrape_reads_no_connection() -> None:
    """A /metrics scrape costs the same at 20,000 connections as at 20: it
    reads the node's running totals, not each connection's queue and
    transport (that walk was 54 % of a scrape at 3,000 connections)."""
    node = build_node(Settings(), lambda events: MemoryBroker(events))
    node.metrics.add_transport("ws")
    sessions = []
    for n in range(500):
        wire = CountingWire()
        wire.name, wire.duplex, wire.codec, wire.close = "ws", True, WS, RecordingCloser()
        wire.level = LIMITS.write_buffer + 1  # backed up: pushes stay queued
        session = node.sessions.open(node.sessions.new_id(), Identity(f"u{n}"), wire)  # type: ignore[arg-type]
        session.outbound.push(b"m" * 10)
        session.outbound.sample_wire(wire.level)  # as its link's tick would
        sessions.append(session)
    expected = 500 * (10 + LIMITS.write_buffer + 1)
    CountingWire.reads = 0
    generate_latest(node.metrics.registry)
    assert CountingWire.reads == 0, f"a scrape read {CountingWire.reads} transports"
    assert node.metrics.registry.get_sample_value("herald_outbound_queue_bytes") == expected
    for session in sessions:
        session.closed(CLIENT_CLOSED)
    await asyncio.sleep(0)  # the queues' drain waiters end
    assert node.metrics.registry.get_sample_value("herald_outbound_queue_bytes") == 0
