"""The front door: the fast routes it serves itself, and every other request
(or shape of request) handed, with its bytes, to aiohttp on a real socket."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong

from broker.throttle import Throttle
from gateway import malformed
from gateway.front import FastRoute, FrontDoor, FrontRunner
from gateway.head import FrontHead, Head
from gateway.http import Reply, body_timeout, json_reply
from gateway.malformed import MalformedRequests

ROUTES: web.AppKey[dict[tuple[bytes, bytes], FastRoute]] = web.AppKey("routes", dict)


class Echo:
    """A fast route that answers with what it got; ``served`` counts its calls."""

    max_body = 64

    def __init__(self) -> None:
        self.served = 0
        self.gate: asyncio.Event | None = None

    def refusal(self, head: Head, length: int) -> Reply | None:
        return None

    async def answer(self, head: FrontHead, body: bytes) -> Reply:
        self.served += 1
        if self.gate is not None:
            await self.gate.wait()
        return json_reply({"front": True, "body": body.decode(), "key": head.headers.get("X-Key")})

    def body_timed_out(self, seconds: float) -> Reply:
        return body_timeout(seconds)


class Served:
    def __init__(self, runner: FrontRunner, port: int, echo: Echo, seen: list[str]) -> None:
        self.runner, self.port, self.echo, self.seen = runner, port, echo, seen

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    echo, seen = Echo(), []

    async def aiohttp_route(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path} {(await request.read()).decode()}")
        return web.json_response({"front": False})

    app = web.Application()
    app.router.add_post("/echo", aiohttp_route)
    app.router.add_get("/other", aiohttp_route)
    app[ROUTES] = {(b"POST", b"/echo"): echo}
    runner = FrontRunner(app, ROUTES, keepalive_timeout=0.5, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield Served(runner, runner.addresses[0][1], echo, seen)
    await runner.cleanup()


def post(body: bytes, *extra: str, path: str = "/echo") -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode()
    lines = head.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return int(lines[0].split()[1]), headers, body


async def test_fast_requests_on_one_connection_are_answered_in_order(served: Served) -> None:
    reader, writer = await served.open()
    for i in range(3):
        writer.write(post(f"m{i}".encode(), f"X-Key: k{i}"))
        status, headers, body = await response(reader)
        assert status == 200 and headers["content-type"] == "application/json"
        assert body == b'{"front":true,"body":"m%d","key":"k%d"}' % (i, i)
        assert headers["x-content-type-options"] == "nosniff" and "date" in headers
    writer.write(post(b"a") + post(b"b") + post(b"c"))  # pipelined
    bodies = [(await response(reader))[2] for _ in range(3)]
    assert [b'"body":"%s"' % x in body for x, body in zip((b"a", b"b", b"c"), bodies, strict=True)] == [True] * 3
    assert served.echo.served == 6 and served.seen == []
    writer.close()


async def test_a_head_in_pieces_is_still_served_by_the_front(served: Served) -> None:
    reader, writer = await served.open()
    for byte in post(b"slow"):
        writer.write(bytes([byte]))
        await writer.drain()
    assert (await response(reader))[2].startswith(b'{"front":true')
    writer.close()


async def test_a_body_in_pieces_has_its_head_read_once(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the head again at each piece of its body (~170 us for a long
    head) let one client without a key keep a core busy with a body sent a
    byte per TCP segment: a few hundred KB/s of it."""
    door = served.runner.server.door  # type: ignore[union-attr]
    heads = []
    match = door.match

    def counted(head: bytes) -> object:
        heads.append(head)
        return match(head)

    monkeypatch.setattr(door, "match", counted)
    reader, writer = await served.open()
    request = post(b"b" * 60, *(f"X-{i}: {'a' * 50}" for i in range(20)))
    head_end = request.index(b"\r\n\r\n") + 4
    writer.write(request[:head_end])
    for byte in request[head_end:]:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.001)  # a segment each
    assert (await response(reader))[2].startswith(b'{"front":true')
    assert len(heads) == 1, len(heads)
    writer.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n",
        post(b"body", "Content-Encoding: identity"),
        post(b"body", "Expect: 100-continue"),
        post(b"body", "X-Key: a", "X-Key: b"),  # a repeated header: aiohttp's rules
        post(b"body").replace(b"HTTP/1.1", b"HTTP/1.0"),
        post(b"x" * 65),  # over the route's max_body
        b"POST /echo HTTP/1.1\r\nHost: x\r\n\r\n",  # no Content-Length
        b"POST /echo HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody",  # no Host
        post(b"body", "X-Long: " + "a" * 8200),  # over aiohttp's line limit: its answer
    ],
    ids=["chunked", "encoded", "expect", "repeated", "http10", "large", "no-length", "no-host", "long"],
)
async def test_other_shapes_go_to_aiohttp(served: Served, request_bytes: bytes) -> None:
    reader, writer = await served.open()
    writer.write(request_bytes)
    status, _, body = await response(reader)
    assert status in (100, 200, 400, 431) and served.echo.served == 0  # aiohttp's: 400 for no Host, 431 for long
    if status == 200:
        assert body == b'{"front": false}' and served.seen[0].startswith("POST /echo")
    writer.close()


async def test_after_a_fast_request_another_route_is_aiohttp_s_for_good(served: Served) -> None:
    reader, writer = await served.open()
    writer.write(post(b"one") + b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n" + post(b"two"))
    answers = [(await response(reader))[2] for _ in range(3)]
    assert answers[0].startswith(b'{"front":true') and answers[1:] == [b'{"front": false}'] * 2
    assert served.echo.served == 1 and served.seen == ["GET /other ", "POST /echo two"]
    writer.close()


async def test_a_malformed_head_gets_aiohttp_s_400(served: Served) -> None:
    reader, writer = await served.open()
    writer.write(b"POST /echo HTTP/1.1\r\nBad Header: x\r\nContent-Length: 1\r\n\r\nx")
    status, _, _ = await response(reader)
    assert status == 400 and served.echo.served == 0
    writer.close()


async def test_connection_close_is_honoured(served: Served) -> None:
    reader, writer = await served.open()
    writer.write(post(b"bye", "Connection: close"))
    _, headers, _ = await response(reader)
    assert headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_an_idle_or_slow_connection_is_closed_after_the_timeout(served: Served) -> None:
    reader, writer = await served.open()
    writer.write(post(b"x"))
    await response(reader)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # idle after its answer
    reader, writer = await served.open()
    writer.write(b"POST /echo HTTP/1.1\r\nHost:")  # never finished
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 5)


async def test_the_idle_timeout_counts_from_the_last_answer(served: Served) -> None:
    """The timeout is 0.5 s: a request at 0.35 s keeps the connection open past
    0.5 s, until 0.5 s after its answer; one answered slowly is not cut meanwhile."""
    loop = asyncio.get_running_loop()
    reader, writer = await served.open()
    writer.write(post(b"first"))
    await response(reader)
    await asyncio.sleep(0.35)
    writer.write(post(b"second"))
    await response(reader)
    answered = loop.time()
    gate = served.echo.gate = asyncio.Event()
    await asyncio.sleep(0.3)  # past the first deadline
    writer.write(post(b"slow"))
    await asyncio.sleep(0.7)  # answered after more than the timeout
    gate.set()
    assert (await response(reader))[2].startswith(b'{"front":true,"body":"slow"')
    slow_answered = loop.time()
    assert slow_answered - answered > 0.9
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert loop.time() - slow_answered >= 0.45  # idle from the slow answer on, not from before it


async def test_shutdown_answers_the_request_in_flight_then_closes(served: Served) -> None:
    gate = served.echo.gate = asyncio.Event()
    busy_reader, busy_writer = await served.open()
    idle_reader, idle_writer = await served.open()
    busy_writer.write(post(b"last"))
    idle_writer.write(post(b"first", "X-Key: idle"))
    gate.set()
    await response(idle_reader)
    await asyncio.sleep(0.05)
    gate.clear()
    busy_writer.write(post(b"late"))
    await asyncio.sleep(0.05)
    cleanup = asyncio.create_task(served.runner.cleanup())
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # idle: closed at once
    await response(busy_reader)  # "last"
    gate.set()
    _, headers, body = await response(busy_reader)
    assert b"late" in body and headers["connection"] == "close"
    await cleanup


def test_match_reads_only_plain_requests() -> None:
    door = FrontDoor({(b"POST", b"/echo"): Echo()}, 1.0)
    plain = door.match(b"POST /echo?q=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nAuthorization: Bearer k\xc3\xa9")
    assert plain is not None and plain.length == 3 and plain.headers["authorization"] == "Bearer k\xe9"
    assert plain.target == "/echo?q=1" and plain.method == "POST"
    assert door.match(b"GET /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 3") is None
    assert door.match(b"POST /echo HTTP/1.1\r\nContent-Length: +3") is None
    assert door.match(b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\n folded") is None
    assert door.match(b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\nX: a\x00b") is None
    assert door.match(b"POST  /echo HTTP/1.1\r\nContent-Length: 3") is None
    assert door.match(b"POST /echo?\xc3\xa9 HTTP/1.1\r\nHost: h\r\nContent-Length: 3") is None
    assert door.match(b"POST /echo?q=1#top HTTP/1.1\r\nHost: h\r\nContent-Length: 3") is None  # aiohttp drops it


def test_a_refused_request_line_is_logged_without_its_token(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp quotes the start of a request line it refuses (over 8190 bytes): a stream's has ?token=."""
    monkeypatch.setattr(malformed, "_warn", Throttle(malformed.log, interval=60.0))  # unmuted by other tests
    line = b"/sse?token=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9&room=" + b"r" * 40
    refused = LineTooLong(line, 8190)
    record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", (), None)
    record.exc_info = (LineTooLong, refused, None)
    with caplog.at_level(logging.WARNING, logger="herald"):
        assert MalformedRequests().filter(record) is False
    assert "refused malformed requests" in caplog.text and "/sse?token=" in caplog.text
    assert "eyJ" not in caplog.text, caplog.text
