"""Idempotent and batch publishing through POST /api/publish (README:
Publishing from a backend), on two nodes of one cluster."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import pytest
from nats.js.api import StorageType, StreamConfig

from broker.acks import AckedPublisher, Refused
from broker.embedded import NatsServer

from ..helpers import ADMIN_KEY, PUBLISH_HEADERS, NodeFactory, RunningNode, recv_json, token
from .conftest import connected_link


async def cluster(node_factory: NodeFactory, n: int = 2, **sections: dict[str, Any]) -> list[RunningNode]:
    tag = "pb" + uuid.uuid4().hex[:8]
    shared: dict[str, Any] = {"subject": {"prefix": tag}, "stream": {"name": tag.upper(), "storage": "memory"}}
    return [await node_factory(**shared, **sections) for _ in range(n)]


async def post(
    http: aiohttp.ClientSession, node: RunningNode, body: Any, key: str | None = None, **headers: str
) -> tuple[int, dict[str, Any]]:
    if key is not None:
        headers["Idempotency-Key"] = key
    async with http.post(node.url + "/api/publish", json=body, headers={**PUBLISH_HEADERS, **headers}) as resp:
        return resp.status, await resp.json()


async def history_ids(http: aiohttp.ClientSession, node: RunningNode, channel: str) -> list[str]:
    async with http.get(
        node.url + "/api/history",
        params={"channel": channel, "limit": "200"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ) as resp:
        return [m["id"] for m in (await resp.json())["messages"]]


async def test_an_idempotency_key_publishes_once_across_nodes(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    a, b = await cluster(node_factory)
    body = {"channel": "room:lobby", "data": {"order": 1}}
    async with http.ws_connect(a.ws_url, params={"token": token("alice"), "room": "lobby"}) as ws:
        await recv_json(ws)
        # Three times in a row, then concurrently, to both nodes.
        answers = [await post(http, node, body, "order-1") for node in (a, b, a)]
        answers += await asyncio.gather(*(post(http, node, body, "order-1") for node in (a, b, a, b)))
        first = answers[0][1]["id"]
        assert all(status == 200 and answer["id"] == first for status, answer in answers), answers
        assert answers[0][1].get("duplicate") is None and answers[1][1]["duplicate"] is True
        other = await post(http, b, body, "order-2")
        assert other[0] == 200 and other[1]["id"] != first
        got = [(await recv_json(ws))["id"] for _ in range(2)]
        assert got == [first, other[1]["id"]]  # one delivery each
        await ws.send_json({"type": "ping"})
        assert (await recv_json(ws))["type"] == "pong"  # nothing else came
    assert await history_ids(http, a, "room:lobby") == [first, other[1]["id"]]


async def test_a_key_is_new_again_after_the_window(node_factory: NodeFactory, http: aiohttp.ClientSession) -> None:
    (node,) = await cluster(node_factory, 1, publish={"dedup_window": 1.0})
    body = {"channel": "room:lobby", "data": 1}
    first = (await post(http, node, body, "k"))[1]["id"]
    assert (await post(http, node, body, "k"))[1]["id"] == first
    await asyncio.sleep(1.5)
    assert (await post(http, node, body, "k"))[1]["id"] != first


async def test_a_batch_publishes_in_order_with_its_ids(node_factory: NodeFactory, http: aiohttp.ClientSession) -> None:
    a, b = await cluster(node_factory)
    items = [{"channel": "room:lobby" if i % 2 else "user:alice", "data": {"n": i}} for i in range(500)]
    async with http.ws_connect(b.ws_url, params={"token": token("alice"), "room": "lobby"}) as ws:
        await recv_json(ws)
        status, answer = await post(http, a, items)
        assert status == 200 and len(answer["ids"]) == 500
        ids = [int(i) for i in answer["ids"]]
        assert ids == sorted(ids) and len(set(ids)) == 500
        got = [await recv_json(ws) for _ in range(500)]
        assert [int(f["id"]) for f in got] == ids
        assert [f["data"]["n"] for f in got] == list(range(500))
    # The same batch again with a key: published once.
    keyed = [{"channel": "room:lobby", "data": i} for i in range(3)]
    once = (await post(http, a, keyed, "batch-7"))[1]["ids"]
    assert (await post(http, b, keyed, "batch-7"))[1]["ids"] == once


async def test_a_batch_key_does_not_swallow_another_keys_publish(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    """Items of a batch keyed "order-7" and a single publish keyed "order-7:1"
    are different keys: the single publish is stored."""
    batch = [{"channel": "room:a", "data": 0}, {"channel": "room:a", "data": 1}]
    batch_ids = (await post(http, node, batch, "order-7"))[1]["ids"]
    status, single = await post(http, node, {"channel": "user:bob", "data": "refund"}, "order-7:1")
    assert status == 200 and "duplicate" not in single and single["id"] not in batch_ids, (batch_ids, single)
    assert await history_ids(http, node, "user:bob") == [single["id"]]


async def test_one_bad_item_refuses_the_whole_batch(node: RunningNode, http: aiohttp.ClientSession) -> None:
    good = {"channel": "room:lobby", "data": 1}
    bad_items = [
        ({"channel": "room:a.b", "data": 1}, 400, "bad_request"),
        ({"channel": "room:*", "data": 1}, 400, "bad_request"),
        ({"channel": "room:lobby"}, 400, "bad_request"),
        ({"channel": "room:lobby", "data": 1, "colour": "red"}, 400, "bad_request"),
        ({"channel": "room:lobby", "data": 1, "event": "a b"}, 400, "bad_request"),
        ("just a string", 400, "bad_request"),
        ({"channel": "room:lobby", "data": "x" * 70_000}, 413, "too_large"),
    ]
    for bad, status, code in bad_items:
        answer = await post(http, node, [good, good, bad, good])
        assert answer[0] == status and answer[1]["error"] == code, (bad, answer)
        assert "item 2" in answer[1]["message"], answer
    status, answer = await post(http, node, [])
    assert (status, answer["error"]) == (400, "bad_request") and "publish.max_batch" in answer["message"]
    assert await history_ids(http, node, "room:lobby") == []  # nothing was published


async def test_bad_keys_and_bodies(node_factory: NodeFactory, http: aiohttp.ClientSession) -> None:
    node = await node_factory(publish={"max_batch": 10, "max_batch_body": 70_000})
    body = {"channel": "room:lobby", "data": 1}
    for key in ("", "with space", "x" * 129, "tab\tkey", "é"):
        status, answer = await post(http, node, body, key)
        assert (status, answer["error"]) == (400, "bad_request"), key
    assert (await post(http, node, [body] * 11))[0] == 400
    assert (await post(http, node, [{"channel": "room:lobby", "data": "y" * 30_000}] * 3))[0] == 413  # whole body
    assert (await post(http, node, {"channel": "room:lobby", "data": "y" * 66_000}))[0] == 413  # one message
    async with http.post(node.url + "/api/publish", json=[body], headers={"Idempotency-Key": "k"}) as resp:
        assert resp.status == 401


async def test_concurrent_batches_get_the_ids_of_their_own_messages(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """A batch is stored as one atomic batch (its messages in a row): its ids
    are its messages' even while other nodes publish into the stream."""
    a, b = await cluster(node_factory)
    assert a.node.broker.pubsub.atomic_batches  # nats-server 2.12+: the stream allows atomic batches
    batches = [[{"channel": "room:lobby", "data": f"{k}-{i}"} for i in range(40)] for k in range(4)]
    singles = [{"channel": "room:lobby", "data": f"single-{i}"} for i in range(20)]
    answers = await asyncio.gather(
        *(post(http, (a, b)[k % 2], batch) for k, batch in enumerate(batches)),
        *(post(http, (b, a)[i % 2], single) for i, single in enumerate(singles)),
    )
    assert all(status == 200 for status, _ in answers), answers
    async with http.get(
        a.url + "/api/history",
        params={"channel": "room:lobby", "limit": "200"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ) as resp:
        stored = {m["id"]: m["data"] for m in (await resp.json())["messages"]}
    assert len(stored) == 4 * 40 + 20
    for batch, (_, answer) in zip(batches, answers, strict=False):
        ids = [int(i) for i in answer["ids"]]
        assert ids == list(range(ids[0], ids[0] + 40))  # in a row
        assert [stored[str(i)] for i in ids] == [item["data"] for item in batch]


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "one-by-one"])
async def test_a_batch_the_stream_refuses_in_part(nats_server: NatsServer, atomic: bool) -> None:
    """Atomic: a message the stream refuses (here: too large for it) refuses
    the batch and none is stored. Message by message (a stream without atomic
    batches), the others are stored."""
    link = await connected_link(nats_server.url)
    assert link.nc is not None and link.js is not None
    name = "AT" + uuid.uuid4().hex[:8].upper()
    config = StreamConfig(
        name=name, subjects=[f"{name}.>"], allow_atomic=atomic, max_msg_size=300, storage=StorageType.MEMORY
    )
    await link.js.add_stream(config)
    acks = AckedPublisher(link, name, 5.0)
    acks.atomic = atomic
    small, big = (f"{name}.a", b"x", None), (f"{name}.a", b"y" * 400, None)
    try:
        with pytest.raises(Refused):
            await acks.publish([small, big, small])
        assert (await link.js.stream_info(name)).state.messages == (0 if atomic else 2)
        stored = await acks.publish([small, small, small])
        first = 1 if atomic else 3
        assert [p.seq for p in stored] == [first, first + 1, first + 2]
    finally:
        await link.nc.close()
