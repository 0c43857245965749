"""The metrics listed in README: Metrics exist, move, and count each delivery once."""

from __future__ import annotations

import asyncio
import gzip
import subprocess
from collections.abc import Callable
from typing import Any, NoReturn

import aiohttp
import pytest

from broker.embedded import NatsServer, nats_server_binary

from ..helpers import (
    ADMIN_KEY,
    PUBLISH_HEADERS,
    NodeFactory,
    RunningNode,
    SseClient,
    expect_close,
    recv_json,
    scrape,
    token,
    wait_for,
)
from .test_nats_outage import status_is

CONTRACT = [
    'herald_connections{transport="ws"}',
    'herald_connections{transport="sse"}',
    'herald_connections_opened_total{transport="ws"}',
    'herald_connections_closed_total{reason="client_closed",transport="ws"}',
    "herald_channels_subscribed",
    "herald_messages_received_total",
    'herald_messages_delivered_total{transport="ws"}',
    'herald_messages_delivered_total{transport="sse"}',
    "herald_delivery_latency_seconds_count",
    "herald_outbound_queue_bytes",
    'herald_slow_consumer_disconnects_total{transport="ws"}',
    'herald_messages_dropped_total{reason="queue_full"}',
    "herald_nats_connected",
    "herald_nats_reconnects_total",
    "herald_replayed_messages_total",
]


async def test_contract_metrics_move(node: RunningNode, nats_server: NatsServer, http: aiohttp.ClientSession) -> None:
    before = await scrape(http, node.url)
    for name in CONTRACT:
        assert name in before, name
    assert before["herald_nats_connected"] == 1

    a = await http.ws_connect(node.ws_url, params={"token": token("a"), "room": "r"})
    b = await http.ws_connect(node.ws_url, params={"token": token("b"), "room": "r"})
    for ws in (a, b):
        await recv_json(ws)
    sse = SseClient(await http.get(node.url + "/sse", params={"token": token("c"), "room": "r"}))
    await wait_for(lambda: node.node.broker.stats().subscriptions == 5)
    during = await scrape(http, node.url)
    assert during['herald_connections{transport="ws"}'] == 2
    assert during['herald_connections{transport="sse"}'] == 1
    assert during['herald_connections_opened_total{transport="ws"}'] == 2
    assert during["herald_channels_subscribed"] == 5
    for i in range(3):
        async with http.post(
            node.url + "/api/publish", json={"channel": "room:r", "data": i}, headers=PUBLISH_HEADERS
        ) as r:
            assert r.status == 200
    for ws in (a, b):
        for _ in range(3):
            assert (await recv_json(ws))["type"] == "message"
    for _ in range(3):
        await sse.next()

    after = await scrape(http, node.url)
    assert after['herald_messages_delivered_total{transport="ws"}'] == 6
    assert after['herald_messages_delivered_total{transport="sse"}'] == 3
    assert after["herald_delivery_latency_seconds_count"] == 9
    assert after["herald_delivery_latency_seconds_sum"] > 0
    assert after["herald_messages_received_total"] == 3  # one NATS message each, whatever the fan-out
    assert after['herald_api_publishes_total{result="ok"}'] == 3

    await a.close()
    sse.response.close()
    await wait_for(lambda: len(node.node.sessions) == 1)
    closed = await scrape(http, node.url)
    assert closed['herald_connections{transport="ws"}'] == 1
    assert closed['herald_connections{transport="sse"}'] == 0
    assert closed['herald_connections_closed_total{reason="client_closed",transport="ws"}'] == 1
    assert (
        sum(v for k, v in closed.items() if k.startswith("herald_connections_closed_total{") and 'transport="sse"' in k)
        == 1
    )


async def test_no_per_connection_or_user_labels(node: RunningNode, http: aiohttp.ClientSession) -> None:
    ws = await http.ws_connect(node.ws_url, params={"token": token("someone-unique"), "room": "room-unique"})
    await recv_json(ws)
    async with http.get(node.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    assert "someone-unique" not in text and "room-unique" not in text
    for label in ("user=", "conn=", "channel=", "room="):
        assert label not in text


async def test_health_ready_and_stats(node: RunningNode, http: aiohttp.ClientSession) -> None:
    async with http.get(node.url + "/healthz") as r:
        assert r.status == 200
    async with http.get(node.url + "/readyz") as r:
        assert r.status == 200
    ws = await http.ws_connect(node.ws_url, params={"token": token("u1"), "room": "x"})
    await recv_json(ws)
    async with http.get(node.url + "/api/stats") as r:
        assert r.status == 401
        assert (await r.json())["error"] == "unauthorized"
    async with http.get(node.url + "/api/stats", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
        stats = await r.json()
    assert stats["node"] == node.settings.node.id
    assert stats["connections"] == {"ws": 1, "sse": 0}
    assert stats["users"] == 1
    assert stats["channels"] == 3
    assert stats["nats"]["connected"] is True
    assert stats["tasks"] >= 1  # the event loop's tasks, for leak hunting


async def test_labelled_series_exist_from_the_first_scrape(node: RunningNode, http: aiohttp.ClientSession) -> None:
    from gateway.metrics import API_RESULTS, AUTH_FAILURE_REASONS, LIMITS

    scraped = await scrape(http, node.url)
    for reason in AUTH_FAILURE_REASONS:
        assert scraped[f'herald_auth_failures_total{{reason="{reason}"}}'] == 0
    for limit in LIMITS:
        assert scraped[f'herald_limit_rejections_total{{limit="{limit}"}}'] == 0
    for result in API_RESULTS:
        assert scraped[f'herald_api_publishes_total{{result="{result}"}}'] == 0
    assert scraped['herald_connections_closed_total{reason="slow_consumer",transport="sse"}'] == 0
    assert scraped["process_resident_memory_bytes"] > 0


async def test_streams_refused_at_open_are_counted_by_their_error(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """A refused stream is never a connection (opened and closed do not move):
    herald_connections_refused_total counts it, by the refusal's error code."""
    node = await node_factory(limits={"max_connections_per_user": 1, "origins": ["https://app.example"]})
    before = await scrape(http, node.url)
    async with http.ws_connect(node.ws_url, params={"token": "not-a-token"}) as ws:
        assert (await expect_close(ws))[0] == 4001
    async with http.ws_connect(node.ws_url, params={"token": token("f", rooms=["a"]), "room": "b"}) as ws:
        assert (await expect_close(ws))[0] == 4003
    first = await http.ws_connect(node.ws_url, params={"token": token("twice")})
    assert (await recv_json(first))["type"] == "welcome"
    async with http.ws_connect(node.ws_url, params={"token": token("twice")}) as ws:
        assert (await expect_close(ws))[0] == 4029
    await first.close()
    async with http.get(node.url + "/sse", params={"token": "not-a-token"}) as resp:
        assert resp.status == 401
    async with http.get(node.url + "/sse", params={"token": token()}, headers={"Origin": "https://evil.example"}) as r:
        assert r.status == 403
    await wait_for(lambda: node.node.sessions.__len__() == 0)
    after = await scrape(http, node.url)

    def moved(name: str) -> float:
        return after[name] - before[name]

    refused = {
        (t, r): moved(f'herald_connections_refused_total{{reason="{r}",transport="{t}"}}')
        for t, r in (("ws", "bad_token"), ("ws", "forbidden"), ("ws", "too_many_connections"), ("sse", "bad_token"))
    }
    refused["sse", "forbidden_origin"] = moved(
        'herald_connections_refused_total{reason="forbidden_origin",transport="sse"}'
    )
    assert refused == dict.fromkeys(refused, 1), refused
    assert moved('herald_connections_opened_total{transport="ws"}') == 1
    assert (
        sum(v for k, v in after.items() if k.startswith("herald_connections_closed_total"))
        - sum(v for k, v in before.items() if k.startswith("herald_connections_closed_total"))
        == 1
    )


async def test_herald_ready_says_what_readyz_says(node: RunningNode, http: aiohttp.ClientSession) -> None:
    """herald_ready is 1 while /readyz answers 200, 0 once it answers 503 (here: draining)."""
    assert await status_is(http, node.url + "/readyz", 200)
    assert (await scrape(http, node.url))["herald_ready"] == 1
    await node.node.shutdown()
    assert await status_is(http, node.url + "/readyz", 503)
    assert (await scrape(http, node.url))["herald_ready"] == 0


async def test_a_node_unready_behind_a_live_nats_connection_says_so_in_its_metrics(
    own_nats: NatsServer, node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """NATS restarted without JetStream on the same port: the node reconnects
    (herald_nats_connected is 1) but its stream is not ready, so /readyz
    answers 503 and every stream and publish is refused: herald_ready says 0."""
    node = await node_factory(nats_url=own_nats.url, nats={"reconnect_wait": 0.2})
    assert (await scrape(http, node.url))["herald_ready"] == 1
    own_nats.stop()
    plain = subprocess.Popen([nats_server_binary(), "-a", "127.0.0.1", "-p", str(own_nats.port)])  # no -js
    try:
        await wait_for(lambda: node.node.broker.stats().connected, timeout=10)
        assert await status_is(http, node.url + "/readyz", 503)
        await asyncio.sleep(1.0)  # connected for a while, still not ready
        metrics = await scrape(http, node.url)
        assert metrics["herald_nats_connected"] == 1
        assert metrics["herald_ready"] == 0
        assert await status_is(http, node.url + "/readyz", 503)
    finally:
        plain.kill()
        plain.wait()


async def test_publishes_count_requests_and_published_messages_count_messages(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """herald_api_publishes_total counts requests (a batch is one, stored or
    refused); herald_api_published_messages_total the messages stored."""
    node = await node_factory()
    before = await scrape(http, node.url)
    good = [{"channel": "room:x", "data": i} for i in range(5)]
    bad = [*good[:4], {"channel": "no such channel", "data": 4}]
    for body, status in ((good, 200), (bad, 400), ({"channel": "room:x", "data": "one"}, 200)):
        async with http.post(node.url + "/api/publish", json=body, headers=PUBLISH_HEADERS) as resp:
            assert resp.status == status
    after = await scrape(http, node.url)

    def moved(key: str) -> float:
        return after[key] - before[key]

    assert moved('herald_api_publishes_total{result="ok"}') == 2
    assert moved('herald_api_publishes_total{result="bad_request"}') == 1
    assert moved("herald_api_published_messages_total") == 6


async def test_a_publish_that_fails_inside_the_node_counts_as_internal(
    node: RunningNode, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug met while publishing (here, the broker raising what it never
    should) is answered 500 internal on both paths, and counted: a rate of
    errors that leaves out the node's own would hide it."""

    async def broken(items: object) -> NoReturn:
        raise RuntimeError("a bug")

    monkeypatch.setattr(node.node.broker.pubsub, "publish_batch", broken)
    key = 'herald_api_publishes_total{result="internal"}'
    before = (await scrape(http, node.url)).get(key, 0.0)
    body = b'{"channel":"room:x","data":1}'
    for encoded in (False, True):  # the front door's path, then aiohttp's (a Content-Encoding)
        headers = {**PUBLISH_HEADERS, "Content-Type": "application/json"}
        data = body
        if encoded:
            headers["Content-Encoding"] = "gzip"
            data = gzip.compress(body)
        async with http.post(node.url + "/api/publish", data=data, headers=headers) as resp:
            assert resp.status == 500
            assert await resp.json() == {"error": "internal", "message": "internal error"}
    assert (await scrape(http, node.url))[key] - before == 2


async def test_scrapes_do_not_each_ask_the_stream_leader(
    node: RunningNode, nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    """Each scrape asked nats-server's clock again with a STREAM.INFO (at most
    once a second): 100 nodes scraped every second made 100 JetStream API
    requests/s on the stream's leader. Scrapes now leave a reading alone
    until it is CLOCK_AGE old or this host's clock stepped."""
    import nats

    await scrape(http, node.url)  # the node has not read the clock yet: this scrape has it read
    await asyncio.sleep(0.3)
    asked: list[str] = []

    async def seen(msg: Any) -> None:
        asked.append(msg.subject)

    watcher = await nats.connect(nats_server.url)
    try:
        await watcher.subscribe(f"$JS.API.STREAM.INFO.{node.settings.stream.name}", cb=seen)
        await watcher.flush()
        for _ in range(8):
            await scrape(http, node.url)
            await asyncio.sleep(0.3)
        assert asked == [], f"{len(asked)} STREAM.INFO requests over 8 scrapes in 2.4 s"
        await node.node.broker.history.position()  # a request of the node's own is seen
        await wait_for(lambda: len(asked) == 1, timeout=2)
    finally:
        await watcher.close()
