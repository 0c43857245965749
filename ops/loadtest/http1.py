"""The little HTTP/1.1 both transports need: a request head out, a response
head in. Written by hand so a connection is one Protocol with no client
library in the receive path."""

from __future__ import annotations

from dataclasses import dataclass

MAX_HEAD = 64 * 1024  # a response head larger than this is refused, not buffered forever


class ProtocolError(Exception):
    """The peer said something we cannot parse; the message says what."""


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    reason: str
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    size: int  # bytes of the head, including the blank line


def request(method: str, host: str, target: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_head(buf: bytes | bytearray) -> ResponseHead | None:
    """The response head at the start of ``buf``, or None if it is not complete yet."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise ProtocolError("response head too large")
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"bad status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"bad header line {line[:80]!r}")
        key = name.strip().lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return ResponseHead(int(parts[1]), parts[2] if len(parts) > 2 else "", headers, end + 4)
