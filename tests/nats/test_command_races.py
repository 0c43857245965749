"""Commands that overlap: a close frame while a command runs, subscribes
posted at once over HTTP, a refresh after rooms joined with another token,
an unsubscribe while the room's replay runs (docs/protocol.md 2.3, 3.5, 6)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from ..helpers import (
    PUBLISH_HEADERS,
    NodeFactory,
    RawWsClient,
    RunningNode,
    SseClient,
    token,
    wait_for,
)
from .test_ws_conformance import masked

TEXT, CLOSE = 0x1, 0x8


async def batch(http: aiohttp.ClientSession, node: RunningNode, channel: str, n: int, size: int = 10) -> list[str]:
    ids: list[str] = []
    per = max(1, min(1000, 500_000 // (size + 40)))
    for start in range(0, n, per):
        async with http.post(
            node.url + "/api/publish",
            json=[{"channel": channel, "data": "x" * size} for _ in range(min(per, n - start))],
            headers=PUBLISH_HEADERS,
        ) as resp:
            body = await resp.json()
            assert resp.status == 200, body
            ids += body["ids"]
    return ids


async def command(
    http: aiohttp.ClientSession, node: RunningNode, tok: str, cmd: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with http.post(node.url + "/api/command", json=cmd, headers={"Authorization": f"Bearer {tok}"}) as resp:
        return resp.status, await resp.json()


async def raw_sse(
    node: RunningNode, target: str, rcvbuf: int = 4096
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An SSE GET on a plain socket with a small receive window (so the test controls reading)."""
    parts = urlsplit(node.url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**20)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def open_sse(http: aiohttp.ClientSession, node: RunningNode, tok: str, rooms: list[str]) -> SseClient:
    query = [("token", tok), ("envelope", "1")] + [("room", r) for r in rooms]
    resp = await http.get(node.url + "/sse", params=query)
    assert resp.status == 200, await resp.text()
    sse = SseClient(resp)
    first = await sse._next(5.0)
    assert first.event == "welcome"
    sse.welcome = first.json()
    return sse


async def test_a_command_in_flight_when_the_close_arrives_is_still_answered(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    """§3.5: 'the node first runs and answers the commands that came before
    it, then answers with 1000'. Here the close frame arrives in its own
    segment while the subscribe {since} (a replay of 600 messages) runs."""
    await batch(http, node, "room:big", 600, size=200)
    client = await RawWsClient.connect(f"{node.ws_url}?token={token('alice')}", rcvbuf=1 << 20)
    await client.frame()  # welcome
    client.writer.write(masked(TEXT, orjson.dumps({"type": "subscribe", "room": "big", "since": "0", "ref": "s"})))
    await client.writer.drain()
    link = next(iter(node.node.sessions)).transport
    await wait_for(lambda: link._worker is not None and not link._inbox, interval=0.0005)
    # the subscribe is running (its replay is being read); the inbox is empty
    client.writer.write(masked(CLOSE, (1000).to_bytes(2, "big")))
    frames, code = await client.messages_until_close()
    client.close()
    answers = [f for f in frames if f.get("ref") == "s"]
    assert code == 1000
    assert [a["type"] for a in answers] == ["ack"], (len(frames), answers)


async def test_concurrent_subscribes_over_http_cannot_exceed_max_subscriptions(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """§6.1 / §11: at most limits.max_subscriptions rooms per connection. An
    SSE stream whose opening replay is still running (the client reads
    slowly) gets three subscribe {since} POSTs at once; the limit is 2."""
    node = await node_factory(limits={"max_subscriptions": 2}, backpressure={"max_bytes": 65536, "write_buffer": 16384})
    await batch(http, node, "broadcast", 1000, size=4000)
    tok = token("alice")
    reader, _writer = await raw_sse(node, f"/sse?token={tok}&envelope=1&since=0")
    await wait_for(lambda: len(node.node.sessions) == 1)
    session = next(iter(node.node.sessions))
    await asyncio.sleep(0.5)
    assert session.replaying.locked()  # the opening replay waits for the slow reader
    conn = session.id
    posts = [
        asyncio.ensure_future(
            command(http, node, tok, {"type": "subscribe", "room": r, "since": "0", "conn": conn, "ref": r})
        )
        for r in ("a", "b", "c")
    ]
    await asyncio.sleep(0.3)

    async def drain() -> None:
        while await reader.read(1 << 16):
            pass

    drainer = asyncio.ensure_future(drain())
    answers = await asyncio.gather(*posts)
    drainer.cancel()
    rooms = sorted(c for c in session.channels if str(c).startswith("room:"))
    statuses = [s for s, _ in answers]
    assert len(rooms) <= 2 and statuses.count(200) <= 2, (statuses, rooms)


async def test_refresh_over_http_leaves_a_room_joined_by_a_client_subscribe(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    """§5: an HTTP command runs with the POST's token. An SSE stream opened
    with T1 (rooms a) subscribes to b with its newer token T2 (rooms a, b);
    then a refresh with T3 (rooms a) — b was joined by the client, not the
    backend, and T3 does not allow it: §2.3/§6.6 say it is left."""
    t1 = token("alice", rooms=["a"])
    sse = await open_sse(http, node, t1, ["a"])
    conn = sse.welcome["conn"]
    t2 = token("alice", rooms=["a", "b"], ttl=3000)
    status, ack = await command(http, node, t2, {"type": "subscribe", "room": "b", "conn": conn, "ref": 1})
    assert status == 200, ack
    t3 = token("alice", rooms=["a"], ttl=2000)
    status, ack = await command(http, node, t3, {"type": "refresh", "token": t3, "conn": conn, "ref": 2})
    assert status == 200, ack
    assert ack["channels"] == ["broadcast", "room:a", "user"], ack


async def test_unsubscribe_stops_a_running_subscribe_replay(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """§6.2: unsubscribe leaves the room. An SSE client subscribes to a room
    with since=0 (a long replay, read slowly), then unsubscribes; once the
    unsubscribe is acknowledged the room's replay should not go on."""
    node = await node_factory(backpressure={"max_bytes": 65536, "write_buffer": 16384})
    ids = await batch(http, node, "room:big", 1000, size=4000)
    tok = token("alice")
    reader, writer = await raw_sse(node, f"/sse?token={tok}&envelope=1")
    await wait_for(lambda: len(node.node.sessions) == 1)
    session = next(iter(node.node.sessions))
    await asyncio.sleep(0.2)
    sub = asyncio.ensure_future(
        command(http, node, tok, {"type": "subscribe", "room": "big", "since": "0", "conn": session.id, "ref": "s"})
    )
    await wait_for(lambda: session.replaying.locked() and session.floors)  # the replay has begun, and waits
    await asyncio.sleep(0.3)
    status, ack = await command(http, node, tok, {"type": "unsubscribe", "room": "big", "conn": session.id, "ref": "u"})
    assert status == 200, ack
    queued_then = next(iter(session.floors.values())) - int(ids[0]) + 1  # replayed so far
    buf = b""

    async def drain() -> None:
        nonlocal buf
        while chunk := await reader.read(1 << 16):
            buf += chunk

    drainer = asyncio.ensure_future(drain())
    await sub
    await asyncio.sleep(0.5)
    drainer.cancel()
    writer.close()
    n = buf.count(b'"channel":"room:big"')
    assert n <= queued_then, (
        f"{n} messages of room:big came; {queued_then} had been queued when the unsubscribe was acked"
    )
