"""The sans-I/O WebSocket pieces (gateway/transports/wsproto.py): bytes in,
events out, with no socket at all."""

from __future__ import annotations

import pytest

from gateway.disconnect import CLIENT_CLOSED, GOING_AWAY, NOT_UTF8, PROTOCOL_ERROR, TOO_BIG
from gateway.transports.wsproto import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    accept_key,
    close_frame,
)


def client_frame(payload: bytes, opcode: int = OP_TEXT, fin: bool = True, mask: bytes | None = None) -> bytes:
    """A frame as a browser sends it: masked."""
    mask = mask if mask is not None else b"\x37\xfa\x21\x3d"  # fixed: test ids must not vary between runs
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def feed_in_pieces(data: bytes, size: int, max_frame: int = 65536) -> tuple[list[tuple[int, object]], FrameParser]:
    parser = FrameParser(max_frame)
    events = []
    for i in range(0, len(data), size):
        events += parser.feed(data[i : i + size])
    return events, parser


def test_the_rfc_handshake_example() -> None:
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    assert accept_key("GET", headers) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert accept_key("POST", headers) is None
    assert accept_key("GET", {**headers, "Sec-WebSocket-Key": "short"}) is None
    assert accept_key("GET", {**headers, "Sec-WebSocket-Version": "8"}) is None


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 100_000])
def test_events_do_not_depend_on_how_the_bytes_are_split(size: int) -> None:
    long_text = "é" * 20_000  # a 16-bit length
    data = (
        client_frame(b'{"type":"ping"}')
        + client_frame(b"\x00\x01", OP_BINARY)
        + client_frame(b"are you there", OP_PING)
        + client_frame(b"", OP_PONG)
        + client_frame(long_text.encode())
        + client_frame(b"frag", OP_TEXT, fin=False)
        + client_frame(b"x", OP_PING)  # a control frame between fragments
        + client_frame(b"mented", OP_CONTINUATION)
        + client_frame((1000).to_bytes(2, "big") + b"bye", OP_CLOSE)
        + client_frame(b"after the close")
    )
    events, parser = feed_in_pieces(data, size)
    assert events == [
        (OP_TEXT, '{"type":"ping"}'),
        (OP_BINARY, b"\x00\x01"),
        (OP_PING, b"are you there"),
        (OP_TEXT, long_text),
        (OP_PING, b"x"),
        (OP_TEXT, "fragmented"),
        (OP_CLOSE, CLIENT_CLOSED),
    ]
    assert parser.ended and parser.idle and parser.feed(client_frame(b"more")) == []


def test_a_parser_holds_state_only_while_a_frame_or_message_is_unfinished() -> None:
    parser = FrameParser(1024)
    frame = client_frame(b"hello")
    assert parser.feed(frame[:3]) == [] and not parser.idle
    assert parser.feed(frame[3:]) == [(OP_TEXT, "hello")] and parser.idle
    assert parser.feed(client_frame(b"a", fin=False)) == [] and not parser.idle
    assert parser.feed(client_frame(b"b", OP_CONTINUATION)) == [(OP_TEXT, "ab")] and parser.idle


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (client_frame(b"x" * 2000), TOO_BIG),
        (client_frame(b"x" * 600, fin=False) + client_frame(b"x" * 600, OP_CONTINUATION), TOO_BIG),
        (bytes([0x81, 0x02]) + b"hi", PROTOCOL_ERROR),  # not masked
        (bytes([0xC1]) + client_frame(b"hi")[1:], PROTOCOL_ERROR),  # a reserved bit
        (client_frame(b"hi", 0x3), PROTOCOL_ERROR),  # an unknown data opcode
        (client_frame(b"hi", 0xB), PROTOCOL_ERROR),  # an unknown control opcode
        (client_frame(b"hi", OP_PING, fin=False), PROTOCOL_ERROR),  # a fragmented control frame
        (client_frame(b"x" * 126, OP_PING), PROTOCOL_ERROR),  # a control frame over 125 bytes
        (client_frame(b"more", OP_CONTINUATION), PROTOCOL_ERROR),  # nothing to continue
        (client_frame(b"a", fin=False) + client_frame(b"b"), PROTOCOL_ERROR),  # a new message inside one
        (client_frame(b"\xff\xfe"), NOT_UTF8),
        (client_frame((1001).to_bytes(2, "big"), OP_CLOSE), GOING_AWAY),
        (client_frame(b"", OP_CLOSE), CLIENT_CLOSED),
    ],
)
def test_violations_and_closes_end_the_events(data: bytes, reason: object) -> None:
    events, parser = feed_in_pieces(data + client_frame(b"ignored"), 5, max_frame=1024)
    assert events == [(OP_CLOSE, reason)]
    assert parser.ended


def test_close_frame_carries_the_code_and_a_reason_cut_to_123_bytes() -> None:
    frame = close_frame(TOO_BIG.with_message("x" * 300))
    assert frame[0] == 0x88 and frame[1] == 125
    assert int.from_bytes(frame[2:4], "big") == 1009 and frame[4:] == b"x" * 123


def test_a_64_bit_length_is_read() -> None:
    payload = b"y" * 70_000
    events, _ = feed_in_pieces(client_frame(payload, OP_BINARY), 4096, max_frame=100_000)
    assert events == [(OP_BINARY, payload)]
