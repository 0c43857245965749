"""The backend publisher helpers: through NATS (broker.publisher) and through
a node's HTTP API (gateway.client), with retry where retrying can help."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import jwt
import pytest

from broker import InvalidChannel
from broker.embedded import NatsServer
from broker.publisher import NatsPublisher
from gateway.client import HttpPublisher, PublishRefused

from ..helpers import PUBLISH_KEY, NodeFactory, RunningNode, recv_json, token


async def open_ws(http: aiohttp.ClientSession, node: RunningNode, user: str) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(node.ws_url, params={"token": token(user), "room": "lobby"})
    assert (await recv_json(ws))["type"] == "welcome"
    return ws


async def test_nats_publisher_stores_and_delivers(
    node: RunningNode, nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    ws = await open_ws(http, node, "ann")
    prefix, stream = node.settings.subject.prefix, node.settings.stream.name
    async with NatsPublisher([nats_server.url], prefix, stream) as pub:
        first = await pub.publish("room:lobby", {"text": "hi"}, event="chat")
        second = await pub.publish("user:ann", b"raw bytes")
        with pytest.raises(InvalidChannel):
            await pub.publish("room:a.b", 1)
        with pytest.raises(InvalidChannel):
            await pub.publish("room:lobby", 1, event="bad event")
    assert second == first + 1
    frames = [await recv_json(ws), await recv_json(ws)]
    assert (frames[0]["id"], frames[0]["event"], frames[0]["data"]) == (str(first), "chat", {"text": "hi"})
    assert (frames[1]["channel"], frames[1]["data"]) == ("user", "raw bytes")
    await ws.close()


async def test_nats_publisher_with_an_idempotency_key_publishes_once(
    node: RunningNode, nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    ws = await open_ws(http, node, "cid")
    prefix, stream = node.settings.subject.prefix, node.settings.stream.name
    async with NatsPublisher([nats_server.url], prefix, stream) as pub:
        first = await pub.publish("room:lobby", {"n": 1}, idempotency_key="job-7")
        assert await pub.publish("room:lobby", {"n": 1}, idempotency_key="job-7") == first
        other = await pub.publish("room:lobby", {"n": 2}, idempotency_key="job-8")
        with pytest.raises(InvalidChannel):
            await pub.publish("room:lobby", 1, idempotency_key="")
    assert [(await recv_json(ws))["id"] for _ in range(2)] == [str(first), str(other)]
    await ws.send_json({"type": "ping"})
    assert (await recv_json(ws))["type"] == "pong"  # the repeat was never delivered
    await ws.close()


async def test_http_publisher_publishes_and_retries_429(node_factory: NodeFactory, http: aiohttp.ClientSession) -> None:
    node = await node_factory(limits={"api_rate": 2.0})
    ws = await open_ws(http, node, "bea")
    async with HttpPublisher(node.url, PUBLISH_KEY, attempts=4, backoff=0.05) as pub:
        ids = [await pub.publish("room:lobby", {"n": i}) for i in range(4)]  # past the rate: 429s, retried
    got = [await recv_json(ws) for _ in ids]
    assert [f["id"] for f in got] == ids and [f["data"]["n"] for f in got] == [0, 1, 2, 3]
    await ws.close()


async def test_http_publisher_with_an_idempotency_key_publishes_once(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    ws = await open_ws(http, node, "dee")
    async with HttpPublisher(node.url, PUBLISH_KEY) as pub:
        first = await pub.publish("room:lobby", {"n": 1}, idempotency_key="k-1")
        assert await pub.publish("room:lobby", {"n": 1}, idempotency_key="k-1") == first
    assert (await recv_json(ws))["id"] == first
    await ws.send_json({"type": "ping"})
    assert (await recv_json(ws))["type"] == "pong"
    await ws.close()


async def test_http_publisher_does_not_retry_refusals(node: RunningNode) -> None:
    async with HttpPublisher(node.url, PUBLISH_KEY, attempts=5, backoff=5.0) as pub:
        started = asyncio.get_running_loop().time()
        with pytest.raises(PublishRefused) as bad:
            await pub.publish("room:a*b", 1)
        assert (bad.value.status, bad.value.error) == (400, "bad_request")
        assert asyncio.get_running_loop().time() - started < 1.0  # no retry, no backoff
    async with HttpPublisher(node.url, "wrong-key") as pub:
        with pytest.raises(PublishRefused) as unauthorized:
            await pub.publish("room:lobby", 1)
        assert unauthorized.value.status == 401


async def test_dev_token_endpoint_only_when_enabled(node_factory: NodeFactory, http: aiohttp.ClientSession) -> None:
    off = await node_factory()
    async with http.post(off.url + "/api/dev/token", json={"user": "dora"}) as r:
        assert r.status in (404, 405)
    on = await node_factory(http={"dev_tokens": True})
    async with http.post(on.url + "/api/dev/token", json={"user": "dora"}) as r:
        assert r.status == 200
        minted = (await r.json())["token"]
    ws = await http.ws_connect(on.ws_url, params={"token": minted, "room": "any-room"})
    welcome = await recv_json(ws)
    assert (welcome["type"], welcome["user"]) == ("welcome", "dora")
    await ws.close()
    async with http.post(on.url + "/api/dev/token", json={"user": "dora", "ttl": 5}) as r:
        short = await r.json()
    assert short["expires_in"] == 5
    assert jwt.decode(short["token"], options={"verify_signature": False})["exp"] - time.time() <= 5
    strict = await node_factory(http={"dev_tokens": True}, jwt={"audience": "herald-prod", "issuer": "https://auth"})
    async with http.post(strict.url + "/api/dev/token", json={"user": "dora"}) as r:
        minted = (await r.json())["token"]
    ws = await http.ws_connect(strict.ws_url, params={"token": minted})
    assert (await recv_json(ws))["type"] == "welcome"  # the node's own audience and issuer
    await ws.close()
    bad_ttls = ({"user": "d", "ttl": t} for t in (0, "5", 86401, True))
    for bad in ({"user": "a.b"}, {"user": ""}, ["dora"], {}, *bad_ttls):
        async with http.post(on.url + "/api/dev/token", json=bad) as r:
            assert r.status == 400, bad
            assert (await r.json())["error"] == "bad_request"
