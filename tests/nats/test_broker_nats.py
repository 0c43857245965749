"""The NATS broker on its own, against a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable

import aiohttp
import nats
import pytest

from broker import BrokerUnavailable, Delivery, Replay
from broker.channels import Subjects, room_channel
from broker.embedded import NatsServer
from broker.jetstream import NatsBroker, NatsConfig

from ..helpers import broker_events, wait_for

ROOM_X = room_channel("x")


async def subjects_of(nats_server: NatsServer, name: str, prefix: str) -> list[str]:
    url = f"http://127.0.0.1:{nats_server.monitor_port}/connz?subs=1&limit=1024"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        doc = await resp.json()
    for conn in doc["connections"]:
        if conn.get("name") == name:
            return [s for s in conn.get("subscriptions_list", []) if s.startswith(prefix)]
    return []


async def test_cancelled_want_leaves_no_subscription_behind(nats_server: NatsServer) -> None:
    """A connection that goes away while its channel is being subscribed must
    not leave a NATS subscription that later doubles every delivery."""
    got: list[Delivery] = []
    config = NatsConfig(
        urls=(nats_server.url,),
        name="cancel-test",
        subjects=Subjects("cx", "cx_live"),
        stream="CX",
        storage="memory",
        unsubscribe_delay=0.0,
    )
    broker = NatsBroker(config, broker_events(got.append))
    await broker.start()
    try:
        for i in range(24):
            want = asyncio.create_task(broker.pubsub.want(ROOM_X))
            for _ in range(i % 6):  # cancel at different points of subscribe + confirm
                await asyncio.sleep(0)
            want.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await want
            if not want.cancelled():
                await broker.pubsub.unwant(ROOM_X)  # it completed before the cancel: give it back

        async def no_leftovers() -> bool:
            return await subjects_of(nats_server, "cancel-test", "cx_live.") == []

        await wait_for(no_leftovers, timeout=5)
        await broker.pubsub.want(ROOM_X)
        await broker.pubsub.live()
        assert await subjects_of(nats_server, "cancel-test", "cx_live.") == ["cx_live.room.x"]
        seq = await broker.pubsub.publish(ROOM_X, b'"once"')
        await wait_for(lambda: len(got) >= 1)
        await asyncio.sleep(0.2)
        assert [(d.channel, d.seq) for d in got] == [("room:x", seq)]
    finally:
        await broker.close()


async def test_second_stream_on_the_same_subjects_fails_with_the_servers_reason(nats_server: NatsServer) -> None:
    """Two streams cannot capture one prefix: the node says why, instead of a
    misleading 'stream not found'."""

    def config(stream: str) -> NatsConfig:
        return NatsConfig(
            urls=(nats_server.url,), subjects=Subjects("ovl", "ovl_live"), stream=stream, storage="memory"
        )

    first = NatsBroker(config("OVL_ONE"), broker_events())
    await first.start()
    second = NatsBroker(config("OVL_TWO"), broker_events())
    try:
        with pytest.raises(BrokerUnavailable, match=r"OVL_TWO.*overlap"):
            await second.start()
    finally:
        await second.close()
        await first.close()


async def test_a_wanted_channel_is_live_when_live_returns(nats_server: NatsServer) -> None:
    """live() returns only once the server has the subscriptions wanted
    before it: a message published right after, from another connection, is
    never missed. (nats-py's flush() writes its PING ahead of a SUB still pending.)"""
    got: list[Delivery] = []
    config = NatsConfig(urls=(nats_server.url,), subjects=Subjects("lv", "lv_live"), stream="LV", storage="memory")
    broker = NatsBroker(config, broker_events(got.append))
    await broker.start()
    publisher = await nats.connect(nats_server.url)
    try:
        rounds = 150
        for i in range(rounds):
            await broker.pubsub.want(room_channel(f"r{i}"))
            await broker.pubsub.live()
            await publisher.publish(f"lv_live.room.r{i}", b'"x"')  # ephemeral: straight to the live subject
        await publisher.flush()
        await wait_for(lambda: len(got) >= rounds, timeout=5)
        assert sorted(d.channel for d in got) == sorted(f"room:r{i}" for i in range(rounds))
    finally:
        await publisher.close()
        await broker.close()


async def test_a_one_channel_replay_asks_the_stream_leader_not_any_replica(nats_server: NatsServer) -> None:
    """Whether anything is newer than a position is asked of the stream leader
    (STREAM.MSG.GET), never as a direct get, which any replica may answer from
    behind: "nothing newer" from one would skip acked messages for good. A
    direct get may then read what the leader said is there (store.py checks
    that it got up to it)."""
    config = NatsConfig(urls=(nats_server.url,), subjects=Subjects("dg", "dg_live"), stream="DG", storage="memory")
    broker = NatsBroker(config, broker_events())
    await broker.start()
    spy = await nats.connect(nats_server.url)
    asked: list[str] = []

    async def note(msg: nats.aio.msg.Msg) -> None:
        asked.append(msg.subject)

    async def asked_by(replay: Awaitable[Replay]) -> tuple[list[int], list[str]]:
        deliveries = (await replay).deliveries
        await spy.flush()
        await asyncio.sleep(0.1)
        kinds = [s.split(".")[2] for s in asked]  # DIRECT or STREAM
        asked.clear()
        return [d.seq for d in deliveries], kinds

    try:
        await spy.subscribe("$JS.API.DIRECT.GET.>", cb=note)
        await spy.subscribe("$JS.API.STREAM.MSG.GET.>", cb=note)
        await spy.flush()
        first = await broker.pubsub.publish(ROOM_X, b"1")
        second = await broker.pubsub.publish(ROOM_X, b"2")
        assert await asked_by(broker.history.replay([ROOM_X], second, 100)) == ([], ["STREAM"])
        assert await asked_by(broker.history.replay([ROOM_X], first, 100)) == ([second], ["STREAM", "DIRECT"])
    finally:
        await spy.close()
        await broker.close()
