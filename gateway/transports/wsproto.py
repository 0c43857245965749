"""The WebSocket protocol without I/O (RFC 6455, server side): the handshake
answer, a parser that turns the client's bytes into events, and the frames
the server sends. ``websocket.py`` puts a socket around it.

Client frames are few and small (commands), so the parser is plain Python;
frames to the client are prebuilt bytes (``frames.ws_frame``).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping

from ..disconnect import CLIENT_CLOSED, GOING_AWAY, NOT_UTF8, PROTOCOL_ERROR, TOO_BIG, Disconnect
from ..frames import ws_frame

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

PING = ws_frame(b"", OP_PING)
VERSION = "13"  # the only one (RFC 6455 4.4: a client asking another is told this one, 426)
# Close codes a client may send (RFC 6455 7.4, and IANA's 1012-1014); others are a protocol error.
_CLOSE_CODES = frozenset((*range(1000, 1004), *range(1007, 1015), *range(3000, 5000)))

# What the parser makes of the client's bytes, in order:
#   (OP_TEXT, str)          a whole text message (valid UTF-8)
#   (OP_BINARY, bytes)      a whole binary message
#   (OP_PING, bytes)        a ping (the caller decides whether to answer)
#   (OP_CLOSE, Disconnect)  the client's close frame, or a protocol violation:
#                           the last event; nothing after it is read.
# Pongs make no event: any bytes at all prove the peer alive.
Event = tuple[int, object]


def accept_key(method: str, headers: Mapping[str, str]) -> str | None:
    """``Sec-WebSocket-Accept`` for a valid upgrade request; None if it is not
    one (a version other than 13 included: see ``VERSION``)."""
    if method != "GET" or headers.get("Upgrade", "").strip().lower() != "websocket":
        return None
    connection = {token.strip().lower() for token in headers.get("Connection", "").split(",")}
    if "upgrade" not in connection or headers.get("Sec-WebSocket-Version") != VERSION:
        return None
    key = headers.get("Sec-WebSocket-Key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except ValueError:
        return None
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def switching_protocols(accept: str) -> bytes:
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: %s\r\n\r\n" % accept.encode()
    )


def close_frame(reason: Disconnect) -> bytes:
    return ws_frame(reason.code.to_bytes(2, "big") + reason.message.encode()[:123], OP_CLOSE)


def _unmask(mask: bytes | bytearray, data: bytes | bytearray) -> bytes:
    n = len(data)
    if not n:
        return b""
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(n, "little")


class FrameParser:
    """Client bytes in, events out. Holds only what is unfinished — part of a
    frame, or the fragments of a message — so a link can drop its parser
    whenever it is ``idle`` (an idle connection then carries none)."""

    __slots__ = ("_buf", "_fragments", "_fragments_op", "ended", "max_frame")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame  # bytes of one message, fragments together
        self._buf: bytearray | None = None  # bytes of a frame not yet whole
        self._fragments: bytearray | None = None  # a fragmented message being assembled
        self._fragments_op = 0
        self.ended = False  # a close or a violation was reported: nothing more is read

    @property
    def idle(self) -> bool:
        return self._buf is None and self._fragments is None

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        if self.ended:
            return events
        pending = self._buf
        if pending is not None:  # a frame arriving in pieces: kept growing in place, not recopied
            pending += data
            buf: bytes | bytearray = pending
        else:
            buf = data
        pos, end = 0, len(buf)
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            opcode, size, head = b0 & 0x0F, b1 & 0x7F, pos + 2
            minimum = 0
            if size == 126:
                if end - head < 2:
                    break
                size, head, minimum = int.from_bytes(buf[head : head + 2], "big"), head + 2, 126
            elif size == 127:
                if end - head < 8:
                    break
                size, head, minimum = int.from_bytes(buf[head : head + 8], "big"), head + 8, 65536
            # RFC 6455 5.2: the shortest length encoding, and a 64-bit one below 2**63.
            violation = PROTOCOL_ERROR if size < minimum or size >> 63 else self._check(b0, b1, opcode, size)
            if violation is not None:
                return self._end(events, violation)
            stop = head + 4 + size
            if end < stop:
                break
            payload = _unmask(buf[head : head + 4], buf[head + 4 : stop])
            pos = stop
            self._frame(events, b0 & 0x80, opcode, payload)
            if self.ended:
                return events
        if pos == end:
            self._buf = None
        elif pending is not None:
            del pending[:pos]
        else:
            self._buf = bytearray(buf[pos:])
        return events

    def _check(self, b0: int, b1: int, opcode: int, size: int) -> Disconnect | None:
        """What is wrong with a frame's head, if anything."""
        if b0 & 0x70 or not b1 & 0x80:  # reserved bits (no extension agreed) or an unmasked client frame
            return PROTOCOL_ERROR
        if opcode >= OP_CLOSE:
            if not b0 & 0x80 or size > 125 or opcode > OP_PONG:
                return PROTOCOL_ERROR
        elif opcode > OP_BINARY:
            return PROTOCOL_ERROR
        elif size + (len(self._fragments) if opcode == OP_CONTINUATION and self._fragments else 0) > self.max_frame:
            return TOO_BIG
        return None

    def _frame(self, events: list[Event], fin: int, opcode: int, payload: bytes) -> None:
        if opcode in (OP_TEXT, OP_BINARY):
            if self._fragments is not None:  # a new message inside a fragmented one
                self._end(events, PROTOCOL_ERROR)
            elif fin:
                self._message(events, opcode, payload)
            else:
                self._fragments, self._fragments_op = bytearray(payload), opcode
        elif opcode == OP_CONTINUATION:
            fragments = self._fragments
            if fragments is None:
                self._end(events, PROTOCOL_ERROR)
                return
            fragments += payload
            if fin:
                self._fragments = None
                self._message(events, self._fragments_op, bytes(fragments))
        elif opcode == OP_PING:
            events.append((OP_PING, payload))
        elif opcode == OP_CLOSE:
            self._end(events, _closed_by(payload))

    def _message(self, events: list[Event], opcode: int, payload: bytes) -> None:
        if opcode == OP_BINARY:
            events.append((OP_BINARY, payload))
            return
        try:
            events.append((OP_TEXT, payload.decode()))
        except UnicodeDecodeError:
            self._end(events, NOT_UTF8)

    def _end(self, events: list[Event], reason: Disconnect) -> list[Event]:
        self.ended = True
        self._buf = self._fragments = None
        events.append((OP_CLOSE, reason))
        return events


def _closed_by(payload: bytes) -> Disconnect:
    """What a client's close frame ends the connection with: its close, or the
    protocol error its body is (RFC 6455 5.5.1: none, or a valid code and a
    UTF-8 reason)."""
    if not payload:
        return CLIENT_CLOSED
    code = int.from_bytes(payload[:2], "big")
    if len(payload) < 2 or code not in _CLOSE_CODES:
        return PROTOCOL_ERROR
    try:
        payload[2:].decode()
    except UnicodeDecodeError:
        return NOT_UTF8
    return GOING_AWAY if code == 1001 else CLIENT_CLOSED
