"""Slow readers: a client that keeps reading, however slowly, is not taken
for a stalled one (protocol: backpressure; "the socket takes nothing for
stall_timeout"); a slow-consumer close is counted once, and the welcome
queued before it still reaches the client (its position is where a client
that received no message resumes from)."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from typing import Any

import aiohttp
import nats
import orjson
import pytest

from broker.embedded import NatsServer
from gateway.session import State

from ..helpers import PUBLISH_HEADERS, RunningNode, scrape, token, wait_for

BLOB = "x" * 4000


class TrickleSocket:
    """A client on a plain non-blocking socket with a small receive buffer:
    the test decides exactly how many bytes it takes from the kernel, and when."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.loop = asyncio.get_running_loop()
        self.taken = 0

    @classmethod
    async def open(cls, node: RunningNode, path: str, ws: bool, rcvbuf: int = 4096) -> TrickleSocket:
        host, port = node.url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (host, int(port)))
        extra = ""
        if ws:
            key = base64.b64encode(os.urandom(16)).decode()
            extra = (
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            )
        await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        self = cls(sock)
        while b"\r\n\r\n" not in self.buf:
            await self.take(1)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert head.split(b"\r\n")[0].split()[1] in (b"101", b"200"), head
        return self

    async def take(self, n: int) -> int:
        """Take at most ``n`` bytes from the kernel (waits for some); 0 on EOF."""
        try:
            data = await self.loop.sock_recv(self.sock, n)
        except ConnectionError:
            return 0
        self.buf += data
        self.taken += len(data)
        return len(data)

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def ws_frames(self) -> list[tuple[int, bytes]]:
        """Complete WebSocket frames in what was taken so far (consumed)."""
        out = []
        buf = self.buf
        while len(buf) >= 2:
            n = buf[1] & 0x7F
            off = 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, off = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, off = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < off + n:
                break
            out.append((buf[0] & 0x0F, buf[off : off + n]))
            buf = buf[off + n :]
        self.buf = buf
        return out

    def sse_events(self) -> list[dict[str, str]]:
        out = []
        while b"\n\n" in self.buf:
            block, self.buf = self.buf.split(b"\n\n", 1)
            ev: dict[str, str] = {}
            for line in block.decode().split("\n"):
                if line.startswith(":") or not line:
                    continue
                k, _, v = line.partition(":")
                ev[k] = ev.get(k, "") + v.removeprefix(" ")
            if ev:
                out.append(ev)
        return out

    def close(self) -> None:
        self.sock.close()


async def publish_batch(http: aiohttp.ClientSession, node: RunningNode, channel: str, items: list[Any]) -> list[str]:
    async with http.post(
        node.url + "/api/publish",
        json=[{"channel": channel, "data": d} for d in items],
        headers=PUBLISH_HEADERS,
        timeout=aiohttp.ClientTimeout(total=10),
    ) as resp:
        body = await resp.json(content_type=None)
        assert resp.status == 200, body
        return [str(i) for i in body["ids"]]


async def flood(nats_url: str, subject: str, count: int, start: int = 0) -> None:
    nc = await nats.connect(nats_url)
    try:
        for i in range(start, start + count):
            await nc.publish(subject, orjson.dumps({"n": i, "blob": BLOB}))
        await nc.flush()
    finally:
        await nc.close()


# -- a reader that keeps reading is not stalled -------------------------------------


async def _trickle(node: RunningNode, http: aiohttp.ClientSession, nats_url: str, transport: str) -> None:
    """A client reads 2 KB every 0.1 s (20 KB/s) — never stops taking bytes —
    while a burst of 100 x 4 KB (400 KB, well within max_bytes) waits for it.
    It is not a slow consumer by section 12 (the queue never overflows, the
    socket never "takes nothing for stall_timeout"): it must not be closed."""
    path = f"/{transport}?token={token('trickle')}&room=lobby"
    client = await TrickleSocket.open(node, path, ws=transport == "ws")
    await wait_for(lambda: len(node.node.sessions) == 1 and node.node.broker.stats().subscriptions >= 3)
    (session,) = list(node.node.sessions)
    await asyncio.sleep(0.1)
    await flood(nats_url, f"{node.settings.subject.prefix}.room.lobby", 100)
    await wait_for(lambda: session.outbound.pending_bytes() > 300_000, timeout=5)
    loop = asyncio.get_running_loop()
    start = loop.time()
    progress = []
    while loop.time() - start < 4.0:  # 4 x stall_timeout, taking bytes all along
        got = await asyncio.wait_for(client.take(2048), 1.0)
        if not got:
            break
        progress.append(got)
        await asyncio.sleep(0.1)
    assert session.disconnect is None, (
        f"closed {session.disconnect} after {loop.time() - start:.1f}s although it took "
        f"{sum(progress)} bytes in {len(progress)} reads; pending {session.outbound.pending_bytes()}"
    )
    metrics = await scrape(http, node.url)
    assert metrics[f'herald_slow_consumer_disconnects_total{{transport="{transport}"}}'] == 0
    client.close()


@pytest.mark.parametrize(
    ("transport", "ticks"),
    [
        ("ws", {"ws": {"heartbeat": 0}}),  # only the queue's own waiter watches for stalls
        ("sse", {"sse": {"keepalive": 60.0}}),  # no tick during the test: only the waiter
    ],
)
async def test_a_steady_slow_reader_is_not_stalled(
    transport: str, ticks: dict[str, Any], node_factory: Any, nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    backpressure = {
        "stall_timeout": 1.0,
        "write_buffer": 65536,
        "max_bytes": 4 * 1024 * 1024,
        "max_messages": 5000,
        "socket_buffer": 4096,
    }
    node = await node_factory(backpressure=backpressure, **ticks)
    await _trickle(node, http, nats_server.url, transport)


# The links' periodic check: held bytes that grow (written faster than read) are no stall.


async def _reading_while_backlog_grows(node: RunningNode, http: aiohttp.ClientSession, transport: str) -> None:
    """Messages come at ~40 KB/s for 3 s; the client takes 20 KB/s all along.
    The transport's buffer grows (below write_buffer: no queue, no waiter), but
    the socket takes bytes at every tick: it is not stalled (section 12)."""
    path = f"/{transport}?token={token('trickle')}&room=lobby"
    client = await TrickleSocket.open(node, path, ws=transport == "ws")
    await wait_for(lambda: len(node.node.sessions) == 1 and node.node.broker.stats().subscriptions >= 3)
    (session,) = list(node.node.sessions)
    await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    stop = loop.time() + 3.0

    async def publisher() -> None:
        n = 0
        while loop.time() < stop and session.disconnect is None:
            await publish_batch(http, node, "room:lobby", [{"n": n, "blob": BLOB}])
            n += 1
            await asyncio.sleep(0.1)

    pub = asyncio.create_task(publisher())
    taken = 0
    while loop.time() < stop and session.disconnect is None:
        if transport == "ws":
            client.send(b"\x8a\x80\x00\x00\x00\x00")  # an unsolicited pong: it is alive
        taken += await asyncio.wait_for(client.take(2048), 1.0)
        await asyncio.sleep(0.1)
    await pub
    assert session.disconnect is None, (
        f"closed {session.disconnect} while taking {taken} bytes in 3 s; held {session.outbound.wire.buffered()}"
    )
    client.close()


@pytest.mark.parametrize(
    ("transport", "ticks"), [("sse", {"sse": {"keepalive": 0.2}}), ("ws", {"ws": {"heartbeat": 0.4}})]
)
async def test_a_reader_taking_bytes_while_its_backlog_grows_is_not_stalled(
    transport: str, ticks: dict[str, Any], node_factory: Any, http: aiohttp.ClientSession
) -> None:
    node = await node_factory(
        backpressure={"stall_timeout": 1.0, "write_buffer": 256 * 1024, "socket_buffer": 4096}, **ticks
    )
    await _reading_while_backlog_grows(node, http, transport)


# -- a slow-consumer close ------------------------------------------------------------


async def test_replay_overflow_of_held_live_messages_counts_one_disconnect(
    node_factory: Any, http: aiohttp.ClientSession
) -> None:
    """A resume to a client that reads nothing stalls on its pace; live
    messages are held meanwhile, and past max(max_messages, replay_max) the
    connection is closed 4008 (section 12). That is one slow-consumer
    disconnect: herald_slow_consumer_disconnects_total must say 1, as
    herald_connections_closed_total{reason="slow_consumer"} does."""
    node = await node_factory(
        backpressure={"max_messages": 10, "max_bytes": 65536, "write_buffer": 16384, "socket_buffer": 4096},
        history={"replay_max": 10},
    )
    big = "y" * 30000
    ids = await publish_batch(http, node, "room:lobby", [{"n": i, "big": big} for i in range(10)])
    since = int(ids[0]) - 1
    client = await TrickleSocket.open(node, f"/ws?token={token('slow')}&room=lobby&since={since}", ws=True)
    await wait_for(lambda: len(node.node.sessions) == 1)
    (session,) = list(node.node.sessions)
    await wait_for(lambda: session.held is not None and session.outbound.waiter is not None, timeout=5)
    # The replay waits for room; 40 live messages arrive meanwhile.
    await publish_batch(http, node, "room:lobby", [{"live": i} for i in range(40)])
    await wait_for(lambda: session.disconnect is not None, timeout=5)
    assert session.disconnect.code == 4008
    await wait_for(lambda: not node.node.sessions, timeout=5)
    metrics = await scrape(http, node.url)
    closed = metrics['herald_connections_closed_total{reason="slow_consumer",transport="ws"}']
    counted = metrics['herald_slow_consumer_disconnects_total{transport="ws"}']
    assert (closed, counted) == (1, 1)
    client.close()


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_slow_consumer_close_keeps_the_welcome(
    node_factory: Any, http: aiohttp.ClientSession, transport: str
) -> None:
    """A burst within write_delay of the open overflows the queue: 4008. The
    welcome (always the first frame, section 3.2) was queued before it and
    must reach the client: its position is what a client that received no
    message resumes from (7.1). Without it the client can only reconnect
    without a position, and the burst is lost with no reset."""
    node = await node_factory(backpressure={"max_messages": 20, "write_delay": 0.3})
    path = f"/{transport}?token={token('u')}&room=lobby"
    client = await TrickleSocket.open(node, path, ws=transport == "ws", rcvbuf=1 << 20)
    await wait_for(lambda: len(node.node.sessions) == 1, interval=0.002)
    (session,) = list(node.node.sessions)
    await wait_for(lambda: session.state is State.OPEN, interval=0.002)
    await publish_batch(http, node, "room:lobby", [{"n": i} for i in range(40)])
    await wait_for(lambda: session.disconnect is not None, timeout=5)
    assert session.disconnect.code == 4008
    while await asyncio.wait_for(client.take(65536), 5):
        pass
    if transport == "ws":
        kinds = [orjson.loads(p)["type"] if op == 1 else f"op{op}" for op, p in client.ws_frames()]
    else:
        kinds = [ev.get("event", "message") for ev in client.sse_events() if "data" in ev]
    client.close()
    assert kinds and kinds[0] == "welcome", kinds
