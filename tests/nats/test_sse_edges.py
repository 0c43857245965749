"""The SSE transport and POST /api/command at their edges: framing, the two
paths, forwarded commands, Last-Event-ID, slow readers, drains, CORS.
A strict WHATWG EventSource parser (html.spec.whatwg.org, "Parsing an event
stream") reads raw socket bytes, so what a browser would reconstruct is checked,
not what a lenient test client makes of it."""

from __future__ import annotations

import asyncio
import codecs
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
import orjson
import pytest

from broker.embedded import NatsServer

from ..helpers import (
    PUBLISH_HEADERS,
    NodeFactory,
    RunningNode,
    api_publish,
    core_publish,
    token,
)


@dataclass
class Event:
    type: str
    data: str
    last_event_id: str


@dataclass
class Whatwg:
    """The WHATWG event-stream parser, fed bytes."""

    events: list[Event] = field(default_factory=list)
    retry: int | None = None
    comments: int = 0
    _dec: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    _buf: str = ""
    _first: bool = True
    _data: str = ""
    _type: str = ""
    _lid_buf: str = ""
    _last_id: str = ""
    _pending_cr: bool = False

    def feed(self, raw: bytes) -> None:
        text = self._dec.decode(raw)
        if self._first and text:
            self._first = False
            if text.startswith("\ufeff"):
                text = text[1:]
        self._buf += text
        while True:
            # A line ends at CRLF, LF or CR; a CR at the end may be the start of a CRLF.
            i = 0
            n = len(self._buf)
            end = -1
            while i < n:
                c = self._buf[i]
                if c == "\n":
                    end, skip = i, 1
                    break
                if c == "\r":
                    if i + 1 < n:
                        end, skip = i, 2 if self._buf[i + 1] == "\n" else 1
                        break
                    return  # wait for the next byte
                i += 1
            if end < 0:
                return
            line = self._buf[:end]
            self._buf = self._buf[end + skip :]
            self._line(line)

    def _line(self, line: str) -> None:
        if line == "":
            self._dispatch()
            return
        if line.startswith(":"):
            self.comments += 1
            return
        if ":" in line:
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
        else:
            name, value = line, ""
        if name == "event":
            self._type = value
        elif name == "data":
            self._data += value + "\n"
        elif name == "id":
            if "\x00" not in value:
                self._lid_buf = value
        elif name == "retry" and value and all("0" <= ch <= "9" for ch in value):
            self.retry = int(value)

    @property
    def last_event_id(self) -> str:
        """What an EventSource would send as ``Last-Event-ID`` on a reconnect now."""
        return self._last_id

    def _dispatch(self) -> None:
        self._last_id = self._lid_buf
        if self._data == "":
            self._type = ""
            return
        data = self._data[:-1] if self._data.endswith("\n") else self._data
        self.events.append(Event(self._type or "message", data, self._last_id))
        self._data = ""
        self._type = ""


class RawSse:
    """An SSE request on a plain socket: the head and body bytes as sent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.head = b""
        self.body = b""
        self.parser = Whatwg()

    @classmethod
    async def open(
        cls, node_url: str, params: list[tuple[str, str]], headers: list[tuple[str, str]] = (), rcvbuf: int = 0
    ) -> RawSse:
        import socket

        parts = urlsplit(node_url)
        if rcvbuf:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=2048)
        else:
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port, limit=2**22)
        lines = [f"GET /sse?{urlencode(params)} HTTP/1.1", f"Host: {parts.netloc}", "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in headers]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        self = cls(reader, writer)
        self.head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        return self

    @property
    def status(self) -> int:
        return int(self.head.split(b" ", 2)[1])

    async def read_some(self, timeout: float) -> bool:
        try:
            chunk = await asyncio.wait_for(self.reader.read(65536), timeout)
        except TimeoutError:
            return True
        if not chunk:
            return False
        self.body += chunk
        self.parser.feed(chunk)
        return True

    async def until(self, pred: Any, timeout: float = 5.0) -> list[Event]:
        async with asyncio.timeout(timeout):
            while not pred(self.parser.events):
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise EOFError(f"stream ended; events: {self.parser.events}")
                self.body += chunk
                self.parser.feed(chunk)
        return self.parser.events

    async def to_end(self, timeout: float = 5.0) -> list[Event]:
        async with asyncio.timeout(timeout):
            while chunk := await self.reader.read(65536):
                self.body += chunk
                self.parser.feed(chunk)
        return self.parser.events

    def close(self) -> None:
        self.writer.transport.abort()


async def publish_raw(http: aiohttp.ClientSession, node: RunningNode, data: bytes) -> None:
    """Publish ``data`` (JSON bytes, as written) to room:lobby."""
    body = b'{"channel":"room:lobby","data":' + data + b"}"
    async with http.post(node.url + "/api/publish", data=body, headers=PUBLISH_HEADERS) as r:
        assert r.status == 200, await r.text()


def messages(events: list[Event], skip: tuple[str, ...] = ("welcome", "keepalive")) -> list[Event]:
    return [e for e in events if e.type not in skip]


async def command(
    http: aiohttp.ClientSession, node: RunningNode, tok: str, cmd: Any, **headers: str
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    async with http.post(
        node.url + "/api/command",
        data=orjson.dumps(cmd) if not isinstance(cmd, bytes) else cmd,
        headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/json", **headers},
    ) as resp:
        raw = await resp.read()
        return resp.status, raw, resp.headers


def cluster_shared() -> dict[str, Any]:
    tag = "pr" + uuid.uuid4().hex[:8]
    return {"subject": {"prefix": tag}, "stream": {"name": tag.upper(), "storage": "memory"}}


# ---------------------------------------------------------------------------------------------
# Framing: what EventSource reconstructs equals what was published.

PAYLOADS = [
    b"one line",
    b"two\nlines",
    b"trailing newline\n",
    b"\nleading newline",
    b"",
    b" leading space",
    b":colon first",
    b"data: looks like a field",
    b"nul\x00inside",
    "line\u2028sep\u2029para\u0085nel".encode(),
    b"x" * 200_000,
    b"\n\n\n",
    b"id: 5\nevent: evil\n\ndata: injected",
    "\ufeffbom first".encode(),
]


@pytest.mark.parametrize("envelope", [False, True], ids=["bare", "envelope"])
async def test_framing_round_trips_through_a_whatwg_parser(
    node: RunningNode, nats_server: NatsServer, http: aiohttp.ClientSession, envelope: bool
) -> None:
    prefix = node.settings.subject.prefix
    await core_publish(nats_server.url, f"{prefix}.room.lobby", PAYLOADS, {"Herald-Event": "chat"})
    params = [("token", token("alice")), ("room", "lobby"), ("since", "0")]
    if envelope:
        params.append(("envelope", "1"))
    sse = await RawSse.open(node.url, params)
    assert sse.status == 200
    events = await sse.until(lambda evs: len(messages(evs)) >= len(PAYLOADS), 10)
    got = messages(events)
    assert len(got) == len(PAYLOADS)
    for p, ev in zip(PAYLOADS, got, strict=True):
        if envelope:
            frame = orjson.loads(ev.data)
            assert ev.type == "message"
            assert frame["event"] == "chat"
            try:
                expected = orjson.loads(p)
            except orjson.JSONDecodeError:
                expected = p.decode("utf-8", "replace")
            assert frame["data"] == expected, p[:60]
            assert ev.last_event_id == frame["id"]
        else:
            assert ev.type == "chat"
            # SSE cannot carry a CR: line breaks of any kind arrive as LF. Nothing else changes.
            assert ev.data == p.decode().replace("\r\n", "\n").replace("\r", "\n"), p[:60]
    sse.close()


# ---------------------------------------------------------------------------------------------
# Forwarded commands answer as if posted to the stream's node.

BIG = b'{"big":123456789012345678901234567890,"neg":-9223372036854775809,"u64":18446744073709551616}'


async def test_forwarded_history_keeps_numbers_exact_as_a_local_one(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    shared = cluster_shared()
    a, b = await node_factory(**shared), await node_factory(**shared)
    tok = token("alice", publish=["*"])
    await publish_raw(http, a, BIG)  # integers past 64 bits (the publish API keeps them exact)
    sse = await RawSse.open(a.url, [("token", tok), ("room", "lobby"), ("envelope", "1")])
    events = await sse.until(lambda evs: any(e.type == "welcome" for e in evs))
    conn = orjson.loads(events[0].data)["conn"]
    cmd = {"type": "history", "room": "lobby", "conn": conn, "ref": "h"}
    status_a, local, _ = await command(http, a, tok, cmd)
    status_b, forwarded, _ = await command(http, b, tok, cmd)
    assert status_a == status_b == 200
    assert BIG in local, local
    # The same answer from the other node: the node that holds the stream wrote it exactly.
    assert BIG in forwarded, forwarded
    sse.close()


async def test_a_forwarded_answer_over_nats_max_payload_is_refused_at_once(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    # A history page of 20 messages of 60 KB is 1.2 MB: more than one NATS
    # message (max_payload, 1 MiB) can carry back from the stream's node. It
    # was dropped there (MaxPayloadError in its log), and the asker answered
    # 503 "did not answer in time" after the relay's whole timeout.
    shared = cluster_shared()
    a, b = await node_factory(**shared), await node_factory(**shared)
    tok = token("alice", publish=["*"])
    for _ in range(20):
        await publish_raw(http, a, b'"' + b"x" * 60_000 + b'"')
    sse = await RawSse.open(a.url, [("token", tok), ("room", "lobby"), ("envelope", "1")])
    events = await sse.until(lambda evs: any(e.type == "welcome" for e in evs))
    conn = orjson.loads(events[0].data)["conn"]
    started = asyncio.get_running_loop().time()
    status, raw, _ = await command(http, b, tok, {"type": "history", "room": "lobby", "conn": conn, "ref": "h"})
    assert asyncio.get_running_loop().time() - started < 3.0
    body = orjson.loads(raw)
    assert (status, body["code"], body["ref"]) == (413, "too_large", "h"), body
    assert "max_payload" in body["message"]
    status, _, _ = await command(http, b, tok, {"type": "history", "room": "lobby", "conn": conn, "limit": 2})
    assert status == 200  # a smaller page passes
    sse.close()


# ---------------------------------------------------------------------------------------------
# The aiohttp path (a request shape the front door hands over) and the front door's give the same stream.


@pytest.mark.parametrize("envelope", [False, True], ids=["bare", "envelope"])
async def test_aiohttp_path_and_front_door_send_the_same_stream(
    node: RunningNode, http: aiohttp.ClientSession, envelope: bool
) -> None:
    ids = [await api_publish(http, node, "room:lobby", {"n": i}) for i in range(3)]
    params = [("token", token("alice")), ("room", "lobby"), ("since", ids[0])]
    if envelope:
        params.append(("envelope", "1"))
    front = await RawSse.open(node.url, params)
    # A header twice: the front door hands the connection to aiohttp.
    slow = await RawSse.open(node.url, params, [("X-Dup", "1"), ("X-Dup", "2")])
    bodies = []
    heads = []
    for s in (front, slow):
        assert s.status == 200, s.head
        await s.until(lambda evs: len(messages(evs)) >= 2)
        await asyncio.sleep(0.3)
        await s.read_some(0.2)
        welcome = orjson.loads(s.parser.events[0].data)
        bodies.append(s.body.replace(welcome["conn"].encode(), b"CONN"))
        heads.append(b"\r\n".join(h for h in s.head.split(b"\r\n") if not h.startswith(b"Date:")))
        s.close()
    assert heads[0] == heads[1]
    assert bodies[0] == bodies[1]


# ---------------------------------------------------------------------------------------------
# Backpressure on SSE: a slow reader gets complete events, then event: close 4008.


@pytest.mark.parametrize("envelope", [False, True], ids=["bare", "envelope"])
async def test_slow_sse_reader_gets_whole_events_then_close_4008(
    node_factory: NodeFactory, http: aiohttp.ClientSession, envelope: bool
) -> None:
    node = await node_factory(
        backpressure={"max_bytes": 128 * 1024, "max_messages": 100000, "write_buffer": 8 * 1024, "socket_buffer": 4096},
        ws={"close_timeout": 5.0},
    )
    params = [("token", token("alice")), ("room", "lobby")] + ([("envelope", "1")] if envelope else [])
    sse = await RawSse.open(node.url, params, rcvbuf=4096)
    await sse.until(lambda evs: any(e.type == "welcome" for e in evs))
    blob = "y" * 3000
    published = []
    for i in range(200):
        published.append(await api_publish(http, node, "room:lobby", {"i": i, "pad": blob}))
    try:
        events = await sse.to_end(15)
    except TimeoutError:
        tail = [e.type for e in sse.parser.events[-3:]]
        raise AssertionError(f"no end: {len(sse.parser.events)} events, tail {tail}, {sse.body[-300:]!r}") from None
    sse.close()
    tail = events[-1]
    assert tail.type == "close", [e.type for e in events[-3:]]
    assert orjson.loads(tail.data)["code"] == 4008
    msgs = messages(events, ("welcome", "keepalive", "close"))
    assert msgs, "some messages came before the close"
    got = [orjson.loads(e.data) for e in msgs]
    ids = [g["id"] for g in got] if envelope else [e.last_event_id for e in msgs]
    assert ids == published[: len(ids)]


# ---------------------------------------------------------------------------------------------
# conn edge cases.


@pytest.mark.parametrize("conn", ["nocolon", ":5", "x" * 256, "a.b:1", "*:1", ">:1", "a b:1", "\u00e9:1"])
async def test_a_conn_of_no_node_is_not_found_at_once(
    node_factory: NodeFactory, http: aiohttp.ClientSession, conn: str
) -> None:
    node = await node_factory(http={"command_timeout": 3.0})
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, raw, _ = await command(http, node, token("alice"), {"type": "unsubscribe", "room": "x", "conn": conn})
    elapsed = loop.time() - started
    body = orjson.loads(raw)
    assert (status, body["code"]) == (404, "not_found"), (status, body, elapsed)
    assert elapsed < 1.5
    # And the node is fine afterwards.
    status, raw, _ = await command(http, node, token("alice"), {"type": "ping"})
    assert status == 200


async def open_raw(
    node: RunningNode, tok: str, rooms: list[str], envelope: bool = True, **kw: Any
) -> tuple[RawSse, str]:
    params = [("token", tok)] + [("room", r) for r in rooms] + ([("envelope", "1")] if envelope else [])
    sse = await RawSse.open(node.url, params, **kw)
    assert sse.status == 200, sse.head
    events = await sse.until(lambda evs: any(e.type == "welcome" for e in evs))
    return sse, orjson.loads(events[0].data)["conn"]


async def test_forwarded_refresh_extends_the_stream_and_drops_rooms(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    shared = cluster_shared()
    a, b = await node_factory(**shared), await node_factory(**shared)
    old = token("alice", rooms=["lobby", "b"], ttl=2)
    sse, conn = await open_raw(a, old, ["lobby", "b"])
    new = token("alice", rooms=["lobby"], ttl=3600)
    status, raw, _ = await command(http, b, new, {"type": "refresh", "token": new, "conn": conn, "ref": 1})
    assert (status, orjson.loads(raw)) == (
        200,
        {"type": "ack", "channels": ["broadcast", "room:lobby", "user"], "ref": 1},
    )
    await asyncio.sleep(2.5)
    await api_publish(http, a, "room:b", {"gone": True})
    lobby = await api_publish(http, a, "room:lobby", {"ok": True})
    events = await sse.until(lambda evs: any(e.type == "message" for e in evs) or any(e.type == "close" for e in evs))
    got = [(e.type, orjson.loads(e.data).get("id")) for e in messages(events)]
    assert got == [("message", lobby)]
    sse.close()


async def test_forwarded_rate_limit_closes_the_stream_4029_with_retry_after(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    shared = cluster_shared()
    limits = {"command_rate": 2, "rate_window": 60.0, "abuse_strikes": 3}
    a, b = await node_factory(**shared, limits=limits), await node_factory(**shared, limits=limits)
    tok = token("alice")
    sse, conn = await open_raw(a, tok, [])
    answers = []
    for _ in range(6):
        status, raw, headers = await command(http, b, tok, {"type": "ping", "conn": conn})
        answers.append((status, orjson.loads(raw).get("code"), headers.get("Retry-After")))
    assert answers[0][:2] == answers[1][:2] == (200, None)
    assert answers[2][:2] == (429, "rate_limited") and answers[2][2] is not None
    # The strike that closes it: 429 "the connection was closed", then the conn is gone (404).
    assert answers[4][:2] == (429, "rate_limited")
    assert answers[5][:2] == (404, "not_found")
    events = await sse.to_end()
    assert [(e.type, orjson.loads(e.data)["code"]) for e in messages(events)] == [("close", 4029)]


# ---------------------------------------------------------------------------------------------
# CORS: a page of an allowed origin can read what it is told (limits.origins, 11.3).


async def test_sse_refusals_to_an_allowed_origin_carry_cors_headers(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    node = await node_factory(limits={"origins": ["https://app.example"]})
    origin = [("Origin", "https://app.example")]
    ok = await RawSse.open(node.url, [("token", token("alice"))], origin)
    assert ok.status == 200 and b"Access-Control-Allow-Origin: https://app.example" in ok.head
    ok.close()
    for params in ([("token", "garbage")], [("token", token("alice")), ("room", "bad room")]):
        sse = await RawSse.open(node.url, params, origin)
        assert sse.status in (400, 401), sse.head
        assert b"Access-Control-Allow-Origin: https://app.example" in sse.head, sse.head
        sse.close()


# ---------------------------------------------------------------------------------------------
# Last-Event-ID and ?since=.


@pytest.mark.parametrize(
    ("lei", "since", "status"),
    [
        ("", "", 200),
        ("", "1", 200),
        ("abc", "", 400),
        ("abc", "1", 400),
        ("1", "abc", 200),
        ("9223372036854775807", "", 200),
        ("9223372036854775808", "", 400),
        ("00000000000000000001", "", 200),
        ("-1", "", 400),
        ("1 2", "", 400),
    ],
)
async def test_last_event_id_and_since_combinations(
    node: RunningNode, http: aiohttp.ClientSession, lei: str, since: str, status: int
) -> None:
    params = [("token", token("alice")), ("room", "lobby")] + ([("since", since)] if since else [])
    headers = [("Last-Event-ID", lei)] if lei else []
    sse = await RawSse.open(node.url, params, headers)
    assert sse.status == status, (sse.head, await sse.reader.read(500))
    if status == 200:
        await sse.until(lambda evs: any(e.type == "welcome" for e in evs))
        live = await api_publish(http, node, "room:lobby", {"live": 1})
        events = await sse.until(lambda evs: any(e.type == "message" for e in evs))
        assert [e.last_event_id for e in events if e.type == "message"] == [live]
    sse.close()


# ---------------------------------------------------------------------------------------------
# A subscribe {since} over HTTP while the stream's opening replay is still being paced.


async def batch_publish(http: aiohttp.ClientSession, node: RunningNode, items: list[dict[str, Any]]) -> list[str]:
    async with http.post(
        node.url + "/api/publish", data=orjson.dumps(items), headers={"Authorization": "Bearer test-publish-key"}
    ) as r:
        body = await r.json()
        assert r.status == 200, body
        return [str(i) for i in body["ids"]]


async def slow_read(sse: RawSse, chunk: int, pause: float) -> None:
    while True:
        data = await sse.reader.read(chunk)
        if not data:
            return
        sse.body += data
        sse.parser.feed(data)
        await asyncio.sleep(pause)


async def test_subscribe_since_during_the_opening_replay_keeps_the_room_in_order(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    node = await node_factory(
        backpressure={"max_bytes": 64 * 1024, "write_buffer": 8 * 1024, "socket_buffer": 4096, "stall_timeout": 20.0},
    )
    pad = "z" * 800
    old: list[str] = []
    for k in range(2):
        old += await batch_publish(
            http, node, [{"channel": "room:lobby", "data": {"i": k * 500 + i, "pad": pad}} for i in range(500)]
        )
    b_id = await api_publish(http, node, "room:b", {"b": 1})
    tok = token("alice")
    sse = await RawSse.open(
        node.url, [("token", tok), ("room", "lobby"), ("envelope", "1"), ("since", "0")], rcvbuf=4096
    )
    await sse.until(lambda evs: any(e.type == "welcome" for e in evs))
    conn = orjson.loads(sse.parser.events[0].data)["conn"]
    reading = asyncio.create_task(slow_read(sse, 16 * 1024, 0.01))
    try:
        status, raw, _ = await command(http, node, tok, {"type": "subscribe", "room": "b", "since": "0", "conn": conn})
        assert status == 200, raw
        live = [await api_publish(http, node, "room:lobby", {"live": i}) for i in range(5)]
        await asyncio.wait_for(
            _wait(lambda: sum(1 for e in sse.parser.events if e.type == "message") >= len(old) + 1 + len(live)), 30
        )
    except TimeoutError:
        types = [e.type for e in sse.parser.events]
        ids = [
            (orjson.loads(e.data)["channel"][5:], orjson.loads(e.data).get("id"))
            for e in sse.parser.events
            if e.type == "message"
        ]
        raise AssertionError(f"{len(types)} events, ids {ids}, body tail {sse.body[-100:]!r}") from None
    finally:
        reading.cancel()
        sse.close()
    frames = [orjson.loads(e.data) for e in sse.parser.events if e.type == "message"]
    lobby = [f["id"] for f in frames if f["channel"] == "room:lobby"]
    assert [f["id"] for f in frames if f["channel"] == "room:b"] == [b_id]
    assert len(lobby) == len(set(lobby)), "duplicates"
    assert lobby == old + live, (
        f"lobby out of order: first live at {lobby.index(live[0]) if live[0] in lobby else None} of {len(lobby)}"
    )


async def _wait(pred: Any) -> None:
    while not pred():
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# Commands racing the stream's close leave nothing behind.


@pytest.mark.parametrize("since", [None, "0"], ids=["plain", "since"])
async def test_subscribe_racing_the_close_leaves_no_presence(
    node_factory: NodeFactory, http: aiohttp.ClientSession, since: str | None
) -> None:
    shared = cluster_shared()
    a, b = await node_factory(**shared), await node_factory(**shared)
    await api_publish(http, a, "room:r0", {"x": 1})
    tok = token("alice")
    for i in range(15):
        sse, conn = await open_raw(a, tok, [])
        cmd = {"type": "subscribe", "room": f"r{i}", "conn": conn}
        if since is not None:
            cmd["since"] = since
        target = a if i % 2 else b
        task = asyncio.create_task(command(http, target, tok, cmd))
        await asyncio.sleep(0.001 * (i % 5))
        sse.close()
        await task
    await asyncio.sleep(0.5)
    for i in range(15):
        _status, raw, _ = await command(http, b, tok, {"type": "presence", "room": f"r{i}"})
        assert orjson.loads(raw)["users"] == [], (i, raw)
    async with http.get(a.url + "/api/stats", headers={"Authorization": "Bearer test-admin-key"}) as r:
        stats = await r.json()
    assert stats["connections"]["sse"] == 0 and stats["rooms"] == {}, stats


async def test_drain_tells_sse_when_to_reconnect(node_factory: NodeFactory, http: aiohttp.ClientSession) -> None:
    node = await node_factory(http={"drain_delay": 0.0, "reconnect_spread": 2.0, "shutdown_grace": 1.0})
    sse, _ = await open_raw(node, token("alice"), [], envelope=False)
    stopping = asyncio.create_task(node.stop())
    events = await sse.to_end(10)
    await stopping
    close = [e for e in events if e.type == "close"]
    assert len(close) == 1
    frame = orjson.loads(close[0].data)
    assert frame["code"] == 1012
    ms = int(frame["reason"].split(" in ")[1].split(" ")[0])
    assert sse.parser.retry == ms


async def test_forwarded_history_of_a_deeply_nested_message_is_answered_as_a_local_one(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    shared = cluster_shared()
    a, b = await node_factory(**shared), await node_factory(**shared)
    tok = token("alice")
    deep = b"[" * 300 + b"]" * 300  # valid JSON, well within what the node accepts and stores
    await publish_raw(http, a, deep)
    sse, conn = await open_raw(a, tok, ["lobby"])
    cmd = {"type": "history", "room": "lobby", "conn": conn}
    status_a, local, _ = await command(http, a, tok, cmd)
    assert status_a == 200 and deep in local
    status_b, forwarded, _ = await command(http, b, tok, cmd)
    assert (status_b, deep in forwarded) == (200, True), (status_b, forwarded[:200])
    sse.close()


@pytest.mark.parametrize("depth", [900, 1020])
async def test_a_deep_command_gets_the_same_answer_forwarded_as_local(
    node_factory: NodeFactory, http: aiohttp.ClientSession, depth: int
) -> None:
    shared = cluster_shared()
    a, b = await node_factory(**shared), await node_factory(**shared, http={"command_timeout": 3.0})
    tok = token("alice", publish=["*"])
    sse, conn = await open_raw(a, tok, ["lobby"])
    body = b'{"type":"publish","room":"lobby","conn":"%b","data":%b}' % (conn.encode(), b"[" * depth + b"]" * depth)
    status_a, local, _ = await command(http, a, tok, body)
    status_b, forwarded, _ = await command(http, b, tok, body)
    assert status_a == (200 if depth <= 512 else 400), local  # frames.MAX_DEPTH
    assert status_b == status_a, forwarded[:300]
    sse.close()


# ---------------------------------------------------------------------------------------------
# A stream ended while it joins its channels gets one HTTP answer, not an error then a 200 head.


async def test_a_stream_replaced_while_joining_gets_one_answer(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    node = await node_factory(limits={"max_connections_per_user": 1, "connections_policy": "close-oldest"})
    pad = "p" * 500
    for _k in range(2):
        await batch_publish(http, node, [{"channel": "room:lobby", "data": {"i": i, "pad": pad}} for i in range(500)])
    tok = token("alice")
    seen = []
    for delay in (0.0, 0.005, 0.01, 0.02, 0.04):
        first = asyncio.create_task(
            RawSse.open(node.url, [("token", tok), ("room", "lobby"), ("since", "0"), ("envelope", "1")])
        )
        await asyncio.sleep(delay)
        second = await RawSse.open(node.url, [("token", tok)])
        try:
            a = await first
        except (TimeoutError, asyncio.IncompleteReadError):
            second.close()
            continue
        rest = b""
        try:
            async with asyncio.timeout(5):
                while chunk := await a.reader.read(65536):
                    rest += chunk
        except TimeoutError:
            pass
        seen.append((a.status, rest.count(b"HTTP/1.1 ")))
        if a.status != 200:
            assert b"HTTP/1.1 " not in rest, (a.head, rest[:300])
        a.close()
        second.close()
        await asyncio.sleep(0.3)
    assert seen, "no stream opened"


# ---------------------------------------------------------------------------------------------
# ref is echoed in every answer but bad_frame's (3.4), over HTTP too.


async def test_http_command_errors_echo_the_ref(node: RunningNode, http: aiohttp.ClientSession) -> None:
    tok = token("alice")
    sse, conn = await open_raw(node, tok, [])
    cases = [
        (tok, {"type": "subscribe", "room": "x", "conn": f"{node.node.id}:999999", "ref": "r1"}, 404),
        (token("mallory"), {"type": "subscribe", "room": "x", "conn": conn, "ref": "r2"}, 403),
        ("garbage", {"type": "ping", "ref": "r3"}, 401),
        (tok, {"type": "ping", "conn": "", "ref": "r4"}, 400),
    ]
    got = []
    for t, cmd, _ in cases:
        s, raw, _ = await command(http, node, t, cmd)
        got.append((s, orjson.loads(raw).get("ref")))
    assert got == [(status, cmd["ref"]) for _, cmd, status in cases]
    sse.close()


@pytest.mark.parametrize("unread", [0, 2])
async def test_a_plain_eventsource_cut_before_any_message_resumes_from_its_welcome(
    node: RunningNode, http: aiohttp.ClientSession, unread: int
) -> None:
    """A stream opened without a position tells the browser (an ``id:`` with no
    data: no event) to resume from its welcome's position — after the inbox's
    messages, older — so a plain EventSource cut before its first stored
    message misses nothing published while it reconnects."""
    user = f"ev{uuid.uuid4().hex[:8]}"
    for i in range(unread):
        await api_publish(http, node, f"user:{user}", {"inbox": i})
    params = [("token", token(user)), ("room", "lobby")]
    sse = await RawSse.open(node.url, params)
    events = await sse.until(lambda evs: sum(e.type == "message" for e in evs) == unread and bool(evs))
    welcome = orjson.loads(next(e.data for e in events if e.type == "welcome"))
    await sse.until(lambda _: sse.parser.last_event_id == welcome["position"], timeout=2.0)
    assert [e.type for e in sse.parser.events] == ["welcome"] + ["message"] * unread  # no event of its own
    sse.close()
    missed = await api_publish(http, node, "room:lobby", {"while": "away"})
    again = await RawSse.open(node.url, params, [("Last-Event-ID", sse.parser.last_event_id)])
    events = await again.until(lambda evs: any(e.type == "message" for e in evs))
    assert [e.last_event_id for e in events if e.type == "message"] == [missed]
    again.close()
