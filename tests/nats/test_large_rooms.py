"""Rooms with many members: a reconnect storm into one room reads the
room's missed messages from the stream once, not once per member."""

from __future__ import annotations

import asyncio

import aiohttp
import nats

from broker.embedded import NatsServer

from ..helpers import PUBLISH_HEADERS, NodeFactory, RunningNode, recv_json, token

MEMBERS = 60
MISSED = 150  # more than a batch direct get reads (store.DIRECT_BATCH): a consumer read


async def publish_batch(http: aiohttp.ClientSession, node: RunningNode, channel: str, n: int) -> list[str]:
    body = [{"channel": channel, "data": {"n": i}} for i in range(n)]
    async with http.post(node.url + "/api/publish", json=body, headers=PUBLISH_HEADERS) as r:
        assert r.status == 200, await r.text()
        return list((await r.json())["ids"])


async def test_a_reconnect_storm_into_one_room_reads_it_once(
    node_factory: NodeFactory, nats_server: NatsServer
) -> None:
    """Every member of a big room resuming at once (a node drained, a network
    blip) asked the stream for the room's missed messages on its own: a
    JetStream consumer each. At 2,000 members most reads timed out and their
    clients were closed 1013 (a storm of retries); here each member still
    gets every message once, in order, and the room is read a few times at most."""
    node = await node_factory()
    stream = node.settings.stream.name
    watcher = await nats.connect(nats_server.url)
    creates: list[str] = []

    async def seen(msg: nats.aio.msg.Msg) -> None:
        creates.append(msg.subject)

    await watcher.subscribe(f"$JS.API.CONSUMER.CREATE.{stream}.>", cb=seen)
    await watcher.flush()
    async with aiohttp.ClientSession() as http:
        (since,) = await publish_batch(http, node, "room:big", 1)
        missed: list[str] = []
        while len(missed) < MISSED:
            missed += await publish_batch(http, node, "room:big", min(100, MISSED - len(missed)))

        async def member(i: int) -> list[str]:
            params = {"token": token(f"m{i}"), "room": "big", "since": since}
            async with http.ws_connect(node.ws_url, params=params) as ws:
                assert (await recv_json(ws, timeout=20))["type"] == "welcome"
                return [(await recv_json(ws, timeout=20))["id"] for _ in missed]

        got = await asyncio.gather(*(member(i) for i in range(MEMBERS)))
    await watcher.flush()
    await watcher.close()
    assert all(ids == missed for ids in got)
    reads = [subject for subject in creates if subject.endswith(".room.big")]
    assert len(reads) <= MEMBERS // 6, f"{len(reads)} consumers read the room for {MEMBERS} resumes"
