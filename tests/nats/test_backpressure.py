"""A client that stops reading never hurts the others: its bounded queue
overflows, it is closed with 4008 (or, in a drop-oldest room, loses the oldest
messages, counted), while everyone else gets everything, in order."""

from __future__ import annotations

import asyncio
import resource
from typing import Any

import aiohttp
import nats

from broker.embedded import NatsServer

from ..helpers import RawWsClient, RunningNode, api_publish, held_now, recv_json, scrape, token, wait_for

PAYLOAD = b'{"blob":"' + b"x" * 4000 + b'"}'
COUNT = 1500  # ~6 MB: more than the kernel buffers of a stalled loopback socket hold


async def flood(nats_url: str, subject: str, count: int) -> None:
    nc = await nats.connect(nats_url)
    try:
        for i in range(count):
            await nc.publish(subject, PAYLOAD[:-2] + b'","n":%d}' % i)
            if i % 100 == 99:
                await nc.flush()
        await nc.flush()
    finally:
        await nc.close()


async def read_messages(ws: aiohttp.ClientWebSocketResponse, count: int, timeout: float = 20.0) -> list[dict]:
    got: list[dict] = []
    async with asyncio.timeout(timeout):
        while len(got) < count:
            frame = await recv_json(ws, timeout)
            if frame["type"] == "message":
                got.append(frame)
    return got


def rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def test_stalled_reader_is_closed_4008_and_others_get_everything(
    node_factory, nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    limits = {"max_bytes": 256 * 1024, "max_messages": 1000, "write_buffer": 64 * 1024}
    node: RunningNode = await node_factory(backpressure=limits, ws={"close_timeout": 10.0})
    room_subject = f"{node.settings.subject.prefix}.room.lobby"

    stalled = await RawWsClient.connect(f"{node.ws_url}?token={token('slow')}&room=lobby")
    opcode, welcome = await stalled.frame()
    assert opcode == 1 and b'"welcome"' in welcome
    healthy = await http.ws_connect(node.ws_url, params={"token": token("fast"), "room": "lobby"})
    assert (await recv_json(healthy))["type"] == "welcome"
    await wait_for(lambda: node.node.broker.stats().subscriptions >= 4)
    await asyncio.sleep(0.05)

    rss_before = rss_kib()
    peak_queue = 0.0

    async def watch_queue() -> None:
        nonlocal peak_queue
        while True:
            peak_queue = max(peak_queue, held_now(node.node))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch_queue())
    reader = asyncio.create_task(read_messages(healthy, COUNT))
    await flood(nats_server.url, room_subject, COUNT)
    got = await reader
    watcher.cancel()

    # The healthy client got every message, in stream order, with its payload.
    ids = [int(f["id"]) for f in got]
    assert ids == sorted(ids) and len(set(ids)) == COUNT
    assert [f["data"]["n"] for f in got] == list(range(COUNT))

    # The stalled one was cut off as a slow consumer, and counted.
    metrics = await scrape(http, node.url)
    assert metrics['herald_slow_consumer_disconnects_total{transport="ws"}'] == 1
    assert metrics['herald_connections_closed_total{reason="slow_consumer",transport="ws"}'] == 1
    # Each of the two connections held at most max_bytes (+ the frame that tipped it).
    bound = 2 * (limits["max_bytes"] + len(PAYLOAD) + 64)
    assert 0 < peak_queue <= bound, (peak_queue, bound)
    # ~6 MB went through; the node did not keep it.
    assert rss_kib() - rss_before < 40 * 1024

    # When the stalled client reads again it finds what was buffered, then 4008.
    frames, code = await stalled.messages_until_close()
    assert code == 4008
    seen = [int(f["id"]) for f in frames if f["type"] == "message"]
    assert seen == sorted(seen) and len(seen) < COUNT  # a prefix it can resume after
    stalled.close()
    await wait_for(lambda: not node.node.sessions or len(node.node.sessions) == 1)


async def test_drop_oldest_room_drops_and_counts(
    node_factory, nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    limits = {
        "max_bytes": 128 * 1024,
        "max_messages": 50,
        "write_buffer": 32 * 1024,
        "drop_oldest_rooms": ("typing-*",),
    }
    node: RunningNode = await node_factory(backpressure=limits)
    subject = f"{node.settings.subject.prefix}.room.typing-1"
    stalled = await RawWsClient.connect(f"{node.ws_url}?token={token('slow')}&room=typing-1")
    await stalled.frame()
    await wait_for(lambda: node.node.broker.stats().subscriptions >= 3)
    await asyncio.sleep(0.05)
    await flood(nats_server.url, subject, COUNT)

    async def dropped() -> bool:
        m = await scrape(http, node.url)
        return m['herald_messages_dropped_total{reason="queue_full"}'] > 0

    await wait_for(dropped, timeout=10)
    # Let the last messages land in the queue, then read everything back.
    await asyncio.sleep(0.3)
    metrics = await scrape(http, node.url)
    assert metrics['herald_slow_consumer_disconnects_total{transport="ws"}'] == 0
    assert len(node.node.sessions) == 1  # still connected
    received: list[int] = []
    while not received or received[-1] != COUNT - 1:
        opcode, payload = await stalled.frame(timeout=5)
        assert opcode == 1
        if b'"message"' in payload:
            import orjson

            received.append(orjson.loads(payload)["data"]["n"])
    # Oldest were dropped, the newest arrived, order kept, nothing twice.
    assert received == sorted(set(received))
    assert len(received) < COUNT
    dropped_count = metrics['herald_messages_dropped_total{reason="queue_full"}']
    assert dropped_count > 0
    stalled.close()


async def test_sse_stalled_reader_stream_ends(
    node_factory, nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    import socket

    limits = {"max_bytes": 128 * 1024, "max_messages": 1000, "write_buffer": 32 * 1024}
    node: RunningNode = await node_factory(backpressure=limits)
    subject = f"{node.settings.subject.prefix}.room.lobby"
    host, port = node.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET /sse?token={token('slow')}&room=lobby HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"200" in head.split(b"\r\n")[0] and b"text/event-stream" in head
    await wait_for(lambda: node.node.broker.stats().subscriptions >= 3)
    await asyncio.sleep(0.05)
    await flood(nats_server.url, subject, COUNT)

    async def cut() -> bool:
        m = await scrape(http, node.url)
        return m['herald_slow_consumer_disconnects_total{transport="sse"}'] == 1

    await wait_for(cut, timeout=10)
    await wait_for(lambda: not node.node.sessions, timeout=5)
    metrics = await scrape(http, node.url)
    assert metrics['herald_connections_closed_total{reason="slow_consumer",transport="sse"}'] == 1
    writer.transport.abort()


async def _stalled_with_a_small_backlog(node: RunningNode, http: aiohttp.ClientSession, transport: str) -> None:
    """A client that reads its response head, then nothing: once the node
    holds unsent bytes for it (fewer than write_buffer, nothing queued), it is
    closed 4008 (stalled) within stall_timeout and a tick, and counted. Until
    then herald_outbound_queue_bytes counts what its transport holds."""
    import base64
    import os
    import socket

    host, port = node.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, int(port)))
    upgrade = ""
    if transport == "ws":
        key = base64.b64encode(os.urandom(16)).decode()
        upgrade = (
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        )
    target = f"/{transport}?token={token('slow')}&room=lobby"
    await loop.sock_sendall(sock, f"GET {target} HTTP/1.1\r\nHost: x\r\n{upgrade}\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += await loop.sock_recv(sock, 1)
    await wait_for(lambda: len(node.node.sessions) == 1 and node.node.broker.stats().subscriptions >= 3)
    (session,) = list(node.node.sessions)
    for i in range(400):  # until the socket takes no more: the node holds what is left
        await api_publish(http, node, "room:lobby", {"n": i, "blob": "x" * 4000})
        await asyncio.sleep(0.01)
        if session.outbound.wire.buffered():
            break
    held = session.outbound.wire.buffered()
    assert 0 < held < 65536 and not session.outbound.entries

    async def metrics() -> dict[str, float]:
        if transport == "ws":
            sock.send(b"\x8a\x80\x00\x00\x00\x00")  # an unsolicited pong: alive, though it reads nothing
        return await scrape(http, node.url)

    async def counted() -> bool:
        # All in the transport: herald_outbound_queue_bytes has it from the link's next tick.
        return (await metrics())["herald_outbound_queue_bytes"] >= held

    await wait_for(counted, timeout=2, interval=0.1)

    async def cut() -> bool:
        m = await metrics()
        return m[f'herald_slow_consumer_disconnects_total{{transport="{transport}"}}'] == 1

    await wait_for(cut, timeout=4, interval=0.2)
    assert session.disconnect is not None and session.disconnect.code == 4008
    assert session.disconnect.message.startswith("stalled")
    assert (await scrape(http, node.url))["herald_outbound_queue_bytes"] == 0  # gone with its connection
    sock.close()


async def test_a_stalled_sse_reader_with_a_small_backlog_is_closed(
    node_factory: Any, http: aiohttp.ClientSession
) -> None:
    node = await node_factory(backpressure={"stall_timeout": 1.0}, sse={"keepalive": 0.3})
    await _stalled_with_a_small_backlog(node, http, "sse")


async def test_a_stalled_ws_reader_with_a_small_backlog_is_closed(
    node_factory: Any, http: aiohttp.ClientSession
) -> None:
    node = await node_factory(backpressure={"stall_timeout": 1.0}, ws={"heartbeat": 0.6})
    await _stalled_with_a_small_backlog(node, http, "ws")


async def test_a_message_larger_than_max_bytes_goes_out_on_its_own(
    node_factory: Any, http: aiohttp.ClientSession
) -> None:
    """max_bytes bounds a backlog; one frame larger than it alone is sent
    (else it could never be: every resume would meet it again, 4008)."""
    node = await node_factory(backpressure={"max_bytes": 65536, "write_buffer": 32768})
    ws = await http.ws_connect(node.ws_url, params={"token": token("fast"), "room": "lobby"}, max_msg_size=0)
    assert (await recv_json(ws))["type"] == "welcome"
    first = await api_publish(http, node, "room:lobby", "small")
    assert (await recv_json(ws))["id"] == first
    big = await api_publish(http, node, "room:lobby", "z" * 65480)  # a body within http.max_body
    assert (await recv_json(ws))["id"] == big
    resumed = await http.ws_connect(
        node.ws_url, params={"token": token("fast"), "room": "lobby", "since": first}, max_msg_size=0
    )
    assert (await recv_json(resumed))["type"] == "welcome"
    assert (await recv_json(resumed))["id"] == big
    for socket_ in (ws, resumed):
        await socket_.close()
