"""The per-connect requests made through the reply inbox (broker/lookup.py,
kv.Bucket) and the coalesced subscription round trip, against a real
nats-server: the same answers nats-py's kv.get / create / update and
js.get_msg give, and subscriptions live when want() returns."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import uuid
from typing import Any

import nats
import orjson
import pytest
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from broker import BrokerUnavailable, Delivery, Kind, TooManyConnections
from broker.acks import _Acks
from broker.channels import Subjects, room_channel
from broker.dispatch import DispatchingClient
from broker.embedded import NatsServer, free_port
from broker.jetstream import NatsBroker, NatsConfig
from broker.kv import Bucket, compare_and_set
from broker.link import NatsLink
from broker.lookup import LastMessage, stream_bounds
from broker.store import last_sequence

from ..helpers import broker_events, wait_for
from .conftest import connected_link


async def new_bucket(link: NatsLink, direct: bool = False) -> tuple[KeyValue, Bucket]:
    """A bucket of the test's own, as nats-py's KeyValue and as the lean Bucket (``direct``: one that
    allows direct gets, as nats.go makes them: the lean Bucket reads it from the leader all the same)."""
    assert link.js is not None
    name = f"LEAN{uuid.uuid4().hex[:10]}"
    config = KeyValueConfig(bucket=name, history=1, storage=StorageType.MEMORY, direct=direct or None)
    kv = await link.js.create_key_value(config)
    assert kv._direct is direct
    return kv, Bucket(link, kv, 2.0)


class PingCount:
    """How many PING/PONG round trips (``flush``) a broker's client made."""

    def __init__(self, nc: DispatchingClient) -> None:
        self.count = 0
        real_flush = nc.flush

        async def counted_flush(timeout: int = 10) -> None:
            self.count += 1
            await real_flush(timeout)

        nc.flush = counted_flush  # type: ignore[method-assign]


async def started_broker(server: NatsServer, name: str, got: list[Delivery]) -> NatsBroker:
    """A broker on stream ``name`` (upper case), live subjects ``<name>_live``."""
    config = NatsConfig(
        urls=(server.url,), subjects=Subjects(name, f"{name}_live"), stream=name.upper(), storage="memory"
    )
    broker = NatsBroker(config, broker_events(got.append))
    await broker.start()
    return broker


def count_pings(broker: NatsBroker) -> PingCount:
    nc = broker._link.nc
    assert nc is not None
    return PingCount(nc)


@pytest.mark.parametrize("direct", [False, True], ids=["leader", "direct"])
async def test_get_reads_values_and_revisions_as_nats_py_does(link: NatsLink, direct: bool) -> None:
    kv, bucket = await new_bucket(link, direct)
    assert await bucket.get("never") == (None, 0)
    rev = await kv.put("k", b"value")
    assert await bucket.get("k") == (b"value", rev)
    empty = await kv.put("empty", b"")
    assert await bucket.get("empty") == (b"", empty)
    # Deleted and purged keys are absent, with their marker's revision (what a write must expect).
    await kv.put("deleted", b"x")
    await kv.delete("deleted")
    value, marker = await bucket.get("deleted")
    assert value is None and marker > rev
    await kv.put("purged", b"x")
    await kv.purge("purged")
    value, purge_marker = await bucket.get("purged")
    assert value is None and purge_marker > marker
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get("purged")


@pytest.mark.parametrize("direct", [False, True], ids=["leader", "direct"])
async def test_a_write_expects_the_last_revision(link: NatsLink, direct: bool) -> None:
    kv, bucket = await new_bucket(link, direct)
    assert await bucket.write("k", b"one", 0)  # create
    assert not await bucket.write("k", b"two", 0)  # exists: a create conflicts
    _, rev = await bucket.get("k")
    assert not await bucket.write("k", b"two", rev - 1 if rev > 1 else rev + 5)  # stale
    assert await bucket.write("k", b"two", rev)
    assert not await bucket.write("k", b"three", rev)  # that revision is gone now
    assert (await kv.get("k")).value == b"two"


async def test_a_refused_write_leaves_no_reference_cycle(link: NatsLink) -> None:
    """A conflict (every compare-and-set that loses a race) is freed at once,
    not by the GC's full passes: the refusal's traceback holds the frames
    that held its publish's state."""
    _, bucket = await new_bucket(link)
    assert await bucket.write("k", b"one", 0)
    gc.collect()  # what earlier tests left
    gc.disable()
    try:
        assert not await bucket.write("k", b"two", 0)
        await asyncio.sleep(0)  # the wake-up that resumed this test holds the ack's future until it returns
        assert not [o for o in gc.get_objects() if type(o) is _Acks]
    finally:
        gc.enable()


@pytest.mark.parametrize("how", ["delete", "purge"])
async def test_compare_and_set_creates_over_a_deleted_key(link: NatsLink, how: str) -> None:
    kv, bucket = await new_bucket(link)
    await kv.put("k", b"old")
    await (kv.delete("k") if how == "delete" else kv.purge("k"))
    seen: list[bytes | None] = []

    def change(value: bytes | None) -> bytes:
        seen.append(value)
        return b"new"

    assert await compare_and_set(bucket, "k", change, tries=3)
    assert seen == [None]  # absent at once: no conflict on the way
    assert (await kv.get("k")).value == b"new"


async def test_compare_and_set_looks_again_after_a_conflict(link: NatsLink) -> None:
    kv, bucket = await new_bucket(link)
    await kv.put("k", b"1")
    real_get = bucket.get
    others = [b"2"]

    async def get_then_another_writes(key: str) -> tuple[bytes | None, int]:
        found = await real_get(key)
        if others:
            await kv.put(key, others.pop())
        return found

    bucket.get = get_then_another_writes  # type: ignore[method-assign]
    seen: list[bytes | None] = []

    def change(value: bytes | None) -> bytes:
        seen.append(value)
        return (value or b"") + b"+"

    assert await compare_and_set(bucket, "k", change, tries=5)
    assert seen == [b"1", b"2"]
    assert (await kv.get("k")).value == b"2+"

    async def always_overtaken(key: str) -> tuple[bytes | None, int]:
        found = await real_get(key)
        await kv.put(key, b"other")
        return found

    bucket.get = always_overtaken  # type: ignore[method-assign]
    assert not await compare_and_set(bucket, "k", lambda _: b"mine", tries=3)
    assert (await kv.get("k")).value == b"other"


async def test_last_sequence_asks_the_leader_and_reads_404_as_nothing(link: NatsLink) -> None:
    assert link.js is not None
    stream = f"LS{uuid.uuid4().hex[:10]}"
    await link.js.add_stream(name=stream, subjects=[f"{stream}.>"], storage=StorageType.MEMORY)
    leader = LastMessage(link.replies, stream, 2.0)
    assert await last_sequence(leader, f"{stream}.a") == 0
    first = (await link.js.publish(f"{stream}.a", b"1")).seq
    await link.js.publish(f"{stream}.b", b"2")
    assert await last_sequence(leader, f"{stream}.a") == first
    second = (await link.js.publish(f"{stream}.a", b"3", headers={"H": "v"})).seq
    stored = await leader.get(f"{stream}.a")
    assert stored is not None and (stored.seq, stored.data, stored.headers.get("H")) == (second, b"3", "v")
    # No such stream: 404 as well, read as nothing stored (as nats-py's NotFoundError was).
    assert await last_sequence(LastMessage(link.replies, "NO_SUCH_STREAM", 2.0), "x") == 0


async def test_stream_bounds_read_the_leaders_state(link: NatsLink) -> None:
    assert link.js is not None
    stream = f"SB{uuid.uuid4().hex[:10]}"
    await link.js.add_stream(name=stream, subjects=[f"{stream}.>"], storage=StorageType.MEMORY)
    assert await stream_bounds(link.replies, stream, 2.0) == (0, 0)
    for i in range(5):
        await link.js.publish(f"{stream}.s{i % 2}", b"x")
    await link.js.purge_stream(stream, subject=f"{stream}.s0")  # 1, 3, 5 gone: 2 and 4 left
    info = await link.js.stream_info(stream)
    assert await stream_bounds(link.replies, stream, 2.0) == (info.state.first_seq, info.state.last_seq) == (2, 5)
    with pytest.raises(BrokerUnavailable, match="stream info failed: stream not found"):
        await stream_bounds(link.replies, "NO_SUCH_STREAM", 2.0)


async def test_a_kv_write_while_nats_reconnects_waits_for_it(tmp_path: Any) -> None:
    """As nats-py's requests did: a compare-and-set asked while the client
    reconnects goes out once it is back (within the timeout), not failed at once."""
    server = NatsServer(port=free_port(), store_dir=str(tmp_path / "js")).start()
    link = await connected_link(server.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
    try:
        assert link.js is not None and link.nc is not None
        kv = await link.js.create_key_value(KeyValueConfig(bucket="RECONNECT", history=1))
        bucket = Bucket(link, kv, 5.0)
        server.stop()
        nc = link.nc
        await wait_for(lambda: nc.is_reconnecting, timeout=5)
        with pytest.raises(BrokerUnavailable):
            link.client()  # fail-fast users still fail fast
        writing = asyncio.ensure_future(compare_and_set(bucket, "k", lambda _: b"v", tries=3))
        await asyncio.sleep(0.3)
        assert not writing.done()
        server.start()
        assert await asyncio.wait_for(writing, timeout=5)
        assert (await kv.get("k")).value == b"v"
    finally:
        if link.nc is not None:
            await link.nc.close()
        server.cleanup()


async def test_concurrent_wants_share_round_trips_and_are_live_when_live_returns(nats_server: NatsServer) -> None:
    """Many connects subscribing at once: one PING/PONG confirms many SUBs,
    and each channel is live on the server when live() returns after its
    want() — a message published right after, from another connection, arrives."""
    rounds = 120
    got: list[Delivery] = []
    broker = await started_broker(nats_server, "cf", got)
    publisher = await nats.connect(nats_server.url)
    pings = count_pings(broker)
    try:

        async def want_then_publish(i: int) -> None:
            await broker.pubsub.want(room_channel(f"r{i}"))
            await broker.pubsub.live()
            await publisher.publish(f"cf_live.room.r{i}", b'"x"')  # ephemeral: straight to the live subject
            await publisher.flush()

        await asyncio.gather(*(want_then_publish(i) for i in range(rounds)))
        await wait_for(lambda: len(got) >= rounds, timeout=5)
        assert sorted(d.channel for d in got) == sorted(f"room:r{i}" for i in range(rounds))
        assert pings.count <= rounds // 10, f"{pings.count} round trips for {rounds} subscriptions"
    finally:
        await publisher.close()
        await broker.close()


async def test_a_subscription_not_confirmed_in_time_fails_live_and_goes_with_its_unwant(
    nats_server: NatsServer,
) -> None:
    config = NatsConfig(
        urls=(nats_server.url,), subjects=Subjects("cu", "cu_live"), stream="CU", storage="memory", publish_timeout=1
    )
    broker = NatsBroker(config, broker_events())
    await broker.start()
    nc = broker._link.nc
    assert nc is not None

    async def never(timeout: int = 10) -> None:
        await asyncio.sleep(30)

    nc.flush = never  # type: ignore[method-assign]
    late = room_channel("late")
    try:
        await broker.pubsub.want(late)
        with pytest.raises(BrokerUnavailable, match="not confirmed"):
            # With a position given, no read of its own confirms the SUB: the ping must.
            await asyncio.wait_for(broker.pubsub.live(0), timeout=3)
        await broker.pubsub.unwant(late)  # what a session that failed to open does
        await wait_for(lambda: broker.pubsub.subscriptions == 0, timeout=3)  # after unsubscribe_delay
        assert not [s for s in nc._subs.values() if s.subject.startswith("cu_live")]
    finally:
        await broker.close()


async def test_a_request_answered_after_the_subs_makes_them_live_without_a_ping(nats_server: NatsServer) -> None:
    """The connect's own requests, made after its SUBs, show the server has
    them: live() then needs no round trip of its own. A request made before
    a SUB shows nothing about it."""
    got: list[Delivery] = []
    broker = await started_broker(nats_server, "cq", got)
    publisher = await nats.connect(nats_server.url)
    pings = count_pings(broker)
    try:
        replies = broker._link.replies
        issued = replies.issued
        early = asyncio.ensure_future(broker.history.position())
        await wait_for(lambda: replies.issued > issued, timeout=1)  # its request is made, before the SUB
        await broker.pubsub.want(room_channel("a"))
        await broker.pubsub.live(await early)
        assert pings.count == 1  # the answer came after the SUB was queued, but says nothing of it

        await broker.pubsub.want(room_channel("b"))
        await broker.pubsub.live(await broker.history.position())  # asked after the SUB
        assert pings.count == 1
        await broker.pubsub.want(room_channel("c"))
        await broker.pubsub.live()  # reads the position itself (after the SUB): no ping either
        assert pings.count == 1
        await publisher.publish("cq_live.room.b", b'"x"')
        await publisher.flush()
        await wait_for(lambda: [d.channel for d in got] == ["room:b"], timeout=5)
    finally:
        await publisher.close()
        await broker.close()


async def test_presence_writes_a_burst_in_batches_and_announces_each_join_and_leave(
    nats_server: NatsServer,
) -> None:
    """A connect storm marks one presence entry per connect: they go out as
    pipelined batches, not one round trip each, and still end as the last
    mark of each key says; rooms that announce get one join and one leave per user."""
    got: list[Delivery] = []
    config = NatsConfig(
        urls=(nats_server.url,),
        subjects=Subjects("pb", "pb_live"),
        stream="PB",
        storage="memory",
        join_leave_rooms=("stage",),
    )
    broker = NatsBroker(config, broker_events(got.append))
    await broker.start()
    presence = broker.presence
    acks = presence._acks
    assert acks is not None
    batches = 0
    real_publish = acks.publish

    async def counted(messages: Any) -> Any:
        nonlocal batches
        batches += 1
        return await real_publish(messages)

    acks.publish = counted  # type: ignore[method-assign]
    lobby, stage = room_channel("lobby"), room_channel("stage")
    try:
        users = [f"u{i}" for i in range(300)]
        for user in users:
            presence.mark(lobby, user, True)
        for user in users[::3]:
            presence.mark(lobby, user, False)  # gone again, maybe before its entry was written
        await wait_for(lambda: not presence._pending, timeout=10)
        assert await presence.members(lobby) == sorted(users[1::3] + users[2::3])
        assert batches <= 6, f"{batches} batches for 400 marks"

        await broker.pubsub.want(stage)
        for user in users[:20]:
            presence.mark(stage, user, True)
        await wait_for(lambda: sum(d.kind is Kind.JOIN for d in got) >= 20, timeout=10)
        for user in users[:20]:
            presence.mark(stage, user, False)
        await wait_for(lambda: sum(d.kind is Kind.LEAVE for d in got) >= 20, timeout=10)
        await asyncio.sleep(0.2)
        joins = sorted(d.payload.decode() for d in got if d.kind is Kind.JOIN)
        leaves = sorted(d.payload.decode() for d in got if d.kind is Kind.LEAVE)
        assert joins == leaves == sorted(users[:20])
        assert await presence.members(stage) == []
    finally:
        await broker.close()


async def test_a_count_out_reads_nothing_and_a_refusal_on_an_old_table_is_checked_again(
    nats_server: NatsServer,
) -> None:
    """A node tries the user's table as it last wrote it: a count out (and a
    second tab's count in) then needs no read. When another node changed the
    table meanwhile, the write is refused and the node reads it again — also
    when the old table said the user was at the limit."""
    config = NatsConfig(urls=(nats_server.url,), subjects=Subjects("kc", "kc_live"), stream="KC", storage="memory")
    a = NatsBroker(dataclasses.replace(config, node_id="a"), broker_events())
    b = NatsBroker(dataclasses.replace(config, node_id="b"), broker_events())
    await a.start()
    await b.start()
    kv = a.connections._kv
    assert kv is not None
    reads = 0
    real_get = kv.get

    async def counted_get(key: str) -> tuple[bytes | None, int]:
        nonlocal reads
        reads += 1
        return await real_get(key)

    kv.get = counted_get  # type: ignore[method-assign]
    try:
        await a.connections.open("ivan", "a:1", 2, False)
        assert reads == 1  # never seen: read, then written
        await a.connections.open("ivan", "a:2", 2, False)
        await a.connections._count_out("ivan", "a:1")
        assert reads == 1  # both from the table as this node wrote it
        await b.connections.open("ivan", "b:1", 2, False)  # ivan is at the limit now
        await a.connections._count_out("ivan", "a:2")  # refused over b's write: read again
        assert reads == 2
        await b.connections.open("ivan", "b:2", 2, False)
        await b.connections._count_out("ivan", "b:1")
        # a's last table says ivan is at the limit (a:2 gone, b:1 and b:2 in), b counted one out since.
        full = {"b:1": [b.presence.instance, 1.0], "b:2": [b.presence.instance, 2.0]}
        a.connections._known["ivan"] = (orjson.dumps(full), 1)
        await a.connections.open("ivan", "a:3", 2, False)
        assert reads == 3
        with pytest.raises(TooManyConnections):
            await a.connections.open("ivan", "a:4", 2, False)
    finally:
        await a.close()
        await b.close()
