"""Read positions are trusted only for the stream they were written against,
and never past its end (docs/protocol.md 7.3): a client bug or a recreated
stream must not silence a user's inbox for good."""

from __future__ import annotations

from typing import Any

import aiohttp
import nats
import orjson

from broker.embedded import NatsServer
from broker.kv import key_token

from ..helpers import RunningNode, make_settings, scrape, start_node, wait_for
from .test_inbox import cluster, connect, messages, publish_many, quiet, read


async def test_a_read_past_the_end_is_refused_and_changes_nothing(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    ids = await publish_many(http, node, "user:ana", 2)
    ws, welcome = await connect(http, node, "ana")
    assert welcome["unread"] == 2
    await messages(ws, 2)
    frame = await read(ws, "999999999")
    assert frame["type"] == "error" and frame["code"] == "bad_request"
    assert "past the stream's last message" in frame["message"]
    assert (await read(ws, ids[0]))["id"] == ids[0]  # the position is where it was: it still moves
    await ws.close()
    later = await publish_many(http, node, "user:ana", 3)
    ws, welcome = await connect(http, node, "ana")
    assert welcome["unread"] == 4  # ids[1] and the three later ones
    assert [m["id"] for m in await messages(ws, 4)] == [ids[1], *later]
    await ws.close()


async def test_a_position_at_the_last_message_leaves_nothing_unread(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    ids = await publish_many(http, node, "user:bo", 3)
    ws, _ = await connect(http, node, "bo")
    await messages(ws, 3)
    assert (await read(ws, ids[-1]))["id"] == ids[-1]
    await ws.close()
    ws, welcome = await connect(http, node, "bo")
    assert welcome["unread"] == 0
    await quiet(ws)
    await ws.close()


async def test_positions_of_a_deleted_stream_do_not_silence_the_new_one(
    nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    shared = cluster()
    settings = make_settings(nats_server.url, subject=shared["subject"], stream=shared["stream"])
    first = await start_node(settings)
    try:
        ids = await publish_many(http, first, "user:cy", 30)
        ws, _ = await connect(http, first, "cy")
        await messages(ws, 30)
        assert (await read(ws, ids[-1]))["id"] == ids[-1]  # read up to 30-something
        await ws.close()
    finally:
        await first.stop()
    nc = await nats.connect(nats_server.url)
    await nc.jetstream().delete_stream(shared["stream"]["name"])  # an operator's mistake; sequences start over
    await nc.close()

    second = await start_node(settings)
    try:
        fresh = await publish_many(http, second, "user:cy", 3)  # ids 1..3 of the new stream: below the old position
        ws, welcome = await connect(http, second, "cy")
        assert welcome["unread"] == 3
        assert [m["id"] for m in await messages(ws, 3)] == fresh
        await ws.close()
        metrics: dict[str, Any] = await scrape(http, second.url)
        assert metrics["herald_read_positions_reset_total"] >= 1
        # Reading in the new stream works as usual from then on.
        ws, _ = await connect(http, second, "cy")
        await messages(ws, 3)
        assert (await read(ws, fresh[-1]))["id"] == fresh[-1]
        await ws.close()
        ws, welcome = await connect(http, second, "cy")
        assert welcome["unread"] == 0
        await ws.close()
    finally:
        await second.stop()


async def test_a_position_stored_without_its_stream_never_moves_back(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    """A position stored before positions named their stream counts (up to the
    stream's end) for ``unread``; a lower ``read`` then leaves it where it is."""
    ids = await publish_many(http, node, "user:leg", 6)
    nc = await nats.connect(node.settings.nats.urls[0])
    try:
        kv = await nc.jetstream().key_value(node.settings.stream.name + "_read")
        await kv.put(key_token("leg"), ids[3].encode())  # the old format: the sequence alone
    finally:
        await nc.close()
    ws, welcome = await connect(http, node, "leg")
    assert welcome["unread"] == 2
    await messages(ws, 2)
    assert (await read(ws, ids[1]))["id"] == ids[3]
    await ws.close()
    ws, welcome = await connect(http, node, "leg")
    await ws.close()
    assert welcome["unread"] == 2


async def test_a_position_left_unmoved_past_the_inboxs_age_leaves_the_bucket(
    node_factory: Any, http: aiohttp.ClientSession, nats_server: NatsServer, monkeypatch: Any
) -> None:
    """A user's key in ``<stream>_read`` goes history.user_max_age (and
    READ_MARGIN) after its last move: every message at or before it is then
    past the inbox's age, so "nothing read" hands out the same inbox, and the
    bucket no longer keeps a key for every user that ever read (10,000 users
    left 10,000 keys for good)."""
    monkeypatch.setattr("broker.reads.READ_MARGIN", 0.0)
    node: RunningNode = await node_factory(history={"user_max_age": 2.0})
    ids = await publish_many(http, node, "user:cy", 2)
    ws, welcome = await connect(http, node, "cy")
    assert welcome["unread"] == 2
    await messages(ws, 2)
    assert (await read(ws, ids[-1]))["id"] == ids[-1]
    await ws.close()
    bucket = f"KV_{node.settings.stream.name}_read"
    nc = await nats.connect(nats_server.url)
    try:

        async def keys() -> int:
            info = await nc.request(f"$JS.API.STREAM.INFO.{bucket}", b"", timeout=2)
            return int(orjson.loads(info.data)["state"].get("num_subjects") or 0)

        assert await keys() == 1

        async def gone() -> bool:
            return await keys() == 0

        await wait_for(gone, timeout=8)
    finally:
        await nc.close()
    ws, welcome = await connect(http, node, "cy")  # what was read is past the inbox's age: not handed out again
    assert welcome["unread"] == 0
    await quiet(ws)
    later = await publish_many(http, node, "user:cy", 1)
    assert [m["id"] for m in await messages(ws, 1)] == later
    await ws.close()
