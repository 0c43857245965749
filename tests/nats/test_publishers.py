"""The backend publisher helpers: through NATS (broker.publisher) and through
a node's HTTP API (gateway.client), with retry where retrying can help."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import jwt
import pytest
from aiohttp import web

from broker import InvalidChannel, MessageTooLarge
from broker.embedded import NatsServer, free_port
from broker.publisher import NatsPublisher
from gateway.client import HttpPublisher, PublishRefused

from ..helpers import PUBLISH_KEY, NodeFactory, RunningNode, recv_json, recv_until, scrape, token


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


class LosingProxy:
    """In front of a node: passes each publish on, and answers the first one
    502 once the node has stored it (nginx when the node's answer is lost,
    e.g. as it drains). Records the Idempotency-Key of each request."""

    def __init__(self, node: RunningNode, http: aiohttp.ClientSession) -> None:
        self.node, self.http = node, http
        self.keys: list[str | None] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> LosingProxy:
        app = web.Application()
        app.router.add_post("/api/publish", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _forward(self, request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k in ("Authorization", "Idempotency-Key")}
        self.keys.append(headers.get("Idempotency-Key"))
        body = await request.read()
        async with self.http.post(self.node.url + "/api/publish", data=body, headers=headers) as resp:
            answer = await resp.read()
            assert resp.status == 200, answer
        if len(self.keys) == 1:
            return web.json_response({"error": "bad_gateway", "message": "upstream reset"}, status=502)
        return web.Response(body=answer, content_type="application/json")


@pytest.mark.parametrize("given", [None, "order-1"])
async def test_http_publisher_stores_a_publish_whose_answer_was_lost_once(
    given: str | None, node: RunningNode, http: aiohttp.ClientSession
) -> None:
    """The node stores the publish, its answer is lost (502): the retry must
    not store it again. Without a key of its own the publisher's retry was a
    new message: stored and delivered twice."""
    ws = await open_ws(http, node, "eve")
    async with LosingProxy(node, http) as proxy, HttpPublisher(proxy.url, PUBLISH_KEY, backoff=0.01) as pub:
        stored = await pub.publish("room:lobby", {"n": 1}, idempotency_key=given)
    assert (await recv_json(ws))["id"] == stored
    await ws.send_json({"type": "ping"})
    assert (await recv_json(ws))["type"] == "pong"  # not stored twice
    await ws.close()
    assert len(proxy.keys) == 2 and proxy.keys[0] is not None and proxy.keys[0] == proxy.keys[1]
    assert given is None or proxy.keys[0] == given  # the caller's key wins


async def test_http_publisher_stores_a_batch_whose_answer_was_lost_once(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    ws = await open_ws(http, node, "fay")
    batch = [{"channel": "room:lobby", "data": {"n": n}} for n in range(3)]
    async with LosingProxy(node, http) as proxy, HttpPublisher(proxy.url, PUBLISH_KEY, backoff=0.01) as pub:
        ids = await pub.publish_batch(batch)
        again = await pub.publish_batch(batch)  # another batch: another key, stored anew
    assert len(proxy.keys) == 3 and proxy.keys[0] == proxy.keys[1] != proxy.keys[2]
    got = [(await recv_json(ws))["id"] for _ in range(6)]
    assert got == ids + again and len(set(got)) == 6
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


async def test_a_message_over_nats_max_payload_is_refused_and_the_connection_kept(
    node_factory: NodeFactory, nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    """NATS closes a connection that sends it a message over its max_payload
    (1 MiB by default), and nats-py then closes for good: a node whose
    http.max_body allowed such a publish lost NATS until restarted, and
    ``herald publish`` waited 5 s for an ack. Refused before it is sent."""
    node = await node_factory(http={"max_body": 3_000_000}, publish={"max_batch_body": 3_000_000})
    too_big = "a" * 1_500_000
    started = time.monotonic()
    async with http.post(
        node.url + "/api/publish",
        json={"channel": "room:lobby", "data": too_big},
        headers={"Authorization": f"Bearer {PUBLISH_KEY}"},
    ) as resp:
        body = await resp.json()
    # Nothing changes on a retry: 413 too_large, not 503 unavailable.
    assert (resp.status, body["error"]) == (413, "too_large") and "max_payload" in body["message"], body
    assert time.monotonic() - started < 2
    assert (await scrape(http, node.url))['herald_api_publishes_total{result="too_large"}'] == 1
    async with HttpPublisher(node.url, PUBLISH_KEY, attempts=1) as pub:
        assert await pub.publish("room:lobby", {"n": 1})  # the node's NATS connection is still there
    prefix, stream = node.settings.subject.prefix, node.settings.stream.name
    # Its retries (up to 1 + 2 + 4 + 5 s of backoff) are not spent on a refusal no retry changes.
    async with NatsPublisher([nats_server.url], prefix, stream, attempts=5, backoff=1.0) as nats_pub:
        started = time.monotonic()
        with pytest.raises(MessageTooLarge, match="max_payload"):
            await nats_pub.publish("room:lobby", too_big.encode())
        assert time.monotonic() - started < 0.5
        assert await nats_pub.publish("room:lobby", b"1")


async def test_a_client_publish_over_nats_max_payload_is_too_large(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """A client's publish command over NATS max_payload (its frame within
    ws.max_frame) is ``too_large``, not ``unavailable``: a retry would not help."""
    node = await node_factory(ws={"max_frame": 3_000_000})
    ws = await http.ws_connect(node.ws_url, params={"token": token("alice", rooms=["chat-*"], publish=["chat-*"])})
    assert (await recv_json(ws))["type"] == "welcome"
    await ws.send_json({"type": "publish", "room": "chat-1", "data": "a" * 1_500_000, "ref": "big"})
    err = await recv_until(ws, "error")
    assert (err["code"], err["ref"]) == ("too_large", "big") and "max_payload" in err["message"], err
    await ws.send_json({"type": "publish", "room": "chat-1", "data": 1, "ref": "small"})
    assert (await recv_until(ws, "ack"))["ref"] == "small"
