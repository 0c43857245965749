"""RFC 6455 at the edges, on raw sockets against a real node: the handshake's
version and tokens, length encodings, what a client's close frame may hold,
commands sent right before a close, frames sent with the request head, and
the heartbeat while the node is not reading."""

from __future__ import annotations

import asyncio
import base64
import os
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest

from ..helpers import ADMIN_KEY, NodeFactory, RawWsClient, RunningNode, token
from .test_wslink import CLOSE, PING, PONG, TEXT, raw


def masked(opcode: int, payload: bytes, length: bytes | None = None) -> bytes:
    """A masked client frame; ``length``: the length field as given (its 7 bits, then any extended length)."""
    n = len(payload)
    if length is None:
        length = bytes([n]) if n < 126 else bytes([126]) + n.to_bytes(2, "big")
    key = os.urandom(4)
    return (
        bytes([0x80 | opcode, 0x80 | length[0]])
        + length[1:]
        + key
        + bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    )


def upgrade(node: RunningNode, version: str = "HTTP/1.1", **headers: str) -> bytes:
    parts = urlsplit(node.ws_url)
    fields = {
        "Host": parts.netloc,
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
        **{name.replace("_", "-"): value for name, value in headers.items()},
    }
    lines = [f"GET {parts.path}?token={token('alice')} {version}", *(f"{k}: {v}" for k, v in fields.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def exchange(node: RunningNode, request: bytes) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    """Send ``request`` on a new connection; the answer's head."""
    parts = urlsplit(node.ws_url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(request)
    async with asyncio.timeout(5):
        return await reader.readuntil(b"\r\n\r\n"), reader, writer


async def close_answer(client: RawWsClient) -> int | None:
    """The code of the node's next close frame (data frames skipped); None if the socket just ended."""
    try:
        while True:
            opcode, payload = await client.frame(5)
            if opcode == CLOSE:
                return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return None
    finally:
        client.close()


async def stored(http: aiohttp.ClientSession, node: RunningNode, channel: str) -> list[Any]:
    params = {"channel": channel, "limit": "100"}
    async with http.get(
        node.url + "/api/history", params=params, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as r:
        return [m["data"] for m in (await r.json())["messages"]]


# -- the client's close frame (RFC 6455 5.5.1, 7.4) ------------------------------------------------


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000])
async def test_a_close_code_no_endpoint_may_send_is_a_protocol_error(node: RunningNode, code: int) -> None:
    client = await raw(node)
    client.send_frame(CLOSE, code.to_bytes(2, "big"))
    assert await close_answer(client) == 1002


@pytest.mark.parametrize(("body", "answer"), [(b"", 1000), (b"\x03", 1002), (b"\x03\xe8\xff\xfe", 1007)])
async def test_a_close_body_is_none_or_a_code_and_a_utf8_reason(node: RunningNode, body: bytes, answer: int) -> None:
    client = await raw(node)
    client.send_frame(CLOSE, body)
    assert await close_answer(client) == answer


@pytest.mark.parametrize("code", [1000, 1001, 1011, 1012, 3000, 4999])
async def test_valid_close_codes_are_answered(node: RunningNode, code: int) -> None:
    client = await raw(node)
    client.send_frame(CLOSE, code.to_bytes(2, "big") + "é".encode())
    assert await close_answer(client) == (1001 if code == 1001 else 1000)


async def test_commands_sent_before_the_close_are_run_and_answered(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    """A publish and the close in one segment, and the usual ``send_json``
    then ``close()``: each publish is answered, then the close (RFC 6455 1.4:
    the close handshake is there so that nothing sent is lost)."""
    client = await RawWsClient.connect(f"{node.ws_url}?token={token('alice', publish=['*'])}", rcvbuf=65536)
    await client.frame()  # welcome
    publish = orjson.dumps({"type": "publish", "room": "r", "data": 0, "ref": "p"})
    client.writer.write(masked(TEXT, publish) + masked(CLOSE, (1000).to_bytes(2, "big")))
    frames, code = await client.messages_until_close()
    client.close()
    assert code == 1000 and [f["type"] for f in frames if f.get("ref") == "p"] == ["ack"]
    for i in range(1, 6):
        ws = await http.ws_connect(node.ws_url, params={"token": token("alice", publish=["*"])})
        await ws.receive_json()
        await ws.send_json({"type": "publish", "room": "r", "data": i})
        await ws.close()
    await asyncio.sleep(0.3)
    assert await stored(http, node, "room:r") == list(range(6))


# -- lengths (RFC 6455 5.2) -----------------------------------------------------------------------


async def test_a_64_bit_length_with_its_high_bit_set_is_a_protocol_error(node: RunningNode) -> None:
    client = await raw(node)
    client.writer.write(bytes([0x81, 0xFF]) + (2**63 + 5).to_bytes(8, "big") + bytes(4) + b"hello")
    assert await close_answer(client) == 1002


@pytest.mark.parametrize("length", [bytes([126, 0, 23]), bytes([127]) + (23).to_bytes(8, "big")])
async def test_a_length_not_in_its_shortest_form_is_a_protocol_error(node: RunningNode, length: bytes) -> None:
    client = await raw(node)
    client.writer.write(masked(TEXT, b'{"type":"ping","ref":1}', length))
    assert await close_answer(client) == 1002


# -- the handshake (RFC 6455 4.1, 4.2.1, 4.4) ---------------------------------------------------------


async def test_another_version_is_told_13(node: RunningNode) -> None:
    head, _, writer = await exchange(node, upgrade(node, Sec_WebSocket_Version="8"))
    writer.transport.abort()
    assert head.startswith(b"HTTP/1.1 426") and b"\r\nsec-websocket-version: 13\r\n" in head.lower(), head


@pytest.mark.parametrize(
    ("version", "headers"),
    [("HTTP/1.0", {}), ("HTTP/1.1", {"Connection": "upgradeX"}), ("HTTP/1.1", {"Connection": "keep-alive"})],
)
async def test_not_an_upgrade_is_400(node: RunningNode, version: str, headers: dict[str, str]) -> None:
    head, _, writer = await exchange(node, upgrade(node, version, **headers))
    writer.transport.abort()
    assert head.split(b" ")[1] == b"400", head


async def test_connection_may_list_other_tokens(node: RunningNode) -> None:
    head, _, writer = await exchange(node, upgrade(node, Connection="keep-alive, Upgrade"))
    writer.transport.abort()
    assert head.startswith(b"HTTP/1.1 101"), head


async def test_a_frame_sent_with_the_request_head_is_read(node: RunningNode) -> None:
    """A client that did not wait for the 101: its first frame is served, not
    dropped (a ping: at once, before the welcome, docs/protocol.md 3.5)."""
    head, reader, writer = await exchange(node, upgrade(node) + masked(PING, b"early"))
    try:
        assert head.startswith(b"HTTP/1.1 101")
        got = []
        async with asyncio.timeout(5):
            while len(got) < 2:
                b0, b1 = await reader.readexactly(2)
                size = b1 if b1 < 126 else int.from_bytes(await reader.readexactly(2), "big")
                got.append((b0 & 0x0F, await reader.readexactly(size)))
        assert got[0] == (PONG, b"early") and orjson.loads(got[1][1])["type"] == "welcome"
    finally:
        writer.transport.abort()


# -- the heartbeat while commands queue (docs/protocol.md 3.3, 3.5) --------------------------------


async def test_a_client_is_not_taken_for_dead_while_the_node_does_not_read_it(node_factory: NodeFactory) -> None:
    """Past 64 queued commands the node stops reading the socket; the client's
    pongs wait unread meanwhile, so the heartbeat must not count them missing.
    A slow broker is simulated: each command takes 50 ms (heartbeat 0.6 s)."""
    node = await node_factory(ws={"heartbeat": 0.6}, limits={"command_rate": 1000})
    client = await RawWsClient.connect(f"{node.ws_url}?token={token('alice')}", rcvbuf=1 << 20)
    await client.frame()  # welcome
    commands = next(iter(node.node.sessions)).transport._ctx.commands  # type: ignore[attr-defined]
    handle = commands.handle

    async def slow(session: Any, text: str) -> None:
        await asyncio.sleep(0.05)
        await handle(session, text)

    commands.handle = slow
    client.writer.write(b"".join(masked(TEXT, b'{"type":"ping","ref":%d}' % i) for i in range(100)))
    answers = 0
    while answers < 100:
        opcode, payload = await client.frame(timeout=10)
        if opcode == PING:
            client.send_frame(PONG, payload)
        else:
            assert opcode == TEXT, (answers, opcode, payload)
            answers += 1
    client.close()
