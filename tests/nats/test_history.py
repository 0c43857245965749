"""Room history on demand (docs/protocol.md 6.8, 10.3) and the position in
every welcome (3.2), on a real nats-server."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from broker.pages import Stored

from ..helpers import ADMIN_KEY, PUBLISH_HEADERS, NodeFactory, RunningNode, api_publish, recv_json, token


async def publish_many(http: aiohttp.ClientSession, node: RunningNode, items: list[tuple[str, Any]]) -> list[str]:
    """Publish in order; the ids."""
    return [await api_publish(http, node, channel, data) for channel, data in items]


async def ask(ws: aiohttp.ClientWebSocketResponse, cmd: dict[str, Any]) -> dict[str, Any]:
    await ws.send_json(cmd)
    return await recv_json(ws)


ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def ids(frame: dict[str, Any]) -> list[str]:
    return [m["id"] for m in frame["messages"]]


async def test_history_pages_backwards_oldest_first(node: RunningNode, http: aiohttp.ClientSession) -> None:
    # 120 lobby messages, interleaved with another room's (a page must skip those).
    items: list[tuple[str, Any]] = []
    for i in range(120):
        items.append(("room:lobby", {"n": i}))
        if i % 3 == 0:
            items.append(("room:other", {"n": i}))
    published = await publish_many(http, node, items)
    lobby = [seq for seq, (channel, _) in zip(published, items, strict=True) if channel == "room:lobby"]

    async with http.ws_connect(node.ws_url, params={"token": token("alice", publish=["*"])}) as ws:
        welcome = await recv_json(ws)
        assert welcome["position"] == published[-1]
        # An ephemeral message is never in history.
        await ask(ws, {"type": "publish", "room": "lobby", "data": "typing", "ephemeral": True})

        first = await ask(ws, {"type": "history", "room": "lobby", "limit": 50, "ref": 1})
        assert first["type"] == "history" and first["channel"] == "room:lobby" and first["ref"] == 1
        assert ids(first) == lobby[-50:]
        assert first["messages"][-1] == {
            "type": "message",
            "channel": "room:lobby",
            "id": lobby[-1],
            "event": "message",
            "data": {"n": 119},
        }
        second = await ask(ws, {"type": "history", "room": "lobby", "limit": 50, "before": lobby[-50]})
        assert ids(second) == lobby[-100:-50]
        last = await ask(ws, {"type": "history", "room": "lobby", "limit": 50, "before": ids(second)[0]})
        assert ids(last) == lobby[:20]  # the start: fewer than limit
        assert ids(await ask(ws, {"type": "history", "room": "lobby", "before": lobby[0]})) == []
        # The default limit is 50; before past the end is the newest page.
        assert ids(await ask(ws, {"type": "history", "room": "lobby", "before": "999999999"})) == lobby[-50:]
        assert (
            ids(await ask(ws, {"type": "history", "channel": "room:other", "limit": 3}))
            == [seq for seq, (channel, _) in zip(published, items, strict=True) if channel == "room:other"][-3:]
        )


async def test_history_of_a_skewed_room_is_exact(node: RunningNode, http: aiohttp.ClientSession) -> None:
    """A room busy long ago and quiet since: the page start is placed by
    search, not by assuming an even spread."""
    items: list[tuple[str, Any]] = [("room:burst", {"n": i}) for i in range(80)]
    items += [("room:noise", {"n": i}) for i in range(300)]
    items += [("room:burst", {"n": 80 + i}) for i in range(5)]
    published = await publish_many(http, node, items)
    burst = [seq for seq, (channel, _) in zip(published, items, strict=True) if channel == "room:burst"]
    async with http.ws_connect(node.ws_url, params={"token": token("alice")}) as ws:
        await recv_json(ws)
        assert ids(await ask(ws, {"type": "history", "room": "burst", "limit": 30})) == burst[-30:]
        assert ids(await ask(ws, {"type": "history", "room": "burst", "limit": 7, "before": burst[40]})) == burst[33:40]


async def test_history_refusals(node: RunningNode, http: aiohttp.ClientSession) -> None:
    async with http.ws_connect(node.ws_url, params={"token": token("alice", rooms=["lobby"])}) as ws:
        await recv_json(ws)
        bad = [
            {"room": "secret"},
            {"channel": "user:bob"},
            {"room": "lobby", "limit": 0},
            {"room": "lobby", "limit": -1},
            {"room": "lobby", "limit": 10_000},
            {"room": "lobby", "limit": 2.5},
            {"room": "lobby", "limit": "\u00b2"},  # a digit to str.isdigit, not to int()
            {"room": "lobby", "limit": "9" * 5000},  # more digits than int() reads
            {"room": "lobby", "before": "abc"},
            {"room": "lobby", "before": -5},
            {"room": "a.b"},
            {"channel": "room:*"},
        ]
        codes = [(await ask(ws, {"type": "history", **cmd}))["code"] for cmd in bad]
        assert codes == ["forbidden", "forbidden"] + ["bad_request"] * 10


async def test_a_room_history_limit_caps_every_page(node_factory: NodeFactory, http: aiohttp.ClientSession) -> None:
    node = await node_factory(rooms={"history": ("small-*=5/3600",)})
    published = await publish_many(http, node, [("room:small-1", {"n": i}) for i in range(12)])
    async with http.ws_connect(node.ws_url, params={"token": token("alice")}) as ws:
        await recv_json(ws)
        assert ids(await ask(ws, {"type": "history", "room": "small-1", "limit": 50})) == published[-5:]
        # Older than the newest five is not held: nothing before them.
        assert ids(await ask(ws, {"type": "history", "room": "small-1", "before": published[-5]})) == []
        assert ids(await ask(ws, {"type": "history", "room": "small-1", "before": published[-2]})) == published[-5:-2]


async def test_a_page_of_more_than_half_the_read_size_is_whole(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """A page of up to history.page_max (1000) messages is the newest ``limit``:
    placing its start may leave up to as many before it to read past."""
    node = await node_factory(history={"room_max": 3000, "page_max": 1000})
    batch = [{"channel": "room:a", "data": i} for i in range(1000)]
    published: list[str] = []
    for _ in range(2):
        async with http.post(node.url + "/api/publish", json=batch, headers=PUBLISH_HEADERS) as resp:
            published += (await resp.json())["ids"]
    for limit, before in ((1000, None), (700, None), (1000, published[1500])):
        params = {"channel": "room:a", "limit": str(limit), **({} if before is None else {"before": before})}
        async with http.get(node.url + "/api/history", params=params, headers=ADMIN) as resp:
            page = ids(await resp.json())
        end = len(published) if before is None else published.index(before)
        assert page == published[end - limit : end], (limit, before, len(page))


async def test_the_user_inbox_history(node: RunningNode, http: aiohttp.ClientSession) -> None:
    mine = await publish_many(http, node, [("user:alice", {"n": i}) for i in range(3)])
    await api_publish(http, node, "user:bob", {"n": "not alice's"})
    async with http.ws_connect(node.ws_url, params={"token": token("alice")}) as ws:
        assert (await recv_json(ws))["unread"] == 3
        assert [(await recv_json(ws))["id"] for _ in mine] == mine  # the inbox replay
        frame = await ask(ws, {"type": "history", "channel": "user", "limit": 10})
        assert frame["type"] == "history" and frame["channel"] == "user" and ids(frame) == mine


async def test_admin_history_api(node: RunningNode, http: aiohttp.ClientSession) -> None:
    published = await publish_many(http, node, [("room:lobby", {"n": i}) for i in range(7)])
    admin = ADMIN
    url = node.url + "/api/history"
    async with http.get(url, params={"channel": "room:lobby", "limit": "3"}, headers=admin) as resp:
        body = await resp.json()
        assert resp.status == 200 and body["channel"] == "room:lobby"
        assert [m["id"] for m in body["messages"]] == published[-3:]
    params = {"channel": "room:lobby", "limit": "3", "before": published[-3]}
    async with http.get(url, params=params, headers=admin) as resp:
        assert [m["id"] for m in (await resp.json())["messages"]] == published[-6:-3]
    for params in (
        {"channel": "room:lobby", "limit": "0"},
        {"channel": "room:lobby", "limit": "\u00b2"},
        {"channel": "room:lobby", "limit": "9" * 5000},
        {"channel": "lobby"},
        {"channel": "room:lobby", "before": "x"},
    ):
        async with http.get(url, params=params, headers=admin) as resp:
            assert (resp.status, (await resp.json())["error"]) == (400, "bad_request")
    for headers in ({}, PUBLISH_HEADERS):
        async with http.get(url, params={"channel": "room:lobby"}, headers=headers) as resp:
            assert resp.status == 401


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_resuming_from_the_welcome_position_gets_exactly_what_was_missed(
    node: RunningNode, http: aiohttp.ClientSession, transport: str
) -> None:
    await publish_many(http, node, [("room:lobby", {"before": i}) for i in range(3)])
    params = {"token": token("alice"), "room": "lobby"}
    if transport == "ws":
        async with http.ws_connect(node.ws_url, params=params) as ws:
            position = (await recv_json(ws))["position"]
    else:
        async with http.get(node.url + "/sse", params={**params, "envelope": "1"}) as resp:
            line = b""
            while not line.startswith(b"data: "):
                line = await asyncio.wait_for(resp.content.readline(), 5)
            position = orjson.loads(line[6:])["position"]
    missed = await publish_many(http, node, [("room:lobby", {"missed": i}) for i in range(10)])
    async with http.ws_connect(node.ws_url, params={**params, "since": position}) as ws:
        await recv_json(ws)
        got = [(await recv_json(ws))["id"] for _ in range(10)]
        assert got == missed
        await ws.send_json({"type": "ping"})
        assert (await recv_json(ws))["type"] == "pong"  # and nothing else came before it


async def test_a_page_asked_while_the_room_gets_messages_is_whole(
    node: RunningNode, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages published between the reads that place a page (a busy room)
    do not shorten it: a short page would tell the client it was the last."""
    published = await publish_many(http, node, [("room:busy", {"n": i}) for i in range(10)])
    broker = node.node.broker
    pages = broker.history._pages  # type: ignore[attr-defined]
    real = pages.read
    reads = 0

    async def read_then_publish(subject: str, channel: Any, start: int, count: int, timeout: Any = None) -> Any:
        nonlocal reads
        got = await real(subject, channel, start, count, timeout)
        reads += 1
        if reads == 1:  # the first read of the page: then two messages arrive
            for _ in range(2):
                await broker.pubsub.publish(channel, b'"later"')
        return got

    monkeypatch.setattr(pages, "read", read_then_publish)
    async with http.ws_connect(node.ws_url, params={"token": token("alice")}) as ws:
        await recv_json(ws)
        page = await ask(ws, {"type": "history", "room": "busy", "limit": 3, "before": published[4]})
    assert ids(page) == published[1:4]


@pytest.mark.parametrize("catches_up", [False, True])
async def test_a_page_read_from_a_copy_behind_holds_what_the_stream_acked(
    node: RunningNode, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, catches_up: bool
) -> None:
    """Direct gets answered by a copy of the stream that lacks the room's two
    newest messages (a follower a write behind; tests/system/test_replica_reads.py
    has the real one): the page holds them all the same — read again once
    the copy has caught up, or through a consumer while it has not. The
    newest page, and one just before the newest message."""
    published = await publish_many(http, node, [("room:lag", {"n": i}) for i in range(6)])
    copy_end, lacking = int(published[3]), 2
    pages = node.node.broker.history._pages  # type: ignore[attr-defined]
    real = pages.read
    behind_reads = 0

    async def read_behind(
        subject: str, channel: Any, start: int, count: int, timeout: Any = None, patient: Any = None
    ) -> Any:
        nonlocal behind_reads
        got = await real(subject, channel, start, count, timeout, patient)
        if catches_up and behind_reads >= 2:
            return got
        behind_reads += 1
        return [Stored(s.delivery, s.after - lacking) for s in got if s.delivery.seq <= copy_end]

    history = node.node.broker.history
    consumer = history._read_consumer  # type: ignore[attr-defined]
    consumer_reads = 0

    async def count_consumer_read(*args: Any) -> Any:
        nonlocal consumer_reads
        consumer_reads += 1
        return await consumer(*args)

    monkeypatch.setattr(pages, "read", read_behind)
    monkeypatch.setattr(history, "_read_consumer", count_consumer_read)
    async with http.ws_connect(node.ws_url, params={"token": token("alice")}) as ws:
        await recv_json(ws)
        assert ids(await ask(ws, {"type": "history", "room": "lag", "limit": 10})) == published
        behind_reads = 0
        page = await ask(ws, {"type": "history", "room": "lag", "limit": 10, "before": published[5]})
        assert ids(page) == published[:5]
    assert bool(consumer_reads) != catches_up  # a copy caught up is read again, no consumer made
