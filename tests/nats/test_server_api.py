"""The server API for backends (docs/protocol.md 10.4): disconnect a user's
connections and join or leave them to a room, cluster-wide, posted to any
node."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any
from urllib.parse import urlencode

import aiohttp

from ..helpers import (
    ADMIN_KEY,
    PUBLISH_HEADERS,
    PUBLISH_KEY,
    NodeFactory,
    RunningNode,
    SseClient,
    api_publish,
    expect_close,
    recv_json,
    scrape,
    token,
)


async def cluster(node_factory: NodeFactory) -> tuple[RunningNode, RunningNode]:
    tag = "sa" + uuid.uuid4().hex[:8]
    shared: dict[str, Any] = {"subject": {"prefix": tag}, "stream": {"name": tag.upper(), "storage": "memory"}}
    return await node_factory(**shared), await node_factory(**shared)


async def admin(
    http: aiohttp.ClientSession, node: RunningNode, path: str, body: Any, key: str = ADMIN_KEY
) -> tuple[int, Any]:
    async with http.post(node.url + path, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, await resp.json()


async def open_sse(http: aiohttp.ClientSession, node: RunningNode, user: str, rooms: list[str] = ()) -> SseClient:
    params = [("token", token(user)), ("envelope", "1")] + [("room", r) for r in rooms]
    resp = await http.get(node.url + "/sse", params=params)
    assert resp.status == 200
    return SseClient(resp)


async def test_disconnect_closes_every_connection_of_the_user_on_every_node(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    a, b = await cluster(node_factory)
    ws1 = await http.ws_connect(a.ws_url, params={"token": token("mallory")})
    ws2 = await http.ws_connect(a.ws_url, params={"token": token("mallory")})
    bystander = await http.ws_connect(a.ws_url, params={"token": token("alice")})
    for ws in (ws1, ws2, bystander):
        await recv_json(ws)
    sse = await open_sse(http, b, "mallory")
    first = await sse._next(5.0)
    assert first.event == "welcome"

    started = time.monotonic()
    status, answer = await admin(http, b, "/api/disconnect", {"user": "mallory"})
    assert (status, answer) == (200, {"disconnected": 3, "nodes": 2, "complete": True})
    assert [(await expect_close(ws))[0] for ws in (ws1, ws2)] == [4009, 4009]
    ends = await sse.read_to_end()
    assert [(e.event, e.json()["code"]) for e in ends] == [("close", 4009)]
    assert time.monotonic() - started < 1.0
    await bystander.send_json({"type": "ping"})
    assert (await recv_json(bystander))["type"] == "pong"

    ws3 = await http.ws_connect(a.ws_url, params={"token": token("mallory")})
    await recv_json(ws3)
    assert (await admin(http, a, "/api/disconnect", {"user": "mallory", "reconnect": False}))[1]["disconnected"] == 1
    code, reason = await expect_close(ws3)
    assert code == 4403 and "do not reconnect" in reason
    metrics = await (await http.get(a.url + "/metrics")).text()
    assert 'herald_connections_closed_total{reason="disconnected",transport="ws"} 2.0' in metrics
    assert 'herald_connections_closed_total{reason="disconnected_for_good",transport="ws"} 1.0' in metrics
    assert (await admin(http, a, "/api/disconnect", {"user": "nobody"}))[1]["disconnected"] == 0
    await bystander.close()


async def test_server_side_subscribe_and_unsubscribe_reach_streams_on_other_nodes(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    a, b = await cluster(node_factory)
    # The token does not allow the room: the backend decides (no claim needed).
    ws = await http.ws_connect(b.ws_url, params={"token": token("alice", rooms=["lobby"])})
    await recv_json(ws)
    sse = await open_sse(http, b, "alice")
    await sse._next(5.0)

    status, answer = await admin(http, a, "/api/subscribe", {"user": "alice", "room": "project-9"})
    assert (status, answer) == (200, {"subscribed": 2, "nodes": 2, "complete": True})
    assert await recv_json(ws) == {"type": "subscribed", "room": "project-9"}
    ev = await sse.next()
    assert (ev.event, ev.json()) == ("subscribed", {"type": "subscribed", "room": "project-9"})
    msg_id = await api_publish(http, a, "room:project-9", {"n": 1})
    assert (await recv_json(ws))["id"] == msg_id
    assert (await sse.next()).id == msg_id
    # Again: nothing changes, nothing is counted.
    assert (await admin(http, a, "/api/subscribe", {"user": "alice", "room": "project-9"}))[1]["subscribed"] == 0

    status, answer = await admin(http, a, "/api/unsubscribe", {"user": "alice", "room": "project-9"})
    assert (status, answer["unsubscribed"]) == (200, 2)
    assert await recv_json(ws) == {"type": "unsubscribed", "room": "project-9"}
    await api_publish(http, a, "room:project-9", {"n": 2})
    await ws.send_json({"type": "ping"})
    assert (await recv_json(ws))["type"] == "pong"  # the room's message never came
    assert (await admin(http, a, "/api/subscribe", {"user": "nobody", "room": "x"}))[1] == {
        "subscribed": 0,
        "nodes": 2,
        "complete": True,
    }
    await ws.close()


async def test_server_api_refusals(node: RunningNode, http: aiohttp.ClientSession) -> None:
    for path, body in [
        ("/api/disconnect", {"user": "a.b"}),
        ("/api/disconnect", {"user": "*"}),
        ("/api/disconnect", {"user": "a", "reconnect": "no"}),
        ("/api/disconnect", {"user": "a", "colour": "red"}),
        ("/api/disconnect", ["a"]),
        ("/api/subscribe", {"user": "a"}),
        ("/api/subscribe", {"user": "a", "room": "x>y"}),
        ("/api/unsubscribe", {"user": 7, "room": "x"}),
    ]:
        status, answer = await admin(http, node, path, body)
        assert (status, answer["error"]) == (400, "bad_request"), (path, body)
    for key in (PUBLISH_KEY, "wrong"):
        assert (await admin(http, node, "/api/disconnect", {"user": "a"}, key=key))[0] == 401
    async with http.post(
        node.url + "/api/subscribe", data=b"not json", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as r:
        assert r.status == 400


async def test_the_nodes_counted_are_those_alive_now(node_factory: NodeFactory, http: aiohttp.ClientSession) -> None:
    """The answer waits for every live node: one stopped a moment ago is not
    waited for (1 s, "complete": false), one started a moment ago is not
    left out (a short count, "complete": true)."""
    tag = "sa" + uuid.uuid4().hex[:8]
    shared: dict[str, Any] = {"subject": {"prefix": tag}, "stream": {"name": tag.upper(), "storage": "memory"}}
    a, b = await node_factory(**shared), await node_factory(**shared)
    assert (await admin(http, a, "/api/subscribe", {"user": "x", "room": "r"}))[1]["nodes"] == 2
    await b.stop()
    began = time.monotonic()
    status, answer = await admin(http, a, "/api/subscribe", {"user": "x", "room": "r"})
    assert (status, answer) == (200, {"subscribed": 0, "nodes": 1, "complete": True})
    assert time.monotonic() - began < 0.5  # not the 1 s wait for a node that is gone
    c, d = await node_factory(**shared), await node_factory(**shared)
    streams = [await http.ws_connect(n.ws_url, params={"token": token("mal")}) for n in (c, d)]
    for ws in streams:
        assert (await recv_json(ws))["type"] == "welcome"
    status, answer = await admin(http, a, "/api/disconnect", {"user": "mal"})
    assert (status, answer) == (200, {"disconnected": 2, "nodes": 3, "complete": True})
    for ws in streams:
        assert (await expect_close(ws))[0] == 4009


ROOMS = [f"big{i}" for i in range(5)]


async def subscribe_while_opening(http: aiohttp.ClientSession, node: RunningNode, user: str) -> dict[str, Any]:
    """POST /api/subscribe for ``user`` until a connection of it is counted (one is opening)."""
    deadline = time.monotonic() + 5
    answer: dict[str, Any] = {}
    while time.monotonic() < deadline and not answer.get("subscribed"):
        answer = (await admin(http, node, "/api/subscribe", {"user": user, "room": "extra"}))[1]
    return answer


async def test_a_connection_still_opening_gets_its_welcome_first(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    """A server-side subscribe reaching a connection while it joins its
    channels is sent after its welcome (3.2) — on SSE, after the response head (4.2)."""
    batch = [{"channel": f"room:{r}", "data": {"n": i, "pad": "x" * 50}} for r in ROOMS for i in range(200)]
    for _ in range(5):  # a resume from 0 then takes the node a while
        async with http.post(node.url + "/api/publish", json=batch, headers=PUBLISH_HEADERS) as resp:
            assert resp.status == 200
    rooms = [("room", r) for r in ROOMS]
    connecting = asyncio.ensure_future(
        http.ws_connect(node.ws_url, params=[("token", token("sam")), ("since", "0"), *rooms])
    )
    assert (await subscribe_while_opening(http, node, "sam"))["subscribed"] == 1
    async with await connecting as ws:
        assert (await recv_json(ws))["type"] == "welcome"
        assert {"type": "subscribed", "room": "extra"} in [await recv_json(ws) for _ in range(5001)]

    host, port = node.url.rsplit("//", 1)[1].split(":")
    query = urlencode([("token", token("ann")), ("since", "0"), ("envelope", "1"), *rooms])
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET /sse?{query} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        assert (await subscribe_while_opening(http, node, "ann"))["subscribed"] == 1
        assert (await asyncio.wait_for(reader.read(64), 5)).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


async def test_over_api_rate_is_429_with_retry_after_and_counted(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """limits.api_rate holds for the server API as for the publish API: a
    refusal says when to come back (Retry-After, docs/protocol.md 9) and is
    counted in herald_limit_rejections_total{limit="api_rate"} (11)."""
    node = await node_factory(limits={"api_rate": 2.0})
    before = await scrape(http, node.url)
    statuses = []
    for _ in range(4):
        async with http.post(
            node.url + "/api/disconnect", json={"user": "a"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as resp:
            statuses.append(resp.status)
            if resp.status == 429:
                assert (await resp.json())["error"] == "rate_limited"
                assert int(resp.headers["Retry-After"]) >= 1
    assert statuses == [200, 200, 429, 429]
    after = await scrape(http, node.url)
    key = 'herald_limit_rejections_total{limit="api_rate"}'
    assert after[key] - before[key] == 2
