"""Server-Sent Events, sans I/O: find how the body is framed, undo
``Transfer-Encoding: chunked`` when it is used, and split the body into events,
whatever the split of the byte stream (chunk and line boundaries may fall
anywhere in a read).

Both HTTP/1.1 framings are read: a chunked body (aiohttp-sse's), and a
close-delimited one (``Connection: close``, neither ``Transfer-Encoding`` nor
``Content-Length``): the body is every byte after the head until the server
closes the connection, so it needs no decoding at all.
"""

from __future__ import annotations

from .http1 import ProtocolError, ResponseHead

MAX_PENDING = 16 * 1024 * 1024  # an event or chunk line longer than this is an error

# The event name test messages arrive under: Herald's default event for a message published
# without one, and what EventSource calls an event that has no ``event:`` line (nchan, aiohttp-sse).
# Every other name is a control or presence event (welcome, join, leave, reset, close, error, ping…):
# never a delivery, whatever its data holds.
MESSAGE_EVENT = b"message"

# (id, event name, data): id and event are None when the event had no such line.
Event = tuple[bytes | None, bytes | None, bytes]


_SIZE, _DATA, _TRAILER = range(3)  # reading a size line, inside chunk data (+CRLF), trailers


class Dechunker:
    """Incremental chunked-body decoder: ``feed`` returns the body bytes so far."""

    __slots__ = ("_buf", "_left", "_state", "done")

    def __init__(self) -> None:
        self._buf = b""
        self._state = _SIZE
        self._left = 0  # bytes of the current chunk still to come, including its CRLF
        self.done = False  # the last (zero) chunk and its trailers have been read

    def feed(self, data: bytes) -> bytes:
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        pos = 0
        n = len(buf)
        state = self._state
        left = self._left
        while pos < n:
            if state == _DATA:
                if left > 2:
                    take = min(left - 2, n - pos)
                    out.append(buf[pos : pos + take])
                    pos += take
                    left -= take
                    continue
                if n - pos < left:  # part of the CRLF after the data
                    break
                if buf[pos : pos + left] != b"\r\n"[2 - left :]:
                    raise ProtocolError("chunk data not followed by CRLF")
                pos += left
                state = _SIZE
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            line = buf[pos:eol]
            pos = eol + 2
            if state == _TRAILER:
                if not line:
                    self.done = True
                    break
                continue
            try:
                size = int(line, 16)
            except ValueError:
                size = _chunk_size(line)
            if not size:
                state = _TRAILER
            elif pos + size + 2 <= n and buf[pos + size : pos + size + 2] == b"\r\n":
                out.append(buf[pos : pos + size])  # the whole chunk is here: the usual case
                pos += size + 2
            else:
                state = _DATA
                left = size + 2
        self._state = state
        self._left = left
        self._buf = buf[pos:] if not self.done else b""
        if len(self._buf) > MAX_PENDING:
            raise ProtocolError("chunk size line too long")
        return out[0] if len(out) == 1 else b"".join(out)


def _chunk_size(line: bytes) -> int:
    """The size in a chunk line that has extensions (``1a;name=value``) or padding."""
    try:
        return int(line.split(b";", 1)[0].strip(), 16)
    except ValueError:
        raise ProtocolError(f"bad chunk size line {line[:40]!r}") from None


def is_message(name: bytes | None) -> bool:
    """Whether an event of this name can be a delivery of a test message."""
    return name is None or name == MESSAGE_EVENT


def event_stream_body(head: ResponseHead) -> Dechunker | None:
    """How to read the body of a 200 event-stream response: a ``Dechunker`` when
    the last transfer coding is ``chunked``, None when the body is the raw bytes
    up to EOF (close-delimited; a ``Content-Length`` on a stream that never ends
    is ignored). Refuses what is not an event stream, or is compressed."""
    ctype = head.headers.get("content-type", "")
    if ctype.split(";", 1)[0].strip().lower() != "text/event-stream":
        raise ProtocolError(f"not an event stream: content-type {ctype[:60]!r}")
    codings = [c.strip().lower() for c in head.headers.get("transfer-encoding", "").split(",") if c.strip()]
    unknown = [c for c in codings if c not in ("chunked", "identity")]
    if unknown:
        raise ProtocolError(f"unsupported transfer-coding {', '.join(unknown)[:60]!r}")
    return Dechunker() if codings and codings[-1] == "chunked" else None


class EventParser:
    """Incremental ``text/event-stream`` parser. Events end at a blank line;
    ``data:`` lines are joined with newlines; comments and ``retry:`` are
    skipped; an event without data is not dispatched (as in EventSource)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[Event]:
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            # CRLF and lone CR end lines too. A CR at the very end may be half of a CRLF: keep it.
            tail = buf.endswith(b"\r")
            if tail:
                buf = buf[:-1]
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if tail:
                buf += b"\r"
        events: list[Event] = []
        pos = 0
        while True:
            end = buf.find(b"\n\n", pos)
            if end < 0:
                break
            event = _parse_event(buf[pos:end])
            if event is not None:
                events.append(event)
            pos = end + 2
        self._buf = buf[pos:]
        if len(self._buf) > MAX_PENDING:
            raise ProtocolError("event too large")
        return events


def _parse_event(block: bytes) -> Event | None:
    event_id: bytes | None = None
    name: bytes | None = None
    data: list[bytes] = []
    for line in block.split(b"\n"):
        # Comments (':' keep-alives), retry: and unknown fields fall through and are ignored.
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"id:"):
            event_id = line[4:] if line[3:4] == b" " else line[3:]
        elif line.startswith(b"event:"):
            name = line[7:] if line[6:7] == b" " else line[6:]
        elif line == b"data":  # a field name alone means an empty value
            data.append(b"")
    if not data:
        return None
    return event_id, name, data[0] if len(data) == 1 else b"\n".join(data)
