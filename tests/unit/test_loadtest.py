"""Unit tests of the load generator's parsers and accounting (ops/loadtest).

No server: bytes in, frames / events / counts out. Every parser is fed the same
stream cut at every possible place, because real reads split anywhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from typing import Any
from unittest import mock

import pytest

from gateway.frames import sse_event, ws_frame
from ops.bench import render as bench_render
from ops.bench import report as bench_report
from ops.bench.run import _parser as bench_parser
from ops.bench.run import select
from ops.bench.scenarios import SCENARIO_NAMES, loadtest_command, standard
from ops.bench.servers import HttpPublish, Nchan, Target, raw_target
from ops.loadtest import payload, procstat, storm, wsproto
from ops.loadtest import report as loadtest_report
from ops.loadtest.cli import config
from ops.loadtest.clients import ConnectError, SseClient, WsClient
from ops.loadtest.http1 import ProtocolError, parse_head
from ops.loadtest.httpclient import Exchange, post_request
from ops.loadtest.publisher import HttpPublisher, Publisher
from ops.loadtest.runner import Run
from ops.loadtest.sse import Dechunker, EventParser, event_stream_body, is_message
from ops.loadtest.stats import Histogram, SeqTrack, tally
from ops.loadtest.target import UnsafeTarget, expand, loopback_url


def feed_in_pieces(parser: wsproto.FrameParser, data: bytes, cuts: list[int]) -> list[wsproto.Frame]:
    frames: list[wsproto.Frame] = []
    last = 0
    for cut in [*cuts, len(data)]:
        frames.extend(parser.feed(data[last:cut]))
        last = cut
    return frames


# -- WebSocket frames -----------------------------------------------------------


def test_frames_survive_every_split() -> None:
    # 7-bit, 16-bit (126) and 64-bit (127) lengths, a ping, and a close, back to back.
    messages = [b"a" * 5, b"b" * 300, b"c" * 70_000]
    stream = b"".join(ws_frame(m) for m in messages) + ws_frame(b"hi", wsproto.PING) + ws_frame(b"\x0f\xa0", 0x8)
    expected = [(wsproto.TEXT, m) for m in messages] + [(wsproto.PING, b"hi"), (wsproto.CLOSE, b"\x0f\xa0")]
    assert wsproto.FrameParser().feed(stream) == expected  # many frames in one read
    headers = [0, 1, 2, 3, 7, 8, 9, 10, 11, 12, 311, 312, 313, 314, 315, 316, 320, 70_000]
    for cut in headers + list(range(len(stream) - 20, len(stream))):
        assert feed_in_pieces(wsproto.FrameParser(), stream, [cut]) == expected, cut
    one_byte_at_a_time = list(range(1, len(stream)))[:400] + list(range(70_300, len(stream)))
    assert feed_in_pieces(wsproto.FrameParser(), stream, one_byte_at_a_time) == expected


def test_length_encodings() -> None:
    assert ws_frame(b"x" * 125)[1] == 125
    assert ws_frame(b"x" * 126)[1] == 126  # 16-bit length follows
    assert ws_frame(b"x" * 65536)[1] == 127  # 64-bit length follows
    for n in (0, 125, 126, 65535, 65536):
        assert wsproto.FrameParser().feed(ws_frame(b"y" * n)) == [(wsproto.TEXT, b"y" * n)]


def test_fragments_reassembled_around_a_ping() -> None:
    first = bytes((0x01, 3)) + b"abc"  # text, not final
    ping = bytes((0x89, 1)) + b"p"
    last = bytes((0x80, 2)) + b"de"  # continuation, final
    frames = feed_in_pieces(wsproto.FrameParser(), first + ping + last, [4, 7])
    assert frames == [(wsproto.PING, b"p"), (wsproto.TEXT, b"abcde")]
    with pytest.raises(ProtocolError):
        wsproto.FrameParser().feed(last)


def test_client_frames_are_masked_and_round_trip() -> None:
    for body in (b"", b"pong!", os.urandom(200), os.urandom(70_000)):
        frame = wsproto.client_frame(wsproto.PONG, body)
        assert frame[0] == 0x80 | wsproto.PONG and frame[1] & 0x80
        assert wsproto.FrameParser().feed(frame) == [(wsproto.PONG, body)]  # the parser unmasks
    assert wsproto.close_code(wsproto.FrameParser().feed(wsproto.close_frame(4008))[0][1]) == 4008
    assert wsproto.close_code(b"") == wsproto.NO_STATUS


def test_upgrade_check() -> None:
    request, key = wsproto.upgrade_request("127.0.0.1:8080", "/ws?room=r1")
    assert request.startswith(b"GET /ws?room=r1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n")
    assert key.encode() in request and request.endswith(b"\r\n\r\n")
    # RFC 6455's own example.
    assert wsproto.accept_value("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    ok = f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {wsproto.accept_value(key)}"
    head = parse_head((ok + "\r\n\r\n").encode() + b"\x81\x00")
    assert head is not None and head.status == 101
    wsproto.check_upgrade(head, key)
    with pytest.raises(ProtocolError, match="Accept"):
        wsproto.check_upgrade(head, "other-key")
    refused = parse_head(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
    assert refused is not None
    with pytest.raises(ProtocolError, match="http 401"):
        wsproto.check_upgrade(refused, key)
    assert parse_head(b"HTTP/1.1 101 Switching") is None  # not complete yet


# -- SSE ------------------------------------------------------------------------


def chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


def test_dechunker_any_split_and_extensions() -> None:
    body = [b"retry: 2000\n\n", b'id: 7\nevent: message\ndata: {"s":1}\n\n', b"x" * 300]
    wire = chunked(*body).replace(b"d\r\n", b"d;ext=1\r\n", 1)  # a chunk extension on the first size line
    for cut in range(len(wire) + 1):
        for second in (cut, min(len(wire), cut + 3)):
            d = Dechunker()
            out = d.feed(wire[:cut]) + d.feed(wire[cut:second]) + d.feed(wire[second:])
            assert out == b"".join(body) and d.done, (cut, second)
    with pytest.raises(ProtocolError):
        Dechunker().feed(b"zz\r\n")


def test_events_split_mid_line() -> None:
    stream = (
        b"retry: 2000\r\n\r\n"
        b": keep-alive\n\n"
        b'id: 41\nevent: message\ndata: {"s":1}\n\n'
        b"data: first\r\ndata:second\r\n\r\n"
        b"id: 43\rdata: lone-cr\r\r"
        b"event: reset\ndata\n\n"
    )
    expected = [
        (b"41", b"message", b'{"s":1}'),
        (None, None, b"first\nsecond"),
        (b"43", None, b"lone-cr"),
        (None, b"reset", b""),
    ]
    for cut in range(len(stream) + 1):
        for size in (1, 2, 5):
            parser = EventParser()
            events = parser.feed(stream[:cut])
            for i in range(cut, len(stream), size):
                events += parser.feed(stream[i : i + size])
            assert events == expected, (cut, size)


SSE_CLOSE_HEAD = (  # Herald's stream: close-delimited, no Transfer-Encoding, no Content-Length
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n"
)
SSE_CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def test_event_stream_framing_from_the_head() -> None:
    def body(head: bytes) -> Dechunker | None:
        parsed = parse_head(head + b"\r\n")
        assert parsed is not None
        return event_stream_body(parsed)

    assert body(SSE_CLOSE_HEAD[:-2]) is None  # raw bytes up to EOF
    assert isinstance(body(SSE_CHUNKED_HEAD[:-2]), Dechunker)
    ctype = b"HTTP/1.1 200 OK\r\nContent-Type: TEXT/Event-Stream\r\n"
    assert isinstance(body(ctype + b"Transfer-Encoding: identity, Chunked\r\n"), Dechunker)
    assert body(ctype + b"Transfer-Encoding: identity\r\n") is None
    assert body(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n") is None
    with pytest.raises(ProtocolError, match="not an event stream"):
        body(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nTransfer-Encoding: chunked\r\n")
    with pytest.raises(ProtocolError, match="transfer-coding"):
        body(ctype + b"Transfer-Encoding: gzip, chunked\r\n")


def herald_stream(now: float) -> bytes:
    """What Herald's /sse sends in bare mode: retry, welcome, then messages among
    control and presence events (whose data may even look like a test payload)."""
    lookalike = b'{"type":"reset","channel":"room:r0","data":' + payload.make(9, now, 60) + b"}"
    return b"".join(
        [
            b"retry: 2000\n\n",
            sse_event("welcome", b'{"type":"welcome","conn":"n:1","user":"u1","channels":["room:r0"]}'),
            sse_event("message", payload.make(1, now, 100), 11),
            sse_event("join", b'{"type":"join","channel":"room:r0","user":"u7"}'),
            b": keep-alive\n\n",
            sse_event("message", payload.make(2, now, 100), 12),
            sse_event("reset", lookalike),
            sse_event("leave", b'{"type":"leave","channel":"room:r0","user":"u7"}'),
            sse_event("message", payload.make(3, now, 100), 13),
            sse_event("error", payload.make(4, now, 60)),
            sse_event("close", b'{"type":"close","code":1012,"reason":"restart"}'),
            b"retry: 5000\n\n",
        ]
    )


HERALD_CONTROL_EVENTS = 6  # welcome, join, reset, leave, error, close


async def test_close_delimited_sse_any_split() -> None:
    ep = loopback_url("http://127.0.0.1:1/sse", ("http",))
    body = herald_stream(time.time())
    wire = SSE_CLOSE_HEAD + body
    # Every split in two, in pieces of 7, and a byte at a time (which covers any cut).
    splits = [(cut, size) for cut in range(len(wire) + 1) for size in (7, len(wire))]
    for cut, size in [*splits, (0, 1)]:
        hist = Histogram()
        client = SseClient(0, 0, ep, True, hist, False)
        transport = FakeTransport()
        client.connection_made(transport)  # type: ignore[arg-type]
        client.data_received(wire[:cut])
        for i in range(cut, len(wire), size):
            client.data_received(wire[i : i + size])
        assert client.ready.done() and client.ready.exception() is None, (cut, size)
        assert (client.track.last, client.track.received, client.track.gaps, client.track.dups) == (3, 3, 0, 0)
        assert hist.count == 3 and client.other == HERALD_CONTROL_EVENTS, (cut, size)
        assert client.closed_at is None and not transport.closing  # the body runs until EOF
    client.connection_lost(None)  # the server closes: that is the end of the body
    assert client.close_how == "sse end"


async def test_chunked_sse_still_read() -> None:
    ep = loopback_url("http://127.0.0.1:1/sse", ("http",))
    body = herald_stream(time.time())
    wire = SSE_CHUNKED_HEAD + chunked(body[:50], body[50:51], body[51:])
    truncated = SseClient(0, 0, ep, True, Histogram(), False)
    truncated.connection_made(FakeTransport())  # type: ignore[arg-type]
    for i in range(0, len(wire) - 5, 5):  # all but the last chunk
        truncated.data_received(wire[i : min(i + 5, len(wire) - 5)])
    assert truncated.track.received == 3 and truncated.other == HERALD_CONTROL_EVENTS
    truncated.connection_lost(None)
    assert truncated.close_how == "eof"  # the last chunk never came: not a clean end

    ended = SseClient(1, 0, ep, True, Histogram(), False)
    transport = FakeTransport()
    ended.connection_made(transport)  # type: ignore[arg-type]
    ended.data_received(wire)
    assert ended.track.received == 3 and ended.close_how == "sse end" and transport.closing


async def test_sse_only_message_events_are_deliveries() -> None:
    assert is_message(None) and is_message(b"message")
    for name in (b"welcome", b"join", b"leave", b"reset", b"close", b"error", b"ping", b"Message"):
        assert not is_message(name)
    ep = loopback_url("http://127.0.0.1:1/sse", ("http",))
    now = time.time()
    envelope = b'{"type":"message","channel":"room:r0","id":"12","event":"message","data":%s}' % payload.make(
        1, now, 100
    )
    for herald in (True, False):  # Herald's envelope or a peer's raw payloads: the same rule
        client = SseClient(0, 0, ep, herald, Histogram(), False)
        client.connection_made(FakeTransport())  # type: ignore[arg-type]
        client.data_received(
            SSE_CLOSE_HEAD
            + sse_event("message", envelope, 12)  # Herald with envelope=1: counted too
            + sse_event("reset", payload.make(2, now, 60))
            + b"event: ping\ndata: \n\n"  # nchan's keep-alive
            + b"data: "
            + payload.make(2, now, 100)
            + b"\n\n"  # no event name (nchan, aiohttp-sse)
        )
        assert (client.track.received, client.track.last, client.other) == (2, 2, 2), herald


def test_herald_sse_bytes_through_both_layers() -> None:
    events = [sse_event("message", payload.make(s, 1.0, 100), s) for s in range(1, 4)]
    wire = chunked(events[0] + events[1], events[2])
    d, parser = Dechunker(), EventParser()
    got = [e for i in range(0, len(wire), 7) for e in parser.feed(d.feed(wire[i : i + 7]))]
    assert [payload.extract(data) for _, _, data in got] == [(1, 1.0), (2, 1.0), (3, 1.0)]
    assert [e[0] for e in got] == [b"1", b"2", b"3"]


# -- payloads and accounting ----------------------------------------------------


def test_payload_size_and_extraction() -> None:
    now = time.time()
    p = payload.make(12345, now, 100)
    assert len(p) == 100 and p.startswith(b'{"s":12345,')
    s, t = payload.extract(p) or (0, 0.0)
    assert s == 12345 and abs(t - now) < 1e-5
    herald = b'{"type":"message","channel":"room:r3","id":"9","event":"message","data":' + p + b"}"
    assert payload.extract(herald) == (12345, t)
    assert payload.extract(b'{"t": 2.5, "p": "", "s": 7}') == (7, 2.5)  # re-serialised by a server
    assert payload.extract(b'{"type":"welcome","channels":["room:r1"]}') is None


def test_sequence_accounting() -> None:
    track = SeqTrack()
    for s in (1, 2, 3, 3, 6, 5, 7):  # a duplicate, a gap of two, one late arrival
        track.see(s)
    assert (track.last, track.received, track.gaps, track.dups) == (7, 5, 2, 2)
    assert track.lost(published=7) == 2
    assert track.lost(published=10) == 5  # the unreceived tail is lost too

    quiet = SeqTrack()
    before = tally([(track, 7), (quiet, 7)])
    track.see(8)
    after = tally([(track, 10), (quiet, 10)])
    step = after - before
    assert (step.received, step.dups, step.lost) == (1, 0, 2 + 3)
    # Every published message is either received or lost, per connection.
    assert after.received + after.lost == 2 * 10 - 0


def test_histogram_quantiles() -> None:
    h = Histogram()
    for us in range(1, 10_001):  # 1 µs … 10 ms, uniform
        h.record(us / 1e6)
    h.record(-0.001)  # clock skew lands in the lowest bucket
    assert h.count == 10_001
    for q, expect in ((0.5, 0.005), (0.9, 0.009), (0.99, 0.0099)):
        assert h.quantile(q) == pytest.approx(expect, rel=0.012)
    assert h.max == pytest.approx(0.01)
    snap = h.take()
    assert snap.count == 10_001 and h.count == 0 and h.quantile(0.99) == 0.0


def test_only_loopback_targets() -> None:
    ep = loopback_url(expand("ws://localhost:8080/ws?token={token}&room={room}", "r2", "tok", 5), ("ws",))
    assert (ep.address, ep.port, ep.target) == ("127.0.0.1", 8080, "/ws?token=tok&room=r2")
    assert loopback_url("http://[::1]:9/sse", ("http",)).address == "::1"
    for url in ("ws://10.0.0.1/ws", "ws://example.com/ws", "ws://127.0.0.2/ws", "ws://localhost.evil.com/x"):
        with pytest.raises(UnsafeTarget):
            loopback_url(url, ("ws",))
    with pytest.raises(UnsafeTarget):
        loopback_url("wss://127.0.0.1/ws", ("ws",))


# -- the Protocols, with a fake transport -----------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.paused = False
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def pause_reading(self) -> None:
        self.paused = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


async def test_ws_client_handshake_welcome_ping_close() -> None:
    hist = Histogram()
    client = WsClient(0, 0, loopback_url("ws://127.0.0.1:1/ws", ("ws",)), True, hist, False)
    transport = FakeTransport()
    client.connection_made(transport)  # type: ignore[arg-type]
    key = transport.written[0].split(b"Sec-WebSocket-Key: ")[1].split(b"\r\n")[0].decode()
    head = f"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {wsproto.accept_value(key)}\r\n\r\n"
    welcome = ws_frame(b'{"type":"welcome","conn":"n:1","channels":["room:r0"]}')
    message = ws_frame(
        b'{"type":"message","channel":"room:r0","id":"5","event":"message","data":%s}'
        % (payload.make(1, time.time(), 100))
    )
    stream = head.encode() + welcome + message + ws_frame(b"hb", wsproto.PING)
    for i in range(len(stream)):
        client.data_received(stream[i : i + 1])
    assert client.ready.done() and client.ready.exception() is None
    assert client.track.received == 1 and hist.count == 1
    pong = wsproto.FrameParser().feed(transport.written[-1])
    assert pong == [(wsproto.PONG, b"hb")]
    client.data_received(ws_frame(b"\x0f\xa8slow", 0x8))
    assert client.close_how == "ws 4008" and client.close_code == 4008 and transport.closing


async def test_sse_client_refusal_and_stall() -> None:
    ep = loopback_url("http://127.0.0.1:1/sse", ("http",))
    refused = SseClient(0, 0, ep, True, Histogram(), False)
    refused.connection_made(FakeTransport())  # type: ignore[arg-type]
    refused.data_received(b'HTTP/1.1 401 Unauthorized\r\nContent-Length: 20\r\n\r\n{"error":"bad_token"}')
    with pytest.raises(ConnectError, match="http 401"):
        await asyncio.wait_for(refused.ready, 1)

    hist = Histogram()
    stalled = SseClient(1, 0, ep, True, hist, True)
    transport = FakeTransport()
    stalled.connection_made(transport)  # type: ignore[arg-type]
    stalled.data_received(SSE_CHUNKED_HEAD)
    assert not stalled.ready.done() and stalled.open  # a Herald stream is ready at its welcome
    welcome = sse_event("welcome", b'{"type":"welcome","conn":"n:1"}')
    events = b"".join(sse_event("message", payload.make(s, time.time(), 60), s) for s in (1, 2))
    stalled.data_received(chunked(welcome + events)[:-5])
    assert stalled.ready.done() and transport.paused and stalled.paused
    assert 0 < stalled.head_at <= stalled.ready_at
    assert stalled.track.received == 2 and hist.count == 0  # stalled: counted apart, no latency


# -- the bench's idle-sse scenario ------------------------------------------------


def test_idle_sse_scenario_mirrors_idle() -> None:
    assert "idle" in SCENARIO_NAMES and "idle-sse" in SCENARIO_NAMES
    for quick, conns in ((True, 1000), (False, 10_000)):
        by_name = {s.name: s for s in standard(quick)}
        ws, sse = by_name["idle"], by_name["idle-sse"]
        assert (ws.transport, sse.transport) == ("ws", "sse")
        assert ws.conns == sse.conns == conns and ws.rooms == sse.rooms == 10
        assert sse.servers == ws.servers == ("herald", "naive", "nchan")
        assert (sse.idle_seconds, sse.connect_rate) == (ws.idle_seconds, ws.connect_rate) and sse.idle
    scenarios, servers, _ = select(bench_parser().parse_args(["--quick", "--only", "idle-sse"]))
    assert [s.name for s in scenarios] == ["idle-sse"] and servers == {"herald", "naive"}

    cmd = loadtest_command(scenarios[0], HERALD, "/tmp/idle-sse.json", "1")
    assert cmd[:3] == ["taskset", "-c", "1"]
    cfg = config(cmd[cmd.index("ops.loadtest") + 1 :])
    assert (cfg.transport, cfg.url, cfg.conns, cfg.rooms, cfg.idle) == ("sse", HERALD.sse_url, 1000, 10, 3.0)
    assert cfg.jwt_secret and cfg.envelope == "herald" and cfg.server_pids == (101,)  # one user per connection


def test_report_idle_sse_figures_and_ratios() -> None:
    def outcome(scenario: str, server: str, kib: float) -> dict[str, object]:
        idle = {"connections": 1000, "still_open": 1000, "rss_before_mb": 50.0, "kib_per_connection": kib}
        idle["rss_with_mb"] = 50.0 + kib * 1000 / 1024
        return {"scenario": scenario, "server": server, "result": {"idle": idle}}

    outcomes = [
        outcome("idle", "herald", 5.0),
        outcome("idle", "nchan", 10.0),
        outcome("idle-sse", "herald", 12.0),
        outcome("idle-sse", "nchan", 8.0),
        outcome("idle-sse", "naive", 24.0),
    ]
    summary = bench_report.summarize(outcomes, {})
    assert summary["figures"]["idle-sse"]["herald"]["kib_per_conn"] == 12.0
    assert summary["ratios"]["idle"] == {"nchan": {"kib_per_conn": 0.5}}
    assert summary["ratios"]["idle-sse"] == {"nchan": {"kib_per_conn": 1.5}, "naive": {"kib_per_conn": 0.5}}
    text = bench_render.markdown(summary)
    idle_table = text.split("## Idle connections")[1].split("## Ratios")[0]
    assert "| idle-sse | herald " in idle_table and "| idle     | nchan " in idle_table
    assert "| idle-sse | kib_per_conn | Herald ÷ nchan | 1.50" in text


# -- HTTP publishing ----------------------------------------------------------------


def feed_response(wire: bytes, cut: int) -> Exchange:
    exchange = Exchange()
    done = exchange.feed(wire[:cut]) if cut else False
    for i in range(cut, len(wire)):
        assert not done, (cut, i)
        done = exchange.feed(wire[i : i + 1])
    assert done or exchange.eof()
    return exchange


def test_http_responses_any_split() -> None:
    sized = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{"id":"1"}'
    chunks = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nqueu\r\n2\r\ned\r\n0\r\n\r\n"
    closing = b"HTTP/1.1 202 Accepted\r\nConnection: close\r\n\r\nno subscribers"
    for wire, status, body, keep in ((sized, 200, b'{"id":"1"}', True), (chunks, 201, b"queued", True)):
        for cut in range(len(wire)):
            ex = feed_response(wire, cut)
            assert ex.head is not None and (ex.head.status, bytes(ex.body), ex.keep_alive) == (status, body, keep)
    ex = feed_response(closing, 10)
    assert ex.head is not None and ex.head.status == 202 and bytes(ex.body) == b"no subscribers"
    assert not ex.keep_alive  # a close-delimited body: the next request needs a new connection
    assert Exchange().feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    with pytest.raises(ProtocolError, match="after the response"):
        Exchange().feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1")
    request = post_request(loopback_url("http://localhost:81/api/publish", ("http",)), {"X-A": "b"}, b"{}")
    assert request == b"POST /api/publish HTTP/1.1\r\nHost: localhost:81\r\nX-A: b\r\nContent-Length: 2\r\n\r\n{}"


async def test_http_publisher_bodies_single_and_batched() -> None:
    url, key = "http://127.0.0.1:1/api/publish", {"Authorization": "Bearer k"}
    single = HttpPublisher(["r0", "r1"], 60, url, key, herald_body=True)
    last, body = single.body(1, 1)
    doc = json.loads(body)
    assert last == 1 and doc["channel"] == "room:r1" and doc["data"]["s"] == 1
    batched = HttpPublisher(["r0", "r1"], 60, url, key, herald_body=True, batch=100)
    batched.published[0] = 7
    last, body = batched.body(0, 3)
    items = json.loads(body)
    assert last == 10 and [i["data"]["s"] for i in items] == [8, 9, 10]
    assert {i["channel"] for i in items} == {"room:r0"}
    raw = HttpPublisher(["r0"], 60, "http://127.0.0.1:1/pub/{room}", {}, herald_body=False)
    assert raw.endpoints[0].target == "/pub/r0" and payload.extract(raw.body(0, 1)[1]) is not None
    with pytest.raises(ValueError, match="Herald"):
        HttpPublisher(["r0"], 60, url, {}, herald_body=False, batch=10)
    for p in (single, batched, raw):
        await p.close()


async def test_http_publisher_against_a_loopback_server() -> None:
    """Keep-alive, a server that closes after a response, refusals counted as errors.
    The four sends are owed at once, not paced by ``run``: the pacer stops at
    its step's end, and a loaded machine's loop, stalled past it, left some unsent."""
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            size = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            seen.append(await reader.readexactly(size))
            n = len(seen)
            if n == 3:
                writer.write(b"HTTP/1.1 429 Too Many\r\nContent-Length: 0\r\n\r\n")
            elif n == 2:
                writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
                writer.close()
                return
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pub = HttpPublisher(["r0"], 60, f"http://127.0.0.1:{port}/pub/{{room}}", {}, herald_body=False)
    await pub.start()
    try:
        for _ in range(4):
            await pub._emit(0)
        assert await pub.drain(5) == 0
    finally:
        await pub.close()
        server.close()
    assert len(seen) == 4 and pub.requests == 4 and pub.latency.count == 4
    assert pub.published == [3] and dict(pub.errors) == {"http 429": 1}
    assert pub._conns[0].opened == 2  # reopened after the server closed


# -- connect storm --------------------------------------------------------------------


def test_storm_options_are_checked() -> None:
    base = ["--storm", "--conns", "100", "--jwt-secret", "s" * 32]
    cfg = config([*base, "--connect-rate", "5000", "--procs", "2", "--hold", "2"])
    assert cfg.storm and cfg.procs == 2 and cfg.hold == 2.0 and cfg.child is None
    for bad in (
        ["--procs", "0"],
        ["--procs", "17"],
        ["--idle", "3"],
        ["--hold", "-1"],
        ["--procs", "2", "--child", "2"],
    ):
        with pytest.raises(SystemExit):
            config([*base, *bad])
    with pytest.raises(SystemExit):
        config(["--conns", "10", "--procs", "2"])  # --procs splits a storm only
    with pytest.raises(SystemExit):
        config(["--storm", "--conns", "0"])
    with pytest.raises(SystemExit):  # batches are Herald's JSON arrays
        config(["--conns", "0", "--publish-url", "http://127.0.0.1:1/pub/{room}", "--publish-batch", "10"])
    publish_only = config(["--conns", "0", "--publish-url", "http://127.0.0.1:1/api/publish", "--publish-body=herald"])
    assert publish_only.conns == 0 and publish_only.publish_batch == 1


def test_storm_parts_split_the_indices_and_rebuild_the_config() -> None:
    parts = [storm.part_indices(10, 3, j) for j in range(3)]
    assert [list(p) for p in parts] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    url = "http://127.0.0.1:9/sse?token={token}&room={room}"
    cfg = config(
        [
            *("--storm", "--transport", "sse", "--url", url, "--conns", "5000", "--rooms", "10"),
            *("--connect-rate", "5000", "--jwt-secret", "s" * 32, "--procs", "4", "--hold", "1.5"),
            *("--connect-timeout", "7", "--server-pid", str(os.getpid())),
        ]
    )
    child = config(storm.child_argv(cfg, 3, "/tmp/part-3.json"))
    assert child.child == 3 and child.json_path == "/tmp/part-3.json" and child.server_pids == ()
    same = ("transport", "url", "conns", "rooms", "connect_rate", "connect_timeout", "envelope", "hold", "procs")
    assert all(getattr(child, k) == getattr(cfg, k) for k in same) and child.jwt_secret == cfg.jwt_secret


def storm_part(part: int, go: float, timings: list[tuple[float, float, float]], cpu_s: float) -> dict[str, Any]:
    return {
        "part": part,
        "go": go,
        "done": go + 2.0,
        "attempted": len(timings),
        "start": [t[0] for t in timings],
        "head": [t[1] for t in timings],
        "ready": [t[2] for t in timings],
        "late": [0.001] * len(timings),
        "errors": {"timeout": 1} if any(not t[2] for t in timings) else {},
        "cpu_s": cpu_s,
        "closed_during_hold": {},
    }


def test_storm_parts_merge_on_one_clock() -> None:
    # Two processes, interleaved: part 0 starts at 100.0, part 1's last connect is ready at 101.0.
    a = storm_part(0, 100.0, [(100.0, 100.001, 100.002), (100.4, 100.401, 100.404)], cpu_s=1.0)
    b = storm_part(1, 100.0, [(100.2, 100.2005, 100.201), (100.6, 100.9, 101.0), (100.8, 100.9, 0.0)], cpu_s=1.8)
    merged = storm.merge([a, b], requested=5, rate=5.0)
    assert (merged["attempted"], merged["connected"], merged["failed"]) == (5, 4, 1)
    assert merged["errors"] == {"timeout": 1} and merged["procs"] == 2
    assert merged["offered_per_s"] == pytest.approx(4 / 0.8, rel=1e-3)  # 5 starts over 0.8 s
    assert merged["admitted_per_s"] == pytest.approx(4 / 1.0, rel=1e-3)  # first start → last ready
    hs = merged["handshake_ms"]
    assert hs["count"] == 4 and hs["p50"] == pytest.approx(2.0) and hs["max"] == pytest.approx(400.0)
    assert merged["head_ms"]["count"] == 5  # the one that timed out did get its head
    assert merged["generator_cpu_pct"] == [50.0, 90.0] and merged["generator_cpu_max"] == 90.0
    assert merged["generator_busy"]  # ≥ 85 %: it may be the limit
    storm.add_server(merged, {"server": 0.4, "aux": None, "server_close": 0.2})
    assert merged["server"] == {"cpu_s": 0.4, "cpu_pct": 20.0, "us_per_connect": 100_000.0, "us_per_close": 50_000.0}
    assert merged["aux"]["us_per_connect"] is None and merged["aux"]["us_per_close"] is None
    assert storm.quantiles_ms([]) is None
    assert storm.quantiles_ms([0.001 * i for i in range(1, 101)])["p99"] == pytest.approx(99.0)
    lines = loadtest_report.storm_lines(merged)
    assert any("admitted 4/s" in line for line in lines) and any("may be the limit" in line for line in lines)


async def test_storm_against_a_loopback_event_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storm, "CLOSE_SETTLE", 0.1)  # the CPU after the closes: not measured here

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(SSE_CLOSE_HEAD)
        await reader.read()  # until the client closes
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/sub/{{room}}"
    cfg = config(
        [
            *("--storm", "--transport", "sse", "--envelope", "raw", "--url", url, "--conns", "30"),
            *("--connect-rate", "600", "--hold", "0", "--server-pid", str(os.getpid())),
        ]
    )
    try:
        result = await storm.run(cfg)
    finally:
        server.close()
    s = result["storm"]
    assert (s["attempted"], s["connected"], s["failed"]) == (30, 30, 0) and "aborted" not in result
    assert s["offered_per_s"] > 0 and s["handshake_ms"]["count"] == s["head_ms"]["count"] == 30
    assert s["server"]["cpu_s"] is not None and s["aux"]["cpu_s"] is None


async def test_steps_go_on_up_to_measure_up_to() -> None:
    """A failed step stops the stepping, except for the rates whose figures are wanted anyway."""

    class Quiet(Publisher):
        async def _emit(self, room: int) -> None:
            pass

    async def fake_step(rate: float, seconds: float) -> dict[str, Any]:
        ran.append(rate)
        return {"rate": rate, "verdict": "p99" if rate == 100 else "ok", "publish_errors": {}, "notes": []}

    argv = ["--conns", "0", "--publish-url", "http://127.0.0.1:1/pub/{room}", "--rates", "100,200,500,1000"]
    argv += ["--warmup", "0"]
    for up_to, expected in (("0", [100.0]), ("500", [100.0, 200.0, 500.0])):
        ran: list[float] = []
        run = Run(config([*argv, "--measure-up-to", up_to]))
        run._make_publisher = lambda: Quiet(["r0"], 60)  # type: ignore[method-assign]
        run._step = fake_step  # type: ignore[method-assign]
        run.deadline = asyncio.get_running_loop().time() + 100
        with mock.patch.object(loadtest_report, "row", lambda step: str(step["rate"])):
            await run._body()
        assert ran == expected and run.result["stopped"] == "p99 at 100 msg/s"


# -- the bench's issue-20 scenarios -----------------------------------------------------

HERALD = Target(
    server="herald",
    ws_url="ws://127.0.0.1:8080/ws?token={token}&room={room}",
    sse_url="http://127.0.0.1:8080/sse?token={token}&room={room}",
    envelope="herald",
    publish_args=["--publish", "nats://127.0.0.1:4222", "--subject", "herald.room.{room}"],
    server_pids=[101],
    aux_pids=[102],
    jwt_secret="s" * 32,
    http_publish=HttpPublish("http://127.0.0.1:8080/api/publish", "herald", {"Authorization": "Bearer k"}),
)
NCHAN = raw_target("nchan", 8089, "/sub/{room}", "/sub/{room}", [201])


def loadtest_config(scenario_name: str, target: Target, quick: bool = False) -> Any:
    scenario = {s.name: s for s in standard(quick)}[scenario_name]
    cmd = loadtest_command(scenario, target, "/tmp/x.json", "1")
    return scenario, config(cmd[cmd.index("ops.loadtest") + 1 :])


def test_issue20_scenarios_and_their_commands() -> None:
    new = ["publish-api", "publish-api-batch", "fanout-ws-http", "fanout-sse-http"]
    new += ["connect-storm-ws", "connect-storm-sse", "connect-storm-sse-10k"]
    assert set(new) <= set(SCENARIO_NAMES)
    scenario, cfg = loadtest_config("publish-api", HERALD)
    assert cfg.conns == 0 and cfg.rates == (500.0, 2000.0) and cfg.measure_up_to == 2000
    assert cfg.publish_url == "http://127.0.0.1:8080/api/publish" and cfg.publish_body == "herald"
    assert dict(cfg.publish_headers) == {"Authorization": "Bearer k"} and cfg.publish_nats is None
    assert dict(scenario.herald_env) == {"HERALD_LIMITS_API_RATE": "1000000"}
    assert scenario.servers == ("herald", "nchan")
    _, cfg = loadtest_config("publish-api", NCHAN)
    assert cfg.publish_url == "http://127.0.0.1:8089/pub/{room}" and cfg.publish_body == "raw"
    scenario, cfg = loadtest_config("publish-api-batch", HERALD)
    assert cfg.publish_batch == 100 and scenario.servers == ("herald",)
    for name, transport in (("fanout-ws-http", "ws"), ("fanout-sse-http", "sse")):
        scenario, cfg = loadtest_config(name, HERALD)
        assert (cfg.transport, cfg.conns, cfg.rooms, cfg.measure_up_to) == (transport, 1000, 10, 500)
        assert cfg.jwt_secret and cfg.publish_url and 200.0 in cfg.rates and 500.0 in cfg.rates
        assert scenario.herald_env and scenario.servers == ("herald", "nchan", "floor")
    for quick, conns, rate in ((False, 5000, 5000), (True, 1000, 2000)):
        for name in ("connect-storm-ws", "connect-storm-sse"):
            scenario, cfg = loadtest_config(name, HERALD, quick)
            assert cfg.storm and (cfg.conns, cfg.connect_rate, cfg.rooms) == (conns, rate, 10)
            assert cfg.jwt_secret and cfg.hold == 2 and cfg.connect_timeout == 30 and cfg.server_pids == (101,)
            assert scenario.budget() >= conns / rate + 30 + 2
    _, cfg = loadtest_config("connect-storm-sse-10k", NCHAN)
    assert (cfg.transport, cfg.conns, cfg.connect_rate, cfg.envelope) == ("sse", 10_000, 2000, "raw")


def test_issue20_selection_groups() -> None:
    args = bench_parser().parse_args(["--quick", "--peers", "--only", "publish-api,connect-storm-sse", "--rates", "50"])
    args.storm_procs = 2
    scenarios, _, notes = select(args)
    by_name = {s.name: s for s in scenarios}
    assert set(by_name) == {"publish-api", "publish-api-batch", "fanout-ws-http", "connect-storm-sse"} | {
        "connect-storm-sse-10k"
    }
    assert by_name["publish-api"].rates == (500, 2000)  # --rates steps fan-outs, not the publish API's fixed rates
    assert by_name["fanout-ws-http"].rates == (50,) and by_name["connect-storm-sse"].procs == 2
    assert any("publish-api-batch" in n for n in notes)


def test_a_process_cpu_is_split_into_user_space_and_kernel() -> None:
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass  # some CPU of our own to see
    user, kernel = procstat.cpu_times(os.getpid()) or (0.0, 0.0)
    # Read again a moment later: the kernel counts in ticks, and one may pass between the reads.
    assert user > 0 and kernel >= 0 and user + kernel <= (procstat.cpu_seconds(os.getpid()) or 0.0) < user + kernel + 1
    total, kernel = procstat.ProcGroup([os.getpid()]).cpu_and_kernel()
    assert 0 <= kernel <= total and total >= user
    assert procstat.cpu_times(2**22 + 1) is None  # beyond pid_max: gone
    assert procstat.live_cpu_seconds(os.getpid()) >= user
    with pytest.raises(ProcessLookupError):
        procstat.live_cpu_seconds(2**22 + 1)  # a node under measurement that is gone is an error


def test_the_fanout_floor_runs_only_when_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Nchan, "missing", staticmethod(lambda: None))  # as if nginx + nchan were installed
    _, servers, _ = select(bench_parser().parse_args(["--peers", "--only", "fanout-ws-http"]))
    assert servers == {"herald", "naive", "nchan"}  # the fan-out floor is asked for by name
    _, servers, _ = select(bench_parser().parse_args(["--only", "fanout-ws-http", "--servers", "herald,floor"]))
    assert servers == {"herald", "floor"}
    with pytest.raises(SystemExit, match="unknown server"):
        select(bench_parser().parse_args(["--servers", "herald,flor"]))


def test_peers_without_nginx_run_without_nchan_and_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Nchan, "missing", staticmethod(lambda: "nginx not found"))
    _, servers, notes = select(bench_parser().parse_args(["--peers", "--only", "fanout-ws-http"]))
    assert servers == {"herald", "naive"} and "nchan skipped: nginx not found" in notes


def canned_outcomes() -> list[dict[str, Any]]:
    def publish(us: dict[int, float], p99: float, batch: int = 1) -> dict[str, Any]:
        steps = [
            {
                "rate": rate,
                "published_per_s": rate,
                "server": {"us_per_publish": cost, "cpu_pct": 10.0},
                "aux": {"us_per_publish": 30.0},
                "publish": {"requests": rate, "batch": batch, "latency_ms": {"p50": 0.5, "p99": p99, "max": 9.0}},
                "publish_errors": {},
                "generator_cpu_pct": 12.0,
                "verdict": "ok",
            }
            for rate, cost in us.items()
        ]
        return {"config": {"conns": 0}, "steps": steps}

    def fanout(us: float, p99: float) -> dict[str, Any]:
        steps = [
            {
                "rate": rate,
                "seconds": 10.0,
                "delivered": rate * 1000,
                "delivered_per_s": rate * 100,
                "latency_ms": {"p50": 1.0, "p99": p99 * rate / 500, "max": 50.0},
                "server": {"us_per_delivery": us, "kernel_us_per_delivery": us * 0.75, "us_per_publish": us * 100},
                "publish": {"latency_ms": {"p50": 0.5, "p99": 2.0}},
                "verdict": "ok",
            }
            for rate in (200, 500)
        ]
        return {"config": {"conns": 1000}, "steps": steps, "connect": {"requested": 1000}}

    def storm(admitted: float, p99: float, us: float, gen: float, cores: list[float]) -> dict[str, Any]:
        return {
            "config": {"storm": True, "conns": 5000},
            "bench_cores": {"server": [0], "generator": [1]},
            "storm": {
                "requested": 5000,
                "rate_offered_target": 5000,
                "attempted": 5000,
                "connected": 5000,
                "failed": 0,
                "errors": {},
                "offered_per_s": 4990.0,
                "admitted_per_s": admitted,
                "handshake_ms": {"p50": 1.0, "p99": p99, "max": p99 * 2},
                "head_ms": {"p50": 0.9, "p99": p99},
                "server": {"us_per_connect": us, "cpu_pct": 50.0, "us_per_close": us / 4},
                "aux": {"us_per_connect": None},
                "procs": 1,
                "generator_cpu_pct": [gen],
                "generator_cpu_max": gen,
                "generator_busy": gen >= 85,
                "cores_busy_pct": cores,
            },
        }

    return [
        {"scenario": "publish-api", "server": "herald", "result": publish({500: 200.0, 2000: 100.0}, 4.0)},
        {"scenario": "publish-api", "server": "nchan", "result": publish({500: 50.0, 2000: 25.0}, 2.0)},
        {"scenario": "publish-api-batch", "server": "herald", "result": publish({2000: 20.0, 10000: 15.0}, 9.0, 100)},
        {"scenario": "fanout-ws-http", "server": "herald", "result": fanout(12.0, 30.0)},
        {"scenario": "fanout-ws-http", "server": "nchan", "result": fanout(4.0, 10.0)},
        {"scenario": "fanout-ws-http", "server": "floor", "result": fanout(3.0, 10.0)},
        {"scenario": "connect-storm-ws", "server": "herald", "result": storm(1000.0, 400.0, 800.0, 20.0, [99.0, 80.0])},
        {"scenario": "connect-storm-ws", "server": "nchan", "result": storm(4950.0, 2.0, 50.0, 90.0, [60.0, 99.0])},
    ]


def test_report_issue20_figures_and_ratios() -> None:
    summary = bench_report.summarize(canned_outcomes(), {"quick": False})
    fig = summary["figures"]
    assert fig["publish-api"]["herald"]["at"]["2000"]["us_per_publish"] == 100.0
    assert fig["fanout-ws-http"]["herald"]["at"]["500"]["us_per_publish"] == 1200.0
    storm_h, storm_n = fig["connect-storm-ws"]["herald"], fig["connect-storm-ws"]["nchan"]
    assert storm_h["kind"] == "storm" and storm_h["admitted_per_s"] == 1000.0 and storm_h["limit"] is None
    assert storm_n["generator_core_busy_pct"] == 99.0 and "may be the limit" in storm_n["limit"]
    ratios = summary["ratios"]
    assert ratios["publish-api"]["nchan"]["us_per_publish@500"] == 4.0
    assert ratios["publish-api"]["nchan"]["publish_p99@2000"] == 2.0
    assert ratios["publish-api"]["nchan"]["us_per_publish_with_fanout@500"] == 3.0
    http = ratios["fanout-ws-http"]["nchan"]
    assert http["us_per_delivery@200"] == http["us_per_delivery@500"] == 3.0 and http["p99@500"] == 3.0
    assert ratios["fanout-ws-http"]["floor"]["us_per_delivery@500"] == 4.0  # Herald above the fan-out floor
    assert ratios["connect-storm-ws"]["nchan"] == {
        "admitted_per_s": round(1000 / 4950, 3),
        "handshake_p99": 200.0,
        "us_per_connect": 16.0,
        "us_per_close": 16.0,
    }
    text = bench_render.markdown(summary)
    publish_table = text.split("## HTTP publish API")[1].split("## Connect storms")[0]
    assert "| herald | 200.0 " in publish_table and "| 15.0 " in publish_table  # batch @10000
    nchan_row = next(line for line in publish_table.splitlines() if line.startswith("| nchan"))
    assert nchan_row.count("—") == 2 and "| 400.0 " in nchan_row  # no batch; fan-out µs per publish
    assert "1,000 receivers over 10 rooms, 100 deliveries per message" in publish_table
    storms = text.split("## Connect storms")[1].split("## Ratios")[0]
    assert "| connect-storm-ws | herald | 5,000 @ 5,000/s | 4,990 " in storms
    assert "| 800 " in storms and "| 200 " in storms and "µs/close" in storms  # per connect, per close
    throughput = text.split("## Throughput and cost")[1].split("## HTTP publish API")[0]
    assert "| fanout-ws-http | herald | 12.0 " in throughput and "publish-api" not in throughput.split("|---")[1]
    assert "| fanout-ws-http | floor  | 3.0 " in throughput
    assert "| fanout-ws-http | herald | 12.0          | 12.0          | 9.0  " in throughput  # of it, the kernel's
    assert fig["fanout-ws-http"]["herald"]["at"]["500"]["kernel_us_per_delivery"] == 9.0
    assert re.search(r"\| connect-storm-ws \| us_per_connect +\| Herald ÷ nchan \| 16\.00", text)
