"""The first protocol of every connection: the hot requests (publishes,
stream handshakes) served without aiohttp's per-request machinery,
everything else handed to aiohttp.

aiohttp spends ~120 µs of CPU on a request before and after its handler
(request and payload objects, routing, a task, the response's headers and
writer): more than a publish's whole budget, and a good part of a connect's.
A connection starts here; while its requests are plain requests to a fast
route (HTTP/1.1, a ``Host``, each header once, no ``Transfer-Encoding``,
``Content-Encoding`` nor ``Expect``; a ``POST`` with a ``Content-Length``
body, a ``GET`` with none), they are answered here, or the route takes the
socket (a stream). At the first request of any other shape, the connection —
with the bytes not yet consumed — goes to aiohttp for good, which serves it
(and answers every malformed request) as it serves any. A fast route gives
the same answers through both paths.
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol, cast

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict

from broker.tasks import spawn

from .head import FrontHead, Head
from .http import ALWAYS_HEADERS, HOST, Reply, error_reply, hard_abort, http_date
from .malformed import MAX_HEADERS, MAX_LINE, JsonRefusals, line_too_long, log_refused

log = logging.getLogger("herald.http")

MAX_HEAD = MAX_LINE  # longer heads go to aiohttp (its limit for a line: it refuses longer ones)
# After refusing a request line too long, what more of it is read (and dropped) before the connection
# closes: the client sending the rest reads the answer, rather than a reset.
_LINE_DROPPED = 65536
# Header lines as RFC 9110 has them (no folding, no stray control bytes), checked in one pass.
_HEADERS = re.compile(rb"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*)*")
_DIGITS = re.compile(rb"[0-9]{1,18}")
# Origin-form, visible ASCII but "#" (a fragment, which aiohttp drops): anything else is aiohttp's to judge.
_TARGET = re.compile(rb"/[\x21\x22\x24-\x7e]*")
# A request line of an HTTP version aiohttp would answer in kind (it echoes "HTTP/2.0").
_OTHER_VERSION = re.compile(rb"[^\r\n]* HTTP/(?!1\.[01](?:\r|$))[0-9]\.[0-9](?:\r|$)")
# What only aiohttp handles: bodies that are not plain Content-Length ones.
_DELEGATED = frozenset(("transfer-encoding", "content-encoding", "expect"))


class FastRoute(Protocol):
    """A handler the front door serves itself (and aiohttp too, by its own route)."""

    @property
    def max_body(self) -> int:
        """Larger bodies go to aiohttp, which refuses them (0: a GET route)."""

    def refusal(self, head: Head, length: int) -> Reply | None:
        """The reply to a request its head alone refuses (a wrong key…), made
        before its body is read, or None. A refusal whose body is not all in
        ends the connection: the body is never held."""

    def answer(self, head: FrontHead, body: bytes) -> Awaitable[Reply | None]:
        """The reply to one request ``refusal`` let through; None: the route took the socket."""

    def body_timed_out(self, seconds: float) -> Reply:
        """The reply (408) to a request whose body did not arrive within
        ``seconds``, as the route's own aiohttp handler gives it (and counts
        it); the connection closes after it."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request the front door serves: its route, method, target and headers, and its body's length."""

    route: FastRoute
    method: str
    target: str
    headers: CIMultiDict[str]
    length: int
    close: bool
    refused: Reply | None = None  # the route's refusal on the head alone


class FrontDoor:
    """The fast routes and the connections at the front door (for shutdown)."""

    def __init__(self, routes: Mapping[tuple[bytes, bytes], FastRoute], timeout: float) -> None:
        self._routes = dict(routes)
        self.timeout = timeout  # http.handshake_timeout: a head, a body, or an idle keep-alive
        self.connections: set[FrontConnection] = set()
        self.closing = False

    def match(self, head: bytes) -> Request | None:
        """The request if the front door serves it; None: aiohttp's."""
        line_end = head.find(b"\r\n")
        parts = (head if line_end < 0 else head[:line_end]).split(b" ")
        if len(parts) != 3 or parts[2] != b"HTTP/1.1":
            return None
        method, target = parts[0], parts[1]
        route = self._routes.get((method, target.partition(b"?")[0]))
        if route is None or line_end < 0 or _TARGET.fullmatch(target) is None:
            return None
        if _HEADERS.fullmatch(head, line_end) is None or head.count(b"\r\n") > MAX_HEADERS:
            return None
        headers: CIMultiDict[str] = CIMultiDict()
        for line in head[line_end + 2 :].split(b"\r\n"):
            name, _, value = line.partition(b":")
            key = name.decode("ascii")
            if key in headers or key.lower() in _DELEGATED:
                return None
            headers[key] = value.strip(b" \t").decode("utf-8", "surrogateescape")
        if HOST.fullmatch(headers.get("Host", " ")) is None:
            return None  # none, or not a host: aiohttp (valid_host) answers 400
        length = headers.get("Content-Length", "0" if method == b"GET" else "").encode("utf-8", "surrogateescape")
        if _DIGITS.fullmatch(length) is None or int(length) > route.max_body:
            return None
        close = "close" in headers.get("Connection", "").lower()
        return Request(route, method.decode(), target.decode("ascii"), headers, int(length), close)

    def encode(self, reply: Reply, close: bool) -> bytes:
        lines = [
            f"HTTP/1.1 {reply.status} {http.HTTPStatus(reply.status).phrase}",
            f"Content-Type: {reply.content_type}",
            f"Content-Length: {len(reply.body)}",
            f"Date: {http_date()}",
            f"Server: {SERVER_SOFTWARE}",
        ]
        lines.extend(f"{name}: {value}" for name, value in (*ALWAYS_HEADERS, *reply.headers))
        if close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + reply.body


class FrontConnection(asyncio.Protocol):
    """One connection while the front door serves it."""

    __slots__ = (
        "_blocked",
        "_buffer",
        "_busy",
        "_deadline",
        "_door",
        "_gone",
        "_handler",
        "_loop",
        "_pending",
        "_timer",
        "_transport",
        "_unread",
    )

    def __init__(self, door: FrontDoor, handler: Callable[[], asyncio.Protocol]) -> None:
        self._door = door
        self._handler = handler  # makes aiohttp's protocol for this connection
        self._buffer = bytearray()
        self._busy = False  # a request is being answered
        self._blocked = False  # the client does not read its answers: none more is made until it does
        self._gone = False
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0  # loop time by which a whole request must be in (0: none is awaited)
        # The request whose body is still coming, where its body starts in the buffer, and its head: read
        # once, not again at each piece of the body (a body a byte per segment would cost a head each).
        self._pending: tuple[Request, int, FrontHead] | None = None
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        # Refused on its head, its body not all in: the body bytes still to come, dropped as they do.
        self._unread: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._door.connections.add(self)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._unread is not None:
            self._drop(len(data))
            return
        self._buffer += data
        if not self._busy and not self._blocked:
            self._advance()
        elif len(self._buffer) > MAX_HEAD + 65536 and self._transport is not None:
            self._transport.pause_reading()  # pipelined requests pile up: wait for the answer

    def pause_writing(self) -> None:
        """The client does not read what it is sent: read nor answer more of its requests."""
        self._blocked = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._blocked = False
        if not self._busy and self._transport is not None:
            self._go_on(self._transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._gone = True
        self._stop_timer()
        self._door.connections.discard(self)

    def close_idle(self) -> None:
        """Shutdown: an idle connection closes now, a busy one after its answer."""
        if self._blocked and self._transport is not None:
            hard_abort(self._transport)
        elif not self._busy and self._transport is not None:
            self._transport.close()

    def _advance(self) -> None:
        buffer = self._buffer
        if self._pending is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0 or end > MAX_HEAD:
                if len(buffer) > MAX_HEAD and buffer.find(b"\n", 0, MAX_HEAD + 2) < 0:
                    # A request line too long: 414 (aiohttp's parser would say a plain 400).
                    log_refused(414, repr(bytes(buffer[:100])) + "...")
                    self._refuse_unread(line_too_long(), _LINE_DROPPED)
                # Too long, or lines ended by a bare LF: aiohttp answers 400 (or 431) at once.
                elif len(buffer) > MAX_HEAD or buffer.find(b"\n\n", 0, MAX_HEAD + 4) >= 0:
                    self._hand_over()
                return
            head = bytes(buffer[:end])
            matched = self._door.match(head)
            if matched is None:
                if _OTHER_VERSION.match(head):
                    self._refuse(error_reply(505, "bad_request", "HTTP/1.1 (or 1.0) only"))
                else:
                    self._hand_over()
                return
            assert self._transport is not None
            front_head = FrontHead(matched.method, matched.target, matched.headers, self._transport, self._take_rest)
            refused = matched.route.refusal(front_head, matched.length)
            if refused is not None:
                matched = replace(matched, refused=refused)
            self._pending = (matched, end + 4, front_head)
        request, start, front_head = self._pending
        if len(buffer) < start + request.length:
            if request.refused is not None:
                self._refuse_unread(request.refused, start + request.length - len(buffer))
            return  # the body is still coming
        self._pending = None
        body = bytes(buffer[start : start + request.length])
        del buffer[: start + request.length]
        self._busy = True
        self._disarm()
        assert self._transport is not None
        spawn(_answering, self._answer(request, front_head, body, self._transport))

    async def _answer(self, request: Request, head: FrontHead, body: bytes, transport: asyncio.Transport) -> None:
        try:
            reply = request.refused if request.refused is not None else await request.route.answer(head, body)
        except Exception:
            log.exception("request failed")
            reply = error_reply(500, "internal", "internal error")
        self._busy = False
        if reply is None:  # a stream: the socket is the route's now
            self._release()
            return
        if self._gone or self._transport is None:
            return
        close = request.close or self._door.closing
        transport.write(self._door.encode(reply, close))
        if close:
            transport.close()
            return
        self._arm()
        if not self._blocked:  # else once the client reads (resume_writing)
            self._go_on(transport)

    def _go_on(self, transport: asyncio.Transport) -> None:
        """Read again, and serve the next request if it is in."""
        if len(self._buffer) <= MAX_HEAD + 65536:
            transport.resume_reading()
        if self._buffer:
            self._advance()

    def _refuse(self, reply: Reply) -> None:
        """Answer ``reply`` and close: a request aiohttp would answer wrongly."""
        if self._transport is not None:
            self._transport.write(self._door.encode(reply, close=True))
            self._transport.close()
            self._release()

    def _refuse_unread(self, reply: Reply, unread: int) -> None:
        """Answer ``reply`` and close, not reading the ``unread`` body bytes still
        to come. Until they came (or the timeout) they are dropped as they
        arrive, not held: a close with bytes unread would reset the connection,
        and a client still sending could lose the answer."""
        transport = self._transport
        if transport is None:
            return
        self._pending = None
        self._buffer.clear()
        transport.write(self._door.encode(reply, close=True))
        if transport.can_write_eof():
            transport.write_eof()  # the client reads the answer and its end at once
        self._unread = unread
        self._arm()  # at most the timeout more

    def _drop(self, received: int) -> None:
        """``received`` body bytes of the refused request came: dropped; once all came, the connection closes."""
        assert self._unread is not None
        self._unread -= received
        if self._unread <= 0 and self._transport is not None:
            self._transport.close()

    def _take_rest(self) -> bytes:
        """What came after the request being answered, for the route that takes the socket."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        if self._transport is not None:
            self._transport.resume_reading()  # paused if the rest piled up
        return rest

    def _release(self) -> None:
        """The connection is no longer the front door's."""
        self._stop_timer()
        self._door.connections.discard(self)
        self._transport = None

    def _hand_over(self) -> None:
        """From here on aiohttp serves this connection, from the first byte not consumed."""
        transport = self._transport
        if transport is None:
            return
        self._release()
        handler = self._handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        transport.resume_reading()
        if self._buffer:
            handler.data_received(bytes(self._buffer))
        self._buffer = bytearray()

    def _arm(self) -> None:
        """A whole request must be in within the timeout. One timer per
        connection, moved on when it fires: none is made and cancelled per
        request of a keep-alive connection."""
        self._deadline = self._loop.time() + self._door.timeout
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._expire)

    def _disarm(self) -> None:
        self._deadline = 0.0  # a request is being answered: the timer finds nothing to expire

    def _stop_timer(self) -> None:
        self._deadline = 0.0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        """No complete request within the timeout: a slow or idle client, or
        one that does not read its answers."""
        self._timer = None
        transport = self._transport
        if transport is None or self._busy or not self._deadline:
            return
        if self._loop.time() < self._deadline:  # answered a request since this timer was set
            self._timer = self._loop.call_at(self._deadline, self._expire)
            return
        if self._blocked:
            hard_abort(transport)  # a close would wait for ever to write what it does not read
        elif self._unread is not None:
            transport.close()  # refused, and its body still not all in: answered already
        elif (request := self._awaiting_body()) is not None:
            # The head of a fast route, its body not all in: answered as aiohttp's route answers.
            transport.write(self._door.encode(request.route.body_timed_out(self._door.timeout), close=True))
            transport.close()
        elif self._buffer:
            hard_abort(transport)  # half a head: nothing to say to it
        else:
            transport.close()

    def _awaiting_body(self) -> Request | None:
        """The request whose whole head the buffer holds, if the front door serves it (its body is not all in)."""
        if self._pending is not None:
            return self._pending[0]
        end = self._buffer.find(b"\r\n\r\n")
        return self._door.match(bytes(self._buffer[:end])) if 0 <= end <= MAX_HEAD else None


# Answers being written (see broker.tasks.spawn).
_answering: set[asyncio.Task[None]] = set()


class FrontServer(web.Server):
    """aiohttp's Server whose new connections start at the front door."""

    def __init__(self, inner: web.Server, door: FrontDoor) -> None:
        vars(self).update(vars(inner))  # the same server (handler, settings, connections), one duty more
        self.door = door

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        return FrontConnection(self.door, self._handler)

    def _handler(self) -> JsonRefusals:
        """aiohttp's protocol for a connection handed over (as web.Server makes it), refusing in JSON."""
        return JsonRefusals(self, loop=self._loop, **self._kwargs)

    def pre_shutdown(self) -> None:
        self.door.closing = True
        for connection in list(self.door.connections):
            connection.close_idle()
        super().pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or 0)
        while self.door.connections and loop.time() < deadline:
            await asyncio.sleep(0.02)  # answers being written
        await super().shutdown(timeout)


class FrontRunner(web.AppRunner):
    """aiohttp's AppRunner whose server starts connections at the front door,
    with the routes the application lists under ``routes_key``."""

    def __init__(
        self, app: web.Application, routes_key: web.AppKey[dict[tuple[bytes, bytes], FastRoute]], **kwargs: object
    ) -> None:
        super().__init__(app, **kwargs)  # type: ignore[arg-type]
        self._routes_key = routes_key
        self._timeout = float(kwargs.get("keepalive_timeout", 75.0))  # type: ignore[arg-type]

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        routes = self.app[self._routes_key]
        return FrontServer(server, FrontDoor(routes, self._timeout))
