"""The WebSocket protocol Herald speaks after the handshake (gateway/transports/websocket.py, wsproto.py),
driven frame by frame over a raw socket."""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import socket

import aiohttp
import orjson

from broker.channels import room_channel
from gateway.transports.websocket import WsLink

from ..helpers import RawWsClient, RunningNode, recv_json, scrape, token, wait_for

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


async def raw(node: RunningNode, user: str = "alice", **params: str) -> RawWsClient:
    query = "&".join(f"{k}={v}" for k, v in {"token": token(user), **params}.items())
    client = await RawWsClient.connect(f"{node.ws_url}?{query}", rcvbuf=65536)
    opcode, payload = await client.frame()
    assert opcode == TEXT and orjson.loads(payload)["type"] == "welcome"
    return client


async def next_json(client: RawWsClient) -> dict:
    while True:
        opcode, payload = await client.frame()
        if opcode == TEXT:
            return orjson.loads(payload)  # type: ignore[no-any-return]
        assert opcode != CLOSE, payload


async def close_code(client: RawWsClient) -> int | None:
    _, code = await client.messages_until_close(timeout=5)
    return code


async def test_aiohttp_keeps_nothing_of_an_upgraded_connection(node: RunningNode, http: aiohttp.ClientSession) -> None:
    """Idle connections cost no request object, no handler task and no timer of their own."""
    await asyncio.sleep(0.2)
    tasks_before = len(asyncio.all_tasks())
    clients = [await http.ws_connect(node.ws_url, params={"token": token(f"u{i}")}) for i in range(30)]
    for ws in clients:
        assert (await recv_json(ws))["type"] == "welcome"
    await wait_for(lambda: len(node.node.sessions) == 30)
    assert node.runner.server is not None
    assert node.runner.server.connections == []  # aiohttp let go of every socket
    # The client side holds a reader task per connection; the node adds none.
    assert len(asyncio.all_tasks()) - tasks_before <= 30 + 3
    for ws in clients:
        await ws.send_json({"type": "ping", "ref": 1})
        assert (await recv_json(ws))["type"] == "pong"
        await ws.close()
    await wait_for(lambda: not node.node.sessions)


async def test_fragmented_text_with_a_ping_between_fragments(node: RunningNode) -> None:
    client = await raw(node)
    command = orjson.dumps({"type": "ping", "ref": "frag"})
    client.send_frame(TEXT, command[:5], fin=False)
    client.send_frame(PING, b"hello")  # control frames may come between fragments
    client.send_frame(0x0, command[5:12], fin=False)
    client.send_frame(0x0, command[12:])
    opcode, payload = await client.frame()
    assert (opcode, payload) == (PONG, b"hello")
    assert await next_json(client) == {"type": "pong", "ref": "frag"}
    client.close()


async def test_answers_keep_the_order_of_the_frames(node: RunningNode) -> None:
    client = await raw(node)
    client.send_frame(TEXT, b'{"type":"ping","ref":1}')
    client.send_frame(BINARY, b"\x00")
    client.send_frame(TEXT, b'{"type":"ping","ref":2}')
    assert (await next_json(client))["ref"] == 1
    assert (await next_json(client))["code"] == "bad_frame"
    assert (await next_json(client))["ref"] == 2
    client.close()


async def test_protocol_errors_close_1002_and_others_are_served(node: RunningNode, http: aiohttp.ClientSession) -> None:
    bystander = await http.ws_connect(node.ws_url, params={"token": token("bob")})
    assert (await recv_json(bystander))["type"] == "welcome"
    breaches = [
        {"opcode": TEXT, "payload": b"{}", "masked": False},  # clients must mask
        {"opcode": TEXT, "payload": b"{}", "rsv": 0x40},  # no extension was agreed
        {"opcode": 0x0, "payload": b"{}"},  # a continuation with nothing to continue
        {"opcode": 0x3, "payload": b""},  # a reserved opcode
        {"opcode": PING, "payload": b"", "fin": False},  # control frames are never fragmented
        {"opcode": PING, "payload": b"x" * 126},  # nor longer than 125
    ]
    for breach in breaches:
        client = await raw(node)
        client.send_frame(**breach)  # type: ignore[arg-type]
        assert await close_code(client) == 1002, breach
        client.close()
    await bystander.send_json({"type": "ping", "ref": 1})
    assert (await recv_json(bystander))["type"] == "pong"
    await wait_for(lambda: len(node.node.sessions) == 1)
    metrics = await scrape(http, node.url)
    assert metrics['herald_connections_closed_total{reason="bad_request",transport="ws"}'] == len(breaches)
    await bystander.close()


async def test_text_that_is_not_utf8_closes_1007(node: RunningNode) -> None:
    client = await raw(node)
    client.send_frame(TEXT, b'{"type":"ping","x":"\xc3\x28"}')
    assert await close_code(client) == 1007
    client.close()


async def test_an_oversized_frame_closes_1009_from_its_header(node_factory) -> None:
    node: RunningNode = await node_factory(ws={"max_frame": 2000})
    client = await raw(node)
    # Only the header: the node refuses by the announced length, without buffering.
    client.writer.write(bytes([0x81, 0xFF]) + (2**40).to_bytes(8, "big"))
    assert await close_code(client) == 1009
    client.close()
    client = await raw(node)
    client.send_frame(TEXT, b" " * 1200, fin=False)
    client.send_frame(0x0, b" " * 801)  # the whole message counts
    assert await close_code(client) == 1009
    client.close()
    client = await raw(node)
    client.send_frame(TEXT, b'{"type":"ping","ref":1}' + b" " * (2000 - 23))  # exactly max_frame passes
    assert (await next_json(client))["type"] == "pong"
    client.close()


async def test_client_close_is_answered_and_session_released(node: RunningNode, http: aiohttp.ClientSession) -> None:
    client = await raw(node, room="r1")
    client.send_frame(CLOSE, (1001).to_bytes(2, "big") + b"bye")
    opcode, payload = await client.frame()
    assert opcode == CLOSE and int.from_bytes(payload[:2], "big") in (1000, 1001)
    assert await client.reader.read() == b""  # then the node closes the socket
    await wait_for(lambda: not node.node.sessions)
    assert not node.node.hub._index.get(room_channel("r1"))
    metrics = await scrape(http, node.url)
    assert metrics['herald_connections_closed_total{reason="client_closed",transport="ws"}'] == 1


async def test_bad_handshakes_get_400_json(node: RunningNode, http: aiohttp.ClientSession) -> None:
    good = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
    }
    for change, status in (
        ({"Sec-WebSocket-Version": "8"}, 426),  # RFC 6455 4.4: told 13 (test_ws_conformance.py)
        ({"Sec-WebSocket-Key": "not base64!"}, 400),
        ({"Sec-WebSocket-Key": base64.b64encode(b"short").decode()}, 400),
        ({"Upgrade": "h2c"}, 400),
    ):
        async with http.get(node.ws_url, params={"token": token()}, headers={**good, **change}) as response:
            assert response.status == status, change
            assert (await response.json())["error"] == "bad_request"


async def test_a_frame_flood_stops_reading_not_serving(node: RunningNode, http: aiohttp.ClientSession) -> None:
    """Frames queue for the command handler; past a bound the socket is not read
    (TCP pushes back on the client), and the rate limit ends the flood."""
    client = await raw(node)
    for i in range(2000):
        client.send_frame(TEXT, b'{"type":"ping","ref":%d}' % i)
    bystander = await http.ws_connect(node.ws_url, params={"token": token("bob")})
    assert (await recv_json(bystander))["type"] == "welcome"
    await bystander.send_json({"type": "ping", "ref": 1})
    assert (await recv_json(bystander))["type"] == "pong"
    _, closed = await client.messages_until_close(timeout=10)
    assert closed == 4029
    client.close()
    await bystander.close()


async def test_a_frame_arriving_byte_by_byte(node: RunningNode) -> None:
    client = await raw(node)
    client.writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sent: list[bytes] = []
    real_write = client.writer.write
    client.writer.write = sent.append  # type: ignore[method-assign]
    client.send_frame(TEXT, b'{"type":"ping","ref":"slow"}' + b" " * 300)  # a 2-byte length
    client.writer.write = real_write  # type: ignore[method-assign]
    for byte in b"".join(sent):
        client.writer.write(bytes([byte]))
        await client.writer.drain()
        await asyncio.sleep(0)
    assert await next_json(client) == {"type": "pong", "ref": "slow"}
    client.close()


async def test_a_link_gone_with_a_command_queued_is_freed_without_the_cyclic_gc(node: RunningNode) -> None:
    """A command and the peer's leaving in one loop pass (as uvloop orders
    them): the command's worker is cancelled before its first step, and its
    CancelledError's traceback holds the link. The link must not hold the
    worker, or each such connection waits for the GC's full passes."""
    client = await raw(node)
    await wait_for(lambda: len(node.node.sessions) == 1)
    link = next(iter(node.node.sessions)).transport
    assert isinstance(link, WsLink)
    command = b'{"type":"subscribe","room":"r1","ref":"1"}'
    gc.collect()  # what earlier tests left
    gc.disable()
    try:
        link.data_received(bytes([0x80 | TEXT, 0x80 | len(command)]) + bytes(4) + command)  # masked with zeros
        link.connection_lost(None)
        del link
        client.close()
        await wait_for(lambda: not node.node.sessions)
        await asyncio.sleep(0.1)  # the link's finishing task
        assert not [o for o in gc.get_objects() if type(o) is WsLink]
    finally:
        gc.enable()
