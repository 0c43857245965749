"""Client side of RFC 6455, sans I/O: the upgrade request, its check, a
server-frame parser that copes with any split of the byte stream, and masked
client frames (pong, close).

Only what a receiving load client needs: no extensions (Herald never
compresses unless configured to; a 101 naming an extension is refused).
"""

from __future__ import annotations

import base64
import hashlib
import os

from .http1 import ProtocolError, ResponseHead, request

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
NO_STATUS = 1005  # close frame without a code
MAX_MESSAGE = 16 * 1024 * 1024  # bounds memory if a server misbehaves

Frame = tuple[int, bytes]  # (opcode, payload); continuation frames arrive reassembled


def upgrade_request(host: str, target: str, extra: dict[str, str] | None = None) -> tuple[bytes, str]:
    """The upgrade request and the random Sec-WebSocket-Key it carries."""
    key = base64.b64encode(os.urandom(16)).decode()
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key,
        "Sec-WebSocket-Version": "13",
        **(extra or {}),
    }
    return request("GET", host, target, headers), key


def accept_value(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def check_upgrade(head: ResponseHead, key: str) -> None:
    """Raise ProtocolError unless ``head`` is a valid 101 for ``key``."""
    if head.status != 101:
        raise ProtocolError(f"http {head.status}")
    if head.headers.get("upgrade", "").lower() != "websocket":
        raise ProtocolError("101 without Upgrade: websocket")
    if head.headers.get("sec-websocket-accept") != accept_value(key):
        raise ProtocolError("wrong Sec-WebSocket-Accept")
    if head.headers.get("sec-websocket-extensions"):
        raise ProtocolError("server negotiated an extension we did not offer")


def _unmask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def client_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A final, masked frame (clients must mask everything they send)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    return head + mask + (_unmask(payload, mask) if n else b"")


def close_frame(code: int = 1000) -> bytes:
    return client_frame(CLOSE, code.to_bytes(2, "big"))


def close_code(payload: bytes) -> int:
    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else NO_STATUS


class FrameParser:
    """Incremental server-frame parser: feed it whatever ``data_received`` got."""

    __slots__ = ("_buf", "_frag", "_frag_op")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._frag: list[bytes] = []
        self._frag_op = 0

    def feed(self, data: bytes) -> list[Frame]:
        # Nothing buffered (the usual case): parse straight from ``data``, no copy.
        buf: bytes | bytearray = data if not self._buf else self._buf + data
        frames: list[Frame] = []
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b0 = buf[pos]
            length = buf[pos + 1]
            masked = length >= 0x80
            if masked:  # servers must not mask, but be lenient
                length, head = self._masked_length(buf, pos)
                if head == 0:
                    break
            elif length < 126:
                head = 2
            else:  # 16- or 64-bit length follows
                head = 4 if length == 126 else 10
                if n - pos < head:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + head], "big")
            if length > MAX_MESSAGE:
                raise ProtocolError(f"frame of {length} bytes")
            end = pos + head + length
            if end > n:
                break
            payload = bytes(buf[pos + head : end])
            if masked:
                payload = _unmask(payload, bytes(buf[pos + head - 4 : pos + head]))
            pos = end
            if b0 == 0x81 and not self._frag:  # final text frame: nearly every frame
                frames.append((TEXT, payload))
                continue
            opcode = b0 & 0x0F
            # Control frames may sit between the fragments of a message.
            if opcode >= 0x8 or (b0 & 0x80 and opcode != CONT and not self._frag):
                frames.append((opcode, payload))
            else:
                self._fragment(opcode, payload, bool(b0 & 0x80), frames)
        self._buf = bytearray(buf[pos:]) if pos < n else bytearray()
        return frames

    @staticmethod
    def _masked_length(buf: bytes | bytearray, pos: int) -> tuple[int, int]:
        """(payload length, header size with the mask) of a masked frame; head 0 if incomplete."""
        n = len(buf)
        length = buf[pos + 1] & 0x7F
        head = 6
        if length >= 126:
            size = 2 if length == 126 else 8
            if n - pos < 2 + size:
                return 0, 0
            length = int.from_bytes(buf[pos + 2 : pos + 2 + size], "big")
            head = 2 + size + 4
        return length, head

    def _fragment(self, opcode: int, payload: bytes, fin: bool, frames: list[Frame]) -> None:
        if opcode != CONT:
            if self._frag:
                raise ProtocolError("new data frame inside a fragmented message")
            self._frag_op = opcode
        elif not self._frag:
            raise ProtocolError("continuation frame without a start")
        self._frag.append(payload)
        if sum(len(p) for p in self._frag) > MAX_MESSAGE:
            raise ProtocolError("fragmented message too large")
        if fin:
            frames.append((self._frag_op, b"".join(self._frag)))
            self._frag = []
