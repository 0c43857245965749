"""Wire encodings (gateway/frames.py): WebSocket frames checked against aiohttp's own
reader and writer, the message JSON, and SSE events (no injection through payloads)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import orjson
import pytest
from aiohttp import WSMsgType
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
from aiohttp._websocket.writer import WebSocketWriter

from broker import Delivery
from broker.channels import parse_channel
from gateway.frames import SSE, WS, dumps_exact, json_data, loads_exact, message_json, sse_event, ws_frame

SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70000]


class _Protocol:
    """Just enough of aiohttp's BaseProtocol for the reader's queue and the writer."""

    _reading_paused = False
    _paused = False

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        self._reading_paused = False


class _Transport:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(bytes(data))

    def writelines(self, data: list[bytes]) -> None:
        self.chunks.extend(bytes(d) for d in data)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


def _payload(n: int) -> bytes:
    return (b"0123456789abcdefghijklmnopqrstuvwxyz" * (n // 36 + 1))[:n]


async def _aiohttp_read(data: bytes, count: int) -> list[Any]:
    """Feed ``data`` to aiohttp's client-side WebSocket reader; return ``count`` messages."""
    queue = WebSocketDataQueue(_Protocol(), 2**22, loop=asyncio.get_running_loop())  # type: ignore[arg-type]
    reader = WebSocketReader(queue, 2**22, compress=False, decode_text=True)
    reader.feed_data(data)
    return [await asyncio.wait_for(queue.read(), 1) for _ in range(count)]


async def _aiohttp_write(payload: bytes, opcode: int) -> bytes:
    transport = _Transport()
    writer = WebSocketWriter(_Protocol(), transport, use_mask=False)  # type: ignore[arg-type]
    await writer.send_frame(payload, opcode)
    return b"".join(transport.chunks)


def _parse_header(frame: bytes) -> tuple[int, bool, int, int]:
    """(opcode, fin, payload length, header length) per RFC 6455 §5.2; asserts the server rules."""
    b0, b1 = frame[0], frame[1]
    assert b0 & 0x70 == 0, "RSV bits must be 0 (no extension negotiated)"
    assert b1 & 0x80 == 0, "server frames must not be masked"
    n = b1 & 0x7F
    if n < 126:
        return b0 & 0x0F, bool(b0 & 0x80), n, 2
    if n == 126:
        length = int.from_bytes(frame[2:4], "big")
        assert length >= 126, "length must use the minimal encoding"
        return b0 & 0x0F, bool(b0 & 0x80), length, 4
    length = int.from_bytes(frame[2:10], "big")
    assert length >= 65536 and length < 2**63, "length must use the minimal encoding"
    return b0 & 0x0F, bool(b0 & 0x80), length, 10


@pytest.mark.parametrize("size", SIZES)
async def test_ws_frame_parses_with_aiohttp_reader(size: int) -> None:
    payload = _payload(size)
    frame = ws_frame(payload)
    [msg] = await _aiohttp_read(frame, 1)
    assert msg.type is WSMsgType.TEXT
    assert msg.data == payload.decode()


@pytest.mark.parametrize("size", SIZES)
async def test_ws_frame_matches_aiohttp_writer(size: int) -> None:
    payload = _payload(size)
    assert ws_frame(payload) == await _aiohttp_write(payload, 0x1)
    assert ws_frame(payload, 0x2) == await _aiohttp_write(payload, 0x2)


@pytest.mark.parametrize("size", SIZES)
def test_ws_frame_header_by_hand(size: int) -> None:
    payload = _payload(size)
    frame = ws_frame(payload)
    opcode, fin, length, header = _parse_header(frame)
    assert (opcode, fin, length) == (0x1, True, size)
    assert header == (2 if size < 126 else 4 if size < 65536 else 10)
    assert frame[header:] == payload
    assert len(frame) == header + size


async def test_binary_frame_and_concatenated_frames_parse_in_order() -> None:
    texts = [_payload(n) for n in (0, 3, 200, 70000, 5)]
    data = b"".join(ws_frame(t) for t in texts) + ws_frame(b"\x00\xff", 0x2)
    msgs = await _aiohttp_read(data, len(texts) + 1)
    assert [m.data for m in msgs[:-1]] == [t.decode() for t in texts]
    assert msgs[-1].type is WSMsgType.BINARY
    assert msgs[-1].data == b"\x00\xff"


# --- message JSON --------------------------------------------------------------------------------------------


def _delivery(payload: bytes, channel: str = "room:lobby", seq: int = 1042, event: str = "message") -> Delivery:
    return Delivery(parse_channel(channel), seq, 1000, 1.0, event, payload)


def test_message_json_shape() -> None:
    out = orjson.loads(message_json(_delivery(b'{"text":"hi"}')))
    assert out == {"type": "message", "channel": "room:lobby", "id": "1042", "event": "message", "data": {"text": "hi"}}


def test_message_json_embeds_payload_verbatim() -> None:
    payload = b'{ "a" : [1, 2.50, "\\u00e9"],\n  "b": null }'
    raw = message_json(_delivery(payload))
    assert b'"data":' + payload + b"}" in raw
    assert orjson.loads(raw)["data"] == {"a": [1, 2.5, "\u00e9"], "b": None}


@pytest.mark.parametrize(
    ("payload", "data"),
    [
        (b"42", 42),
        (b'"just a string"', "just a string"),
        (b"null", None),
        (b"[1,2]", [1, 2]),
        (b"true", True),
        (b"hello world", "hello world"),
        (b"", ""),
        (b"{not json", "{not json"),
        (b'1,"type":"evil"', '1,"type":"evil"'),  # not JSON: must not splice extra keys in
        (b'{"a":1}, "type":"evil"', '{"a":1}, "type":"evil"'),
        (b"\xff\xfeab", "\ufffd\ufffdab"),
        (b"caf\xc3\xa9", "caf\u00e9"),
        ("caf\u00e9 \u2603".encode(), "caf\u00e9 \u2603"),
        # Lone surrogate escapes: JSON's grammar, no text: U+FFFD, the value kept (pairs, \\ud800 are text).
        (b'"\\ud800"', "\ufffd"),
        (b'{"a":"x\\uDBFFy\\udc00"}', {"a": "x\ufffdy\ufffd"}),
        (b'["\\ud83d\\ude00","\\ude00\\ud83d"]', ["\U0001f600", "\ufffd\ufffd"]),
        (b'["\\\\ud800","\\\\\\ud800"]', ["\\ud800", "\\\ufffd"]),
        (b'{"a":"\\ud800"', '{"a":"\\ud800"'),  # still not JSON: the text, as a string
    ],
)
def test_message_json_data(payload: bytes, data: Any) -> None:
    raw = message_json(_delivery(payload))
    out = orjson.loads(raw)  # always valid JSON (orjson also rejects invalid UTF-8)
    assert out["data"] == data
    assert out["type"] == "message"
    assert set(out) == {"type", "channel", "id", "event", "data"}


def test_loads_exact_reads_a_lone_surrogate_escape_as_u_fffd() -> None:
    """What a browser's JSON.stringify writes for a string cut inside an emoji: a client's command or a
    publish body with one is read, its lone surrogates as U+FFFD (orjson refuses them)."""
    for raw in (b'{"t":"a\\ud83d","n":12345678901234567890123}', '{"t":"a\\ud83d","n":12345678901234567890123}'):
        assert loads_exact(raw) == {"t": "a\ufffd", "n": 12345678901234567890123}
    with pytest.raises(orjson.JSONDecodeError):
        loads_exact(b'{"t":"\\ud800"')


def test_json_data_passthrough_is_identity() -> None:
    payload = b'{"x": 1}'
    assert json_data(payload) is payload


def test_message_json_omits_id_for_ephemeral() -> None:
    out = orjson.loads(message_json(_delivery(b"1", seq=0)))
    assert "id" not in out
    assert out == {"type": "message", "channel": "room:lobby", "event": "message", "data": 1}


@pytest.mark.parametrize(
    ("channel", "client"),
    [("user:alice", "user"), ("user:a:b", "user"), ("room:user", "room:user"), ("broadcast", "broadcast")],
)
def test_message_json_channel_names(channel: str, client: str) -> None:
    assert orjson.loads(message_json(_delivery(b"{}", channel=channel)))["channel"] == client


def test_message_json_event() -> None:
    assert orjson.loads(message_json(_delivery(b"{}", event="chat.new")))["event"] == "chat.new"


def test_ws_codec() -> None:
    d = _delivery(b'{"k":"v"}')
    frame = WS.message(d)
    _, _, _, header = _parse_header(frame)
    assert frame[header:] == message_json(d)
    ctl = WS.control({"type": "ack", "ref": "7"})
    _, _, _, header = _parse_header(ctl)
    assert orjson.loads(ctl[header:]) == {"type": "ack", "ref": "7"}


# --- SSE -----------------------------------------------------------------------------------------------------


def _parse_sse(stream: bytes) -> list[dict[str, Any]]:
    """Parse an event stream per the WHATWG spec (line ends CRLF, LF or CR)."""
    text = stream.decode()
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {"data": []}
    for line in lines:
        if line == "":
            if current["data"] or len(current) > 1:
                current["data"] = "\n".join(current["data"])
                events.append(current)
            current = {"data": []}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            current["data"].append(value)
        else:
            current[name] = value
    return events


def test_sse_event_shape() -> None:
    assert sse_event("chat", b'{"a":1}', 17) == b'id: 17\nevent: chat\ndata: {"a":1}\n\n'
    assert sse_event("chat", b"x") == b"event: chat\ndata: x\n\n"  # no id for seq 0
    assert sse_event("message", b"") == b"event: message\ndata: \n\n"


@pytest.mark.parametrize("sep", [b"\n", b"\r\n", b"\r"])
def test_sse_event_splits_every_line_ending(sep: bytes) -> None:
    raw = sse_event("message", b"one" + sep + b"two" + sep + b"three", 5)
    assert raw == b"id: 5\nevent: message\ndata: one\ndata: two\ndata: three\n\n"


def test_sse_event_mixed_line_endings() -> None:
    raw = sse_event("m", b"a\r\nb\rc\nd\n\re")
    assert raw == b"event: m\ndata: a\ndata: b\ndata: c\ndata: d\ndata: \ndata: e\n\n"


@pytest.mark.parametrize(
    "payload",
    [
        b"\n\nevent: evil\ndata: x",
        b"\r\n\r\nevent: evil\r\ndata: x",
        b"\r\revent: evil\rdata: x",
        b"ok\n\nid: 999999\nevent: evil\nretry: 1\n\n:comment\ndata: x\n",
    ],
)
def test_sse_no_injection_through_payload(payload: bytes) -> None:
    for raw in (sse_event("message", payload, 3), SSE.message(_delivery(payload, seq=3))):
        lines = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        assert not any(line.startswith(b"event: evil") for line in lines)
        assert not any(line.startswith((b"id: 999999", b"retry:", b":")) for line in lines)
        assert raw.endswith(b"\n\n") and b"\n\n" not in raw[:-2]
        events = _parse_sse(raw)
        assert len(events) == 1
        assert events[0]["event"] == "message"
        assert events[0]["id"] == "3"
        normalised = payload.replace(b"\r\n", b"\n").replace(b"\r", b"\n").decode()
        assert events[0]["data"] == normalised


def test_sse_codec_message() -> None:
    d = _delivery(b'{"x":1}', channel="user:alice", seq=9, event="note")
    assert SSE.message(d) == b'id: 9\nevent: note\ndata: {"x":1}\n\n'
    assert SSE.message(_delivery(b"x", seq=0)) == b"event: message\ndata: x\n\n"


def test_sse_codec_replaces_invalid_utf8() -> None:
    raw = SSE.message(_delivery(b"a\xffb"))
    raw.decode("utf-8")  # strict: the stream stays valid UTF-8
    assert _parse_sse(raw)[0]["data"] == "a\ufffdb"


def test_sse_codec_control() -> None:
    raw = SSE.control({"type": "reset", "reason": "a\nb"})
    events = _parse_sse(raw)
    assert events == [{"event": "reset", "data": '{"type":"reset","reason":"a\\nb"}'}]


@pytest.mark.parametrize(
    "raw", [b'{"a":[12345678901234567890123]}', '{"a":[-98765432109876543210]}', b"[1234567890123456789, 1]"]
)
def test_numbers_past_64_bits_are_read_exactly(raw: bytes | str) -> None:
    assert loads_exact(raw) == json.loads(raw)
    assert dumps_exact(loads_exact(raw)) == json.dumps(json.loads(raw), separators=(",", ":")).encode()
