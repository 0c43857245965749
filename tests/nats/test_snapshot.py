"""Reading a stream through a snapshot consumer (broker/snapshot.py), on a real nats-server."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import StorageType, StreamConfig

from broker import BrokerUnavailable, Channel
from broker.channels import Subjects, room_channel, user_channel
from broker.embedded import NatsServer
from broker.jetstream import NatsBroker, NatsConfig
from broker.snapshot import Puller, read_snapshot, snapshot_config
from broker.store import DIRECT_TIMEOUT, MAX_CONSUMER_READS

from ..helpers import broker_events


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url)
    try:
        yield client
    finally:
        await client.close()


async def stream_with(nc: Client, count: int) -> str:
    name = "SNAP" + uuid.uuid4().hex[:8].upper()
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], storage=StorageType.MEMORY))
    for i in range(count):
        await js.publish(f"{name}.{'a' if i % 2 else 'b'}", b"%d" % i)
    return name


async def test_a_pull_to_a_consumer_not_reachable_yet_is_asked_again(nc: Client) -> None:
    """Right after a consumer is created on another server, a pull request to
    it can find no responders: it is asked again, not failed (nats-py's fetch
    raises for one message, and waits out its timeout for several)."""
    stream = await stream_with(nc, 3)
    js = nc.jetstream()
    puller = await Puller.open(js, stream, "later", timeout=5.0)
    try:
        pulled = asyncio.create_task(puller.pull(3))
        await asyncio.sleep(0.02)  # its first request has no responders
        await js.add_consumer(stream, config=snapshot_config("later", [f"{stream}.>"]))
        got = await asyncio.wait_for(pulled, 2.0)
    finally:
        await puller.close()
    assert [m.data for m in got] == [b"0", b"1", b"2"]


async def test_a_consumer_that_never_appears_is_an_error(nc: Client) -> None:
    stream = await stream_with(nc, 1)
    puller = await Puller.open(nc.jetstream(), stream, "never", timeout=0.5)
    try:
        with pytest.raises(nats.js.errors.ServiceUnavailableError):
            await puller.pull(1)
    finally:
        await puller.close()


async def test_a_snapshot_reads_what_was_pending_and_nothing_after(nc: Client) -> None:
    stream = await stream_with(nc, 5)
    js = nc.jetstream()
    config = snapshot_config("snap", [f"{stream}.a"], start_seq=2)
    got = await read_snapshot(js, stream, config, lambda m: m.metadata.sequence.stream, 100, 5.0)
    assert got == [2, 4]
    # A sequence to reach that is not stored yet: the read waits for it, then times out.
    config = snapshot_config("snap2", [f"{stream}.a"], start_seq=2)
    with pytest.raises(TimeoutError):
        await read_snapshot(js, stream, config, lambda m: m.data, 100, 0.3, reach={f"{stream}.a": 6})


async def test_a_read_behind_its_reach_waits_for_the_copy_to_catch_up(nc: Client) -> None:
    """What a lagging replica looks like to the reader: the sequence to reach
    is stored only after the consumer was made."""
    stream = await stream_with(nc, 5)
    js = nc.jetstream()
    config = snapshot_config("behind", [f"{stream}.a", f"{stream}.b"], start_seq=5)
    reading = asyncio.create_task(
        read_snapshot(js, stream, config, lambda m: m.metadata.sequence.stream, 100, 5.0, reach={f"{stream}.a": 7})
    )
    await asyncio.sleep(0.1)
    for _ in range(3):
        await js.publish(f"{stream}.a", b"late")  # 6, 7, 8
    assert (await asyncio.wait_for(reading, 3.0))[:3] == [5, 6, 7]


async def test_a_replay_without_the_leaders_last_sequences_fails_rather_than_guess(nats_server: NatsServer) -> None:
    """Without them a read may end on a copy that is behind, silently short:
    the replay says it could not read (the client retries, a gap repair
    tries again or announces a reset)."""
    config = NatsConfig(urls=(nats_server.url,), subjects=Subjects("snl", "snl_live"), stream="SNL", storage="memory")
    broker = NatsBroker(config, broker_events())
    await broker.start()
    try:
        room = room_channel("x")
        seq = await broker.pubsub.publish(room, b'"m"')
        assert [d.seq for d in (await broker.history.replay([room], 0, 10)).deliveries] == [seq]

        class Silent:
            async def get(self, subject: str) -> None:
                raise BrokerUnavailable("JetStream did not answer in time")

        broker.history._leader = Silent()  # type: ignore[assignment]
        with pytest.raises(BrokerUnavailable):
            await broker.history.replay([room, user_channel("u")], 0, 10)
    finally:
        await broker.close()


@pytest.fixture
async def history_broker(nats_server: NatsServer) -> AsyncIterator[NatsBroker]:
    name = "SND" + uuid.uuid4().hex[:6].upper()
    config = NatsConfig(
        urls=(nats_server.url,), subjects=Subjects(name.lower(), name.lower() + "_live"), stream=name, storage="memory"
    )
    broker = NatsBroker(config, broker_events())
    await broker.start()
    try:
        yield broker
    finally:
        await broker.close()


async def _published(broker: NatsBroker, channels: list[Channel]) -> list[int]:
    return [await broker.pubsub.publish(c, b'"m"') for c in channels]


async def test_a_short_replay_needs_no_consumer(history_broker: NatsBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    """A few messages per channel are read with direct gets, in sequence order across channels."""
    room, user = room_channel("x"), user_channel("u")
    (before,) = await _published(history_broker, [room])
    missed = await _published(history_broker, [room, user, room, room, user])

    async def no_consumer(*args: object, **kwargs: object) -> None:
        raise AssertionError("a consumer was created")

    monkeypatch.setattr("broker.store.read_stored", no_consumer)
    replay = await history_broker.history.replay([room, user], before, 100)
    assert [(d.channel, d.seq) for d in replay.deliveries] == list(
        zip([room, user, room, room, user], missed, strict=True)
    )


async def test_a_replay_longer_than_a_batch_or_behind_reads_a_consumer(
    history_broker: NatsBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    room, user = room_channel("x"), user_channel("u")
    missed = await _published(history_broker, [room, user, room, room])
    monkeypatch.setattr("broker.store.DIRECT_BATCH", 2)  # the room has 3
    replay = await history_broker.history.replay([room, user], 0, 100)
    assert [d.seq for d in replay.deliveries] == missed
    monkeypatch.setattr("broker.store.DIRECT_BATCH", 100)
    pages = history_broker.history._pages
    read = pages.read

    async def behind(*args: Any) -> list[Any]:
        return (await read(*args))[:-1]  # a copy that lacks the newest

    monkeypatch.setattr(pages, "read", behind)
    replay = await history_broker.history.replay([room, user], 0, 100)
    assert [d.seq for d in replay.deliveries] == missed


async def test_a_copy_that_does_not_answer_a_direct_read_is_passed_over_soon(
    history_broker: NatsBroker, nats_server: NatsServer
) -> None:
    """Not after the whole request timeout: the consumer read is asked after DIRECT_TIMEOUT."""
    room = room_channel("x")
    missed = await _published(history_broker, [room, room])
    pages = history_broker.history._pages
    assert pages._timeout >= 3 * DIRECT_TIMEOUT
    silent = await nats.connect(nats_server.url)
    try:
        await silent.subscribe("_herald_test.silent", cb=_ignore)  # takes the direct gets, answers none
        await silent.flush()
        pages._api = "_herald_test.silent"
        started = time.monotonic()
        replay = await history_broker.history.replay([room], 0, 100)
        assert [d.seq for d in replay.deliveries] == missed
        assert time.monotonic() - started < 2 * DIRECT_TIMEOUT
    finally:
        await silent.close()


async def _ignore(msg: Msg) -> None:
    pass


async def test_a_storm_of_slow_direct_reads_does_not_become_a_consumer_each(
    history_broker: NatsBroker, nats_server: NatsServer
) -> None:
    """A node too busy to take its direct gets' answers within DIRECT_TIMEOUT
    (a reconnect storm of inboxes) is not a silent copy: a consumer per
    replay would cost the server more (nats-server refuses a stream's
    1001st consumer: the clients were closed 1013). At most
    MAX_CONSUMER_READS are made; the other replays take their direct answers."""
    users = [user_channel(f"u{i}") for i in range(300)]
    missed = await _published(history_broker, users)
    stream = history_broker._config.stream
    pages = history_broker.history._pages
    real_api = pages._api
    late = await nats.connect(nats_server.url)
    made = at_once = 0  # consumers made, and the most there were at once
    forwards: set[asyncio.Task[None]] = set()

    async def forward(msg: Msg) -> None:
        await asyncio.sleep(DIRECT_TIMEOUT + 0.5)
        await late.publish(real_api, msg.data, reply=msg.reply)

    async def answer_late(msg: Msg) -> None:  # the answers arrive after DIRECT_TIMEOUT
        task = asyncio.create_task(forward(msg))
        forwards.add(task)
        task.add_done_callback(forwards.discard)

    async def count(msg: Msg) -> None:  # one subscription: creates and deletes in the order sent
        nonlocal made, at_once
        live = made - int(msg.subject.startswith(f"$JS.API.CONSUMER.DELETE.{stream}."))
        made = live + int(msg.subject.startswith(f"$JS.API.CONSUMER.CREATE.{stream}."))
        at_once = max(at_once, made)

    try:
        await late.subscribe("_herald_test.late", cb=answer_late)
        await late.subscribe("$JS.API.CONSUMER.>", cb=count)
        await late.flush()
        pages._api = "_herald_test.late"
        replays = await asyncio.gather(*(history_broker.history.replay([u], 0, 10) for u in users))
        await late.flush()
    finally:
        await late.close()
    assert [[d.seq for d in r.deliveries] for r in replays] == [[seq] for seq in missed]
    assert 0 < at_once <= MAX_CONSUMER_READS
