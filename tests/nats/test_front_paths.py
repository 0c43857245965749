"""A fast route's requests get the same answer whether the front door serves
them (their plain shape) or aiohttp does (any other shape: here, a harmless
header repeated, or a chunked body), over raw sockets (gateway/front.py)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest

from ..helpers import ADMIN_KEY, PUBLISH_KEY, NodeFactory, RunningNode, scrape, token

BODY = b'{"channel":"room:lobby","data":1}'
WS_HEADERS = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)
REPEATED = b"X-Probe: 1\r\nX-Probe: 2\r\n"  # a header twice: the request is aiohttp's
SHAPES = {"front": b"", "aiohttp": REPEATED}


async def exchange(node: RunningNode, request: bytes, seconds: float = 3.0) -> bytes:
    """What the node sends back until it closes or ``seconds`` pass."""
    host, port = node.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    received = b""
    try:
        writer.write(request)
        async with asyncio.timeout(seconds):
            while chunk := await reader.read(65536):
                received += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        writer.transport.abort()
    return received


async def scrape_over(node: RunningNode) -> dict[str, float]:
    async with aiohttp.ClientSession() as http:
        return await scrape(http, node.url)


@pytest.mark.parametrize("path", ["/sse", "/ws"])
async def test_a_fragment_in_the_target_is_dropped_on_both_paths(node: RunningNode, path: str) -> None:
    target = f"{path}?token={token()}&room=lobby#top".encode()
    head = b"GET %b HTTP/1.1\r\nHost: 127.0.0.1\r\n%b" % (target, WS_HEADERS if path == "/ws" else b"")
    for shape, extra in SHAPES.items():
        answer = await exchange(node, head + extra + b"\r\n", seconds=1.0)
        status = answer.split(b"\r\n", 1)[0]
        assert status in (b"HTTP/1.1 200 OK", b"HTTP/1.1 101 Switching Protocols"), (shape, answer[:300])
        assert b'"type":"welcome"' in answer and b'"room:lobby"' in answer, (shape, answer[:300])


@pytest.mark.parametrize(
    ("path", "key"), [("/api/publish", PUBLISH_KEY), ("/api/subscribe", ADMIN_KEY)], ids=["publish", "subscribe"]
)
async def test_a_body_that_never_ends_gets_408_within_the_handshake_timeout(
    node_factory: NodeFactory, path: str, key: str
) -> None:
    """README: a connection must send its complete request within
    http.handshake_timeout — its body too, in every shape (aiohttp alone
    would wait for a body for ever)."""
    node: RunningNode = await node_factory(http={"handshake_timeout": 1.0})
    timeouts = 'herald_api_publishes_total{result="timeout"}'
    before = await scrape_over(node)
    head = b"POST %b HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %b\r\n" % (path.encode(), key.encode())
    shapes = {
        "front": b"Content-Length: %d\r\n\r\n" % len(BODY),
        "aiohttp": b"Content-Length: %d\r\n%b\r\n" % (len(BODY), REPEATED),
        "chunked": b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(BODY),
    }
    for shape, rest in shapes.items():
        if path != "/api/publish" and shape == "front":
            continue  # not a fast route
        began = time.monotonic()
        answer = await exchange(node, head + rest + BODY[:-5], seconds=5.0)
        assert time.monotonic() - began < 3, shape  # closed after the answer
        status, _, rest_of_answer = answer.partition(b"\r\n")
        assert status == b"HTTP/1.1 408 Request Timeout", (shape, answer)
        body = orjson.loads(rest_of_answer.partition(b"\r\n\r\n")[2])
        assert body == {"error": "timeout", "message": "the body did not arrive within 1s"}, shape
    # A publish answered 408, by the front door or by aiohttp's route, counts once as a timeout.
    after = await scrape_over(node)
    assert after[timeouts] - before[timeouts] == (len(shapes) if path == "/api/publish" else 0)


@pytest.mark.parametrize(
    ("settings", "auth", "status", "error"),
    [
        ({}, b"Authorization: Bearer wrong\r\n", b"401 Unauthorized", "unauthorized"),
        ({}, b"", b"401 Unauthorized", "unauthorized"),
        ({"publish": {"key": ""}}, b"Authorization: Bearer x\r\n", b"403 Forbidden", "disabled"),
    ],
    ids=["wrong", "missing", "disabled"],
)
async def test_a_publish_without_a_valid_key_is_refused_before_its_body(
    node_factory: NodeFactory, settings: dict[str, dict[str, object]], auth: bytes, status: bytes, error: str
) -> None:
    """The key is checked once the head is in: a client without one cannot
    make the node hold a body of up to publish.max_batch_body for
    http.handshake_timeout. The answer comes at once, and the connection
    ends, its body unread."""
    node: RunningNode = await node_factory(http={"handshake_timeout": 5.0}, **settings)
    length = 500_000  # announced, never sent
    # A client that asks before sending its body (curl does past 1 MB) is told no, not "100 Continue".
    for shape, extra in {**SHAPES, "expect": b"Expect: 100-continue\r\n"}.items():
        head = b"POST /api/publish HTTP/1.1\r\nHost: x\r\n%bContent-Length: %d\r\n%b\r\n" % (auth, length, extra)
        began = time.monotonic()
        answer = await exchange(node, head + b"[" + b" " * 1000, seconds=4.0)
        assert time.monotonic() - began < 2, shape  # not the 408 after the handshake timeout
        first, _, rest = answer.partition(b"\r\n")
        assert first == b"HTTP/1.1 " + status, (shape, answer)
        headers, _, body = rest.partition(b"\r\n\r\n")
        assert b"connection: close" in headers.lower(), (shape, answer)
        assert orjson.loads(body)["error"] == error, shape


async def test_a_refused_publish_whose_body_is_in_keeps_its_connection(node: RunningNode) -> None:
    """A refusal (a wrong key, a rate limit) of a request whose whole body came
    in does not cost the client its keep-alive connection."""
    host, port = node.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for key in (b"wrong", PUBLISH_KEY.encode(), b"wrong"):
            writer.write(
                b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %b\r\nContent-Length: %d\r\n\r\n%b"
                % (key, len(BODY), BODY)
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
            assert head.startswith(b"HTTP/1.1 401" if key == b"wrong" else b"HTTP/1.1 200"), head
            assert b"connection: close" not in head.lower()
            length = int(head.lower().partition(b"content-length: ")[2].partition(b"\r\n")[0])
            await reader.readexactly(length)
    finally:
        writer.transport.abort()


async def test_a_publish_that_expects_100_continue_is_judged_once(node_factory: NodeFactory) -> None:
    """A publish sent with ``Expect: 100-continue`` is asked for its body once
    its head passed, and its head costs one of the key's publishes a second, not two."""
    node: RunningNode = await node_factory(limits={"api_rate": 2.0})
    host, port = node.url.removeprefix("http://").split(":")
    answers = []
    for _ in range(2):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(
                b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %b\r\n"
                b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % (PUBLISH_KEY.encode(), len(BODY))
            )
            assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3) == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(BODY)
            answers.append((await asyncio.wait_for(reader.readuntil(b"\r\n"), 3)).strip())
        finally:
            writer.transport.abort()
    assert answers == [b"HTTP/1.1 200 OK"] * 2
