"""A keep-alive HTTP/1.1 client connection for publishing: one request at a
time, the response read by hand (no client library, so a publish costs the
generator a few tens of microseconds, not a few hundred).

``Exchange`` is the sans-I/O part (bytes in, a finished response out), tested
on its own; ``HttpConnection`` is the Protocol around it.
"""

from __future__ import annotations

import asyncio
import socket
from typing import cast

from .http1 import ProtocolError, ResponseHead, parse_head, request
from .sse import Dechunker
from .target import Endpoint

MAX_BODY = 1024 * 1024  # a response body larger than this is an error, not buffered


def post_request(endpoint: Endpoint, headers: dict[str, str], body: bytes) -> bytes:
    """A whole POST request for ``endpoint`` with ``body``."""
    head = request("POST", endpoint.host_header, endpoint.target, {**headers, "Content-Length": str(len(body))})
    return head + body


class Exchange:
    """One response being read: the head, then a body framed by Content-Length,
    chunked, or (``Connection: close`` without either) by the end of the stream."""

    __slots__ = ("_buf", "_chunks", "_left", "body", "done", "head", "keep_alive")

    def __init__(self) -> None:
        self._buf = bytearray()
        self.head: ResponseHead | None = None
        self._left = 0  # body bytes still to come (Content-Length)
        self._chunks: Dechunker | None = None
        self.body = bytearray()
        self.done = False
        self.keep_alive = True

    def feed(self, data: bytes) -> bool:
        """Take bytes; True once the response is complete. Bytes past its end are an error
        (one request at a time: the server has nothing else to say)."""
        if self.head is None:
            self._buf += data
            head = parse_head(self._buf)
            if head is None:
                return False
            self.head = head
            data = bytes(self._buf[head.size :])
            self._buf = bytearray()
            conn = head.headers.get("connection", "").lower()
            self.keep_alive = "close" not in conn
            codings = head.headers.get("transfer-encoding", "").lower()
            if head.status in (204, 304) or 100 <= head.status < 200:
                self.done = True
            elif "chunked" in codings:
                self._chunks = Dechunker()
            elif "content-length" in head.headers:
                try:
                    self._left = int(head.headers["content-length"])
                except ValueError:
                    raise ProtocolError("bad Content-Length") from None
                self.done = self._left == 0
            else:
                self.keep_alive = False  # the body runs until the server closes
                self._left = -1
        if self.done:
            if data:
                raise ProtocolError("bytes after the response")
            return True
        if self._chunks is not None:
            self.body += self._chunks.feed(data)
            self.done = self._chunks.done
        elif self._left >= 0:
            if len(data) > self._left:
                raise ProtocolError("bytes after the response")
            self.body += data
            self._left -= len(data)
            self.done = self._left == 0
        else:
            self.body += data
        if len(self.body) > MAX_BODY:
            raise ProtocolError("response body too large")
        return self.done

    def eof(self) -> bool:
        """The server closed: True if that ended a close-delimited body."""
        if self.head is not None and self._left < 0 and self._chunks is None:
            self.done = True
        return self.done


class HttpConnection:
    """One keep-alive connection to ``endpoint``. ``request`` sends a prepared
    request and returns (status, body); a new TCP connection is opened when
    the server closed the last one (or a request failed on it)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._wire: _Wire | None = None
        self.opened = 0  # TCP connections opened so far

    async def _connect(self) -> _Wire:
        loop = asyncio.get_running_loop()
        ep = self.endpoint
        sock = socket.socket(ep.family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, (ep.address, ep.port))
            _, wire = await loop.create_connection(_Wire, sock=sock)
        except BaseException:
            sock.close()
            raise
        self.opened += 1
        return wire

    async def request(self, data: bytes, timeout: float) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout):
            wire = self._wire
            if wire is None or not wire.usable:
                wire = self._wire = await self._connect()
            try:
                return await wire.exchange(data)
            except BaseException:
                wire.abort()  # a half-read response leaves the connection unusable
                raise

    def close(self) -> None:
        if self._wire is not None:
            self._wire.abort()
            self._wire = None


class _Wire(asyncio.Protocol):
    """One TCP connection of an ``HttpConnection``: one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.usable = False
        self._exchange: Exchange | None = None
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def exchange(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None and self._waiter is None
        self._exchange = Exchange()
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return waiter

    def abort(self) -> None:
        self.usable = False
        if self.transport is not None:
            self.transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.usable = True

    def data_received(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is None:
            self._finish(ProtocolError("bytes before a request"))
            return
        try:
            done = exchange.feed(data)
        except ProtocolError as exc:
            self._finish(exc)
            return
        if done:
            self._finish(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        exchange = self._exchange
        if exchange is not None and exchange.eof():
            self._finish(None)
        else:
            self._finish(exc or ConnectionResetError("server closed the connection"))

    def _finish(self, error: BaseException | None) -> None:
        exchange, waiter = self._exchange, self._waiter
        self._exchange = self._waiter = None
        if error is not None:
            self.abort()
        elif exchange is not None and not exchange.keep_alive:
            self.usable = False
            if self.transport is not None:
                self.transport.close()
        if waiter is None or waiter.done():
            return
        if error is not None:
            waiter.set_exception(error)
        else:
            assert exchange is not None and exchange.head is not None
            waiter.set_result((exchange.head.status, bytes(exchange.body)))
