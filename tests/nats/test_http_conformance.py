"""The front door (gateway/front.py) and the stream heads against RFC 9110 /
RFC 9112, and against what aiohttp answers for the same request, over raw
sockets against a real node: HEAD on a stream, Date, bare LF, header count,
clients that never read their answers, HTTP versions, Host values."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import time
import uuid
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import pytest

from broker.embedded import NatsServer, free_port
from broker.throttle import Throttle
from gateway import malformed

from ..helpers import PUBLISH_KEY, NodeFactory, RunningNode, spawn_cluster_node, token, wait_for, wait_http_ok
from .test_front_paths import REPEATED, exchange

BODY = b'{"channel":"room:lobby","data":1}'


def address(node: RunningNode) -> tuple[str, int]:
    host, port = node.url.removeprefix("http://").split(":")
    return host, int(port)


async def timed_exchange(node: RunningNode, request: bytes, seconds: float = 3.0) -> tuple[bytes, float]:
    """What the node sends back until it closes or ``seconds`` pass, and how long that took."""
    began = time.monotonic()
    received = await exchange(node, request, seconds)
    return received, time.monotonic() - began


def publish(extra: bytes = b"", key: bytes = PUBLISH_KEY.encode(), body: bytes = BODY) -> bytes:
    return b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %b\r\n%bContent-Length: %d\r\n\r\n%b" % (
        key,
        extra,
        len(body),
        body,
    )


# --- HEAD on a stream route ----------------------------------------------------------------------


async def test_head_on_sse_sends_no_content_and_opens_no_stream(node: RunningNode) -> None:
    """RFC 9110 9.3.2: no content in a HEAD answer; a stream route refuses it
    (405) rather than opening a stream."""
    request = b"HEAD /sse?token=%b&room=lobby HTTP/1.1\r\nHost: x\r\n\r\n" % token("header").encode()
    reader, writer = await asyncio.open_connection(*address(node))
    try:
        writer.write(request)
        async with asyncio.timeout(3):
            head = await reader.readuntil(b"\r\n\r\n")
        try:
            async with asyncio.timeout(1.0):
                content = await reader.read(65536)
        except TimeoutError:
            content = b""
        sessions = len(node.node.sessions)
    finally:
        writer.transport.abort()
    assert head.startswith(b"HTTP/1.1 405") and content == b"", (head, content[:300])
    assert sessions == 0, "a HEAD request opened a stream (and counts against the user's connections)"


# --- Date (RFC 9110 6.6.1: in every 2xx and 4xx answer) --------------------------------------------


@pytest.mark.parametrize("shape", [b"", REPEATED], ids=["front", "aiohttp"])
async def test_the_sse_head_carries_a_date(node: RunningNode, shape: bytes) -> None:
    request = b"GET /sse?token=%b HTTP/1.1\r\nHost: x\r\n%b\r\n" % (token("dated").encode(), shape)
    answer, _ = await timed_exchange(node, request, seconds=1.0)
    head = answer.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 200 OK"), answer[:300]
    assert re.search(rb"\r\nDate: ", head, re.IGNORECASE), head


@pytest.mark.parametrize(
    ("query", "status"), [(b"token=bad", b"401"), (b"token=%b&room=a.b", b"400")], ids=["bad_token", "bad_room"]
)
async def test_sse_refusals_carry_a_date(node: RunningNode, query: bytes, status: bytes) -> None:
    if b"%b" in query:
        query = query % token().encode()
    answer, _ = await timed_exchange(node, b"GET /sse?%b HTTP/1.1\r\nHost: x\r\n\r\n" % query, seconds=1.0)
    head = answer.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 " + status), answer[:300]
    assert re.search(rb"\r\nDate: ", head, re.IGNORECASE), head


# --- bare LF (RFC 9112 2.2: "SHOULD respond with a 400 (Bad Request) response and close") -----------


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /healthz HTTP/1.1\nHost: x\n\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\n",
        b"POST /api/publish HTTP/1.1\nHost: x\nContent-Length: 2\n\n{}",
    ],
    ids=["all-LF", "LF-last", "publish-LF"],
)
async def test_a_request_with_bare_lf_line_ends_is_answered_400_at_once(
    node: RunningNode, request_bytes: bytes
) -> None:
    answer, took = await timed_exchange(node, request_bytes, seconds=5.0)
    assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400"), (answer[:200], took)
    assert took < 3.0, took


# --- heads no parser reads: the node's JSON refusal, not aiohttp's plain text -----------------------

LONG = b"x" * 9000  # past the 8190 bytes aiohttp reads of a line


@pytest.mark.parametrize(
    ("request_bytes", "status", "says"),
    [
        (b"GET /sse?token=%b HTTP/1.1\r\nHost: x\r\n\r\n" % LONG, 414, "request line"),
        (b"GET /healthz?q=%b HTTP/1.1\r\nHost: x\r\n\r\n" % LONG, 414, "request line"),
        (b"POST /api/publish?token=%b HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}" % LONG, 414, "request line"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: %b\r\n\r\n" % LONG, 431, "header line"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n%b\r\n" % b"".join(b"X-H%d: 1\r\n" % i for i in range(140)), 431, "128"),
        (b"GET /healthz HTTP/1.1\nHost: x\n\n", 400, "malformed"),
        (b"GET /healthz HTTP/1.1\r\n\r\n", 400, "Host"),
    ],
    ids=["sse-line", "healthz-line", "publish-line", "header-line", "many-headers", "bare-LF", "no-Host"],
)
async def test_a_head_no_parser_reads_is_refused_in_json_and_closed(
    node: RunningNode, request_bytes: bytes, status: int, says: str
) -> None:
    """docs/protocol.md 9: every refusal is {"error","message"}; aiohttp's parser
    answered these with a plain-text 400 quoting the request line (token and all).
    RFC 9112 3: a request line too long is 414; RFC 6585: header fields, 431."""
    answer, took = await timed_exchange(node, request_bytes, seconds=5.0)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert re.match(rb"HTTP/1\.[01] %d " % status, head), answer[:300]
    assert re.search(rb"\r\nContent-Type: application/json", head, re.IGNORECASE), head
    refusal = json.loads(body)
    assert refusal["error"] == "bad_request" and says in refusal["message"], refusal
    assert b"xxxxxxxxxx" not in answer  # nothing of the request is echoed: a token would be
    assert took < 3.0, took  # and the connection closes


async def test_the_admin_port_refuses_such_heads_in_json_too(
    spawn: Any, nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    """[admin] port serves /metrics, /api/stats, /api/presence: its heads are judged as the public port's."""
    tag = "adm" + uuid.uuid4().hex[:8]
    admin_port = free_port()
    shared = {"subject": {"prefix": tag}, "stream": {"name": tag.upper()}}
    await spawn_cluster_node(spawn, http, nats_server.url, shared, HERALD_ADMIN_PORT=str(admin_port))
    await wait_http_ok(http, f"http://127.0.0.1:{admin_port}/healthz", None, timeout=10)
    for request, status in (
        (b"GET /api/stats?q=%b HTTP/1.1\r\nHost: x\r\n\r\n" % LONG, 414),
        (b"GET /api/stats HTTP/1.1\r\nHost: x\r\nX-Long: %b\r\n\r\n" % LONG, 431),
        (b"GET /api/stats HTTP/1.1\nHost: x\n\n", 400),
    ):
        answer = await exchange(cast(RunningNode, SimpleNamespace(url=f"http://127.0.0.1:{admin_port}")), request)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert re.match(rb"HTTP/1\.[01] %d " % status, head), answer[:300]
        assert json.loads(body)["error"] == "bad_request", body


async def test_a_request_line_too_long_is_logged_without_its_token(
    node: RunningNode, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(malformed, "_warn", Throttle(malformed.log, interval=60.0))  # unmuted by other tests
    secret = token("long").encode()
    with caplog.at_level(logging.WARNING, logger="herald"):
        request = b"GET /sse?token=%b&room=%b HTTP/1.1\r\nHost: x\r\n\r\n" % (secret, LONG)
        answer, _ = await timed_exchange(node, request)
    assert answer.startswith(b"HTTP/1.1 414 "), answer[:200]
    said = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert said and "(HTTP 414)" in said[0] and "/sse?token=" in said[0], said
    assert secret[:20].decode() not in caplog.text


# --- more headers than aiohttp takes: a fast route gives the same answers through both paths --------


async def test_a_request_with_more_headers_than_aiohttp_allows_gets_the_same_answer(node: RunningNode) -> None:
    many = b"".join(b"X-H%d: 1\r\n" % i for i in range(140))  # 1.4 KB: far below MAX_HEAD
    front, _ = await timed_exchange(node, publish(many), seconds=1.0)
    aiohttp_, _ = await timed_exchange(node, publish(many + REPEATED), seconds=1.0)
    assert aiohttp_.startswith(b"HTTP/1.0 431 Request Header Fields Too Large")  # aiohttp: "Too many headers received"
    assert front.split(b"\r\n", 1)[0] == aiohttp_.split(b"\r\n", 1)[0], (front[:200], aiohttp_[:200])


# --- a client that pipelines requests and never reads the answers --------------------------------


async def non_reading_client(node: RunningNode, request: bytes, total: int) -> tuple[asyncio.StreamWriter, int]:
    """Pipelines up to ``total`` copies of ``request`` on a socket whose owner never reads;
    returns the writer and how many were accepted before the node pushed back."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, address(node))
    _, writer = await asyncio.open_connection(sock=sock)
    sent = 0
    batch = 1000
    while sent < total:
        writer.write(request * batch)
        try:
            async with asyncio.timeout(1.0):
                await writer.drain()
        except TimeoutError:
            break  # the node stopped reading: backpressure
        sent += batch
    return writer, sent


def held_by_front_door(node: RunningNode) -> int:
    """Bytes the front door holds for its connections: unread input and unsent answers."""
    door = node.runner.server.door  # type: ignore[attr-defined]
    held = 0
    for connection in list(door.connections):
        held += len(connection._buffer)
        if connection._transport is not None:
            held += connection._transport.get_write_buffer_size()
    return held


async def test_answers_to_a_client_that_never_reads_are_not_buffered_without_bound(node: RunningNode) -> None:
    """As aiohttp does: once ~64 KiB of answers wait, no more is read (the client blocks)."""
    refused = publish(key=b"wrong")  # 401: no NATS involved, ~90 bytes in, ~300 bytes out
    writer, sent = await non_reading_client(node, refused, 100_000)
    try:
        await asyncio.sleep(2.0)  # let the node answer what it took in
        held = held_by_front_door(node)
    finally:
        writer.transport.abort()
    assert held < 4 * 2**20, f"{held / 2**20:.1f} MiB held for one client that sent {sent} requests and reads nothing"


async def test_a_connection_whose_answers_are_never_read_is_freed_after_the_timeout(
    node_factory: NodeFactory,
) -> None:
    """At the timeout such a connection is dropped: a close would wait for ever
    to write what the client never reads (and shutdown would wait for it)."""
    node: RunningNode = await node_factory(http={"handshake_timeout": 1.0})
    writer, _ = await non_reading_client(node, publish(key=b"wrong"), 20_000)
    door = node.runner.server.door  # type: ignore[attr-defined]
    try:
        assert door.connections
        await wait_for(lambda: not door.connections, timeout=5.0)
    except TimeoutError:
        held = held_by_front_door(node)
        raise AssertionError(f"still held 4 s after the 1 s timeout: {held / 2**20:.1f} MiB unsent") from None
    finally:
        writer.transport.abort()


# --- the version (RFC 9110 2.5) -------------------------------------------------------------------


async def test_an_http_2_request_line_is_not_answered_as_http_2(node: RunningNode) -> None:
    """RFC 9110 2.5: never answered in a version the node does not speak
    (aiohttp would echo "HTTP/2.0"): 505."""
    request = publish().replace(b"HTTP/1.1", b"HTTP/2.0", 1)
    answer, _ = await timed_exchange(node, request, seconds=1.0)
    status = answer.split(b"\r\n", 1)[0]
    assert status == b"HTTP/1.1 505 HTTP Version Not Supported", answer[:200]


# --- Host (RFC 9112 3.2: a Host with an invalid value MUST be answered 400) -------------------------


@pytest.mark.parametrize("shape", [b"", REPEATED], ids=["front", "aiohttp"])
@pytest.mark.parametrize("host", [b"a b", b"[::1", b"x/y", b"x,y"], ids=["space", "open-bracket", "slash", "list"])
async def test_an_invalid_host_is_refused_400(node: RunningNode, shape: bytes, host: bytes) -> None:
    """Host = uri-host [ ":" port ] (RFC 9110 7.2, RFC 3986 3.2.2): none of these is one
    (a "," is two Host lines joined)."""
    request = publish(shape).replace(b"Host: x\r\n", b"Host: %b\r\n" % host, 1)
    answer, _ = await timed_exchange(node, request, seconds=1.0)
    status = answer.split(b"\r\n", 1)[0]
    assert status.endswith(b" 400 Bad Request"), answer[:300]


async def test_a_stream_whose_request_came_with_much_more_still_sees_its_client_leave(node: RunningNode) -> None:
    """Bytes piled up behind the request pause the front door's reading; the
    stream that takes the socket reads on, so the client's leaving ends it."""
    request = b"GET /sse?token=%b HTTP/1.1\r\nHost: x\r\n\r\n" % token("piled").encode()
    reader, writer = await asyncio.open_connection(*address(node))
    writer.write(request + b"x" * 200_000)
    async with asyncio.timeout(5):
        await reader.readuntil(b"event: welcome")
    await wait_for(lambda: len(node.node.sessions) == 1)
    writer.close()
    await wait_for(lambda: len(node.node.sessions) == 0, timeout=5)
