"""Hostile connections: clients that send their request a byte at a time or
not at all, more streams than the node takes, ping floods, connections opened
and closed in a loop. The node cuts or refuses them within its configured
limits, and an honest client keeps getting every message."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import pytest

from ..helpers import NodeFactory, RunningNode, api_publish, expect_close, recv_json, scrape, token, wait_for


async def honest_client(http: aiohttp.ClientSession, node: RunningNode) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(node.ws_url, params={"token": token("honest"), "room": "news"})
    assert (await recv_json(ws))["type"] == "welcome"
    return ws


async def still_served(http: aiohttp.ClientSession, node: RunningNode, ws: aiohttp.ClientWebSocketResponse) -> None:
    sent = await api_publish(http, node, "room:news", {"still": "here"})
    frame = await recv_json(ws)
    assert (frame["type"], frame["id"]) == ("message", sent)


async def test_slow_and_silent_requests_are_cut_at_the_handshake_timeout(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    node: RunningNode = await node_factory(http={"handshake_timeout": 1.0})
    honest = await honest_client(http, node)
    host, port = node.url.removeprefix("http://").split(":")
    request = f"GET /ws?token={token('loris')}&room=news HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n".encode()

    async def slowloris() -> float:
        reader, writer = await asyncio.open_connection(host, int(port))
        began = time.monotonic()
        try:
            for byte in request:  # a byte every 100 ms: never a complete request
                writer.write(bytes([byte]))
                await asyncio.sleep(0.1)
                if reader.at_eof() or writer.is_closing():
                    break
            assert await asyncio.wait_for(reader.read(), timeout=3) == b""
        except ConnectionResetError:
            pass
        finally:
            writer.close()
        return time.monotonic() - began

    async def silent() -> float:
        reader, writer = await asyncio.open_connection(host, int(port))
        began = time.monotonic()
        assert await asyncio.wait_for(reader.read(), timeout=3) == b""
        writer.close()
        return time.monotonic() - began

    lasted = await asyncio.gather(*(slowloris() for _ in range(20)), *(silent() for _ in range(20)))
    assert all(0.9 <= t < 2.5 for t in lasted), lasted
    await still_served(http, node, honest)
    await honest.close()


async def test_streams_beyond_the_node_limit_get_503(node_factory: NodeFactory, http: aiohttp.ClientSession) -> None:
    node: RunningNode = await node_factory(limits={"max_connections": 3})
    sockets = [await http.ws_connect(node.ws_url, params={"token": token(f"u{i}")}) for i in range(3)]
    for ws in sockets:
        assert (await recv_json(ws))["type"] == "welcome"
    try:
        await http.ws_connect(node.ws_url, params={"token": token("more")})
        raise AssertionError("a fourth WebSocket was accepted")
    except aiohttp.WSServerHandshakeError as refused:
        assert refused.status == 503
    async with http.get(node.url + "/sse", params={"token": token("more")}) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"] == "node_full"
    metrics = await scrape(http, node.url)
    assert metrics['herald_limit_rejections_total{limit="node_connections"}'] == 2
    await sockets.pop().close()
    await wait_for(lambda: len(node.node.sessions) == 2)
    again = await http.ws_connect(node.ws_url, params={"token": token("more")})
    assert (await recv_json(again))["type"] == "welcome"
    for ws in [*sockets, again]:
        await ws.close()


async def test_a_ping_flood_is_rate_limited_then_closed(node_factory: NodeFactory, http: aiohttp.ClientSession) -> None:
    node: RunningNode = await node_factory(limits={"command_rate": 30, "abuse_strikes": 5})
    honest = await honest_client(http, node)
    flood = await http.ws_connect(node.ws_url, params={"token": token("flooder")}, autoping=True)
    assert (await recv_json(flood))["type"] == "welcome"
    for _ in range(200):
        await flood.ping()
    code, _ = await expect_close(flood, timeout=5)
    assert code == 4029
    metrics = await scrape(http, node.url)
    assert metrics['herald_limit_rejections_total{limit="command_rate"}'] >= 5
    await still_served(http, node, honest)
    await honest.close()


async def test_connections_opened_and_closed_in_a_loop_leave_nothing_behind(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    honest = await honest_client(http, node)
    baseline = await scrape(http, node.url)

    async def churn(worker: int) -> None:
        for i in range(25):
            if i % 2:
                async with http.get(node.url + "/sse", params={"token": token(f"c{worker}"), "room": f"r{i}"}) as r:
                    assert r.status == 200
                    await r.content.readline()
            else:
                ws = await http.ws_connect(node.ws_url, params={"token": token(f"c{worker}"), "room": f"r{i}"})
                await recv_json(ws)
                await ws.close()

    sent = []
    publishing = asyncio.gather(*(churn(w) for w in range(8)))
    while not publishing.done():
        sent.append(await api_publish(http, node, "room:news", len(sent)))
        await asyncio.sleep(0.02)
    await publishing
    got = [(await recv_json(honest))["id"] for _ in sent]
    assert got == sent  # the honest client lost nothing during 200 connects
    await wait_for(lambda: len(node.node.sessions) == 1, timeout=5)
    after = await scrape(http, node.url)
    assert after["herald_channels_subscribed"] == baseline["herald_channels_subscribed"]
    opened = (
        after['herald_connections_opened_total{transport="ws"}']
        + after['herald_connections_opened_total{transport="sse"}']
    )
    assert opened >= 201
    await honest.close()


@pytest.mark.parametrize("path", ["/ws", "/sse"])
async def test_clients_that_leave_during_admission_leave_no_traceback(
    path: str, node: RunningNode, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A connect storm makes admission slow (a KV round trip); clients give up
    meanwhile. The node lets them go without an error in its log."""
    connections = node.node.broker.connections
    real = connections.open

    async def slow_open(*args: Any) -> Any:
        await asyncio.sleep(0.3)
        return await real(*args)

    connections.open = slow_open  # type: ignore[method-assign]
    host, port = node.url.removeprefix("http://").split(":")
    upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    headers = upgrade + "Sec-WebSocket-Version: 13\r\n" if path == "/ws" else ""
    request = f"GET {path}?token={token('quitter')}&room=lobby HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode()
    for _ in range(5):
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        await writer.drain()
        writer.transport.abort()  # gone before the answer
    await asyncio.sleep(0.8)
    connections.open = real  # type: ignore[method-assign]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert len(node.node.sessions) == 0
    honest = await honest_client(http, node)
    await still_served(http, node, honest)
    await honest.close()


async def test_a_failure_while_admitting_is_a_1011_or_a_500_and_the_node_goes_on(
    node: RunningNode, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug met while a stream is admitted (after the WebSocket upgrade)
    closes it 1011 — not HTTP bytes written into the WebSocket stream — and
    an SSE request gets a JSON 500; both are logged."""
    gate = node.node.gate

    async def fails(*args: Any) -> str:
        raise RuntimeError("a bug")

    monkeypatch.setattr(gate, "count_in", fails)
    ws = await http.ws_connect(node.ws_url, params={"token": token("alice")})
    code, reason = await expect_close(ws)
    assert (code, reason) == (1011, "internal error")
    async with http.get(node.url + "/sse", params={"token": token("alice")}) as resp:
        assert (resp.status, (await resp.json())["error"]) == (500, "internal")
    assert sum("a bug" in r.getMessage() or "a bug" in str(r.exc_info) for r in caplog.records) >= 2
    monkeypatch.undo()
    ws = await http.ws_connect(node.ws_url, params={"token": token("alice")})
    assert (await recv_json(ws))["type"] == "welcome"
    await ws.close()
