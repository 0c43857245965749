"""Dead peers are found: WebSocket pings with a timeout, SSE keep-alive comments."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from pathlib import Path

import aiohttp

from broker.embedded import nats_server_binary

from ..helpers import RunningNode, SseClient, expect_close, recv_json, scrape, token, wait_for


async def test_ws_peer_that_never_answers_pings_is_dropped(node_factory, http: aiohttp.ClientSession) -> None:
    node: RunningNode = await node_factory(ws={"heartbeat": 0.3})
    # autoping=False: this client never answers the server's pings.
    silent = await http.ws_connect(node.ws_url, params={"token": token("ghost")}, autoping=False)
    lively = await http.ws_connect(node.ws_url, params={"token": token("alive")})
    assert (await recv_json(silent))["type"] == "welcome"
    assert (await recv_json(lively))["type"] == "welcome"
    # aiohttp answers pings only while someone is inside receive(): keep reading.
    frames: asyncio.Queue[dict] = asyncio.Queue()

    async def read() -> None:
        while True:
            frames.put_nowait(await recv_json(lively, timeout=30))

    reader = asyncio.create_task(read())
    await wait_for(lambda: len(node.node.sessions) == 1, timeout=5)
    survivor = next(iter(node.node.sessions))
    assert survivor.user == "alive"  # the one that answered pings is still there
    metrics = await scrape(http, node.url)
    assert metrics['herald_connections_closed_total{reason="heartbeat_timeout",transport="ws"}'] == 1
    await asyncio.sleep(1.0)  # several more heartbeats
    await lively.send_json({"type": "ping", "ref": 1})
    assert (await asyncio.wait_for(frames.get(), 5))["type"] == "pong"
    reader.cancel()
    code, _ = await expect_close(silent, timeout=2)
    assert code is not None


async def test_sse_keepalive_comments(node_factory, http: aiohttp.ClientSession) -> None:
    node: RunningNode = await node_factory(sse={"keepalive": 0.1})
    sse = SseClient(await http.get(node.url + "/sse", params={"token": token("a")}))
    assert sse.status == 200
    # next() skips comment lines; wait for a few of them to have gone by.
    with contextlib.suppress(TimeoutError):
        await sse.next(timeout=0.5)
    assert sse.comments >= 2


async def test_sse_envelope_keepalive_is_an_event_the_page_sees(node_factory, http: aiohttp.ClientSession) -> None:
    """EventSource hides comments: an envelope stream's keep-alive is a ``keepalive`` event, the first right
    after the welcome, so that a page can tell a quiet stream from a half-open one (docs/protocol.md 4.4)."""
    node: RunningNode = await node_factory(sse={"keepalive": 0.1})
    sse = SseClient(await http.get(node.url + "/sse", params={"token": token("a"), "envelope": "1"}))
    assert sse.status == 200
    assert [(await sse._next(1.0)).event for _ in range(2)] == ["welcome", "keepalive"]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(0.5):  # next() skips keepalive events: it returns nothing here
            await sse.next()
    assert sse.keepalives >= 2 and sse.comments == 0
    quiet: RunningNode = await node_factory(sse={"keepalive": 60.0})
    sse = SseClient(await http.get(quiet.url + "/sse", params={"token": token("a"), "envelope": "1"}))
    assert (await sse._next(1.0)).event == "welcome"
    first = await sse._next(1.0)
    assert (first.event, first.json()) == ("keepalive", {"type": "keepalive", "interval": 60.0})


def test_shipped_nats_config_is_valid() -> None:
    conf = Path(__file__).resolve().parents[2] / "config" / "nats-single.conf"
    result = subprocess.run([nats_server_binary(), "-c", str(conf), "-t"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
