"""The Server-Sent-Events transport: ``GET /sse``.

Once the request is screened the socket is handed to an ``SseLink``, as a
WebSocket's is: Herald writes the response head itself (a close-delimited
body, so events go out as they are, with no chunk framing) and aiohttp
forgets the connection. One node-wide ``Ticker`` writes the comment
lines that keep proxies from timing idle streams out. The client sends
nothing on the stream; its commands come over ``POST /api/command``.
"""

from __future__ import annotations

import asyncio
import http
from collections.abc import Callable
from typing import Any

import orjson

from ..admission import Gate, Refusal
from ..disconnect import CLIENT_CLOSED, GOING_AWAY, HEARTBEAT_TIMEOUT, Disconnect
from ..frames import SSE, SSE_ENVELOPE, SseCodec, sse_event
from ..head import FrontHead, Head
from ..http import Reply, cors_pairs, error_reply, http_date
from ..node import Node
from ..settings import BackpressureSettings, SseSettings
from .kind import TransportKind
from .link import Links, Opener, SocketLink, StreamEndpoint
from .ticker import Ticker

_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Date: %b\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Connection: close\r\n"
    b"X-Accel-Buffering: no\r\n"  # nginx: pass events on as they come
    b"X-Content-Type-Options: nosniff\r\n"
    b"%b\r\n"  # CORS, for a page of another site that limits.origins allows
)
_COMMENT = b":\n\n"
# The HTTP status of a stream ended before its head was sent, by close code.
_STATUS = {4000: 400, 4001: 401, 4003: 403, 4029: 429, 1011: 500}
# Ends the client did not ask for get an ``event: close`` saying why.
_SILENT = (CLIENT_CLOSED, GOING_AWAY, HEARTBEAT_TIMEOUT)


def cors_headers(origin: str | None) -> bytes:
    return "".join(f"{name}: {value}\r\n" for name, value in cors_pairs(origin)).encode("latin-1", "replace")


def http_error(status: int, error: str, message: str, origin: str | None = None) -> bytes:
    """A whole HTTP response with a JSON reason (the socket closes after it);
    readable by a page of ``origin`` (CORS), if given."""
    body = orjson.dumps({"error": error, "message": message})
    reason = http.HTTPStatus(status).phrase.encode()
    return (
        b"HTTP/1.1 %d %b\r\nDate: %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\nX-Content-Type-Options: nosniff\r\n%b\r\n%b"
        % (status, reason, http_date().encode(), len(body), cors_headers(origin), body)
    )


class SseLinks(Links):
    """The event streams of one node, and what they all share."""

    __slots__ = ("keepalive", "keepalive_event", "keepalive_frame", "retry")

    def __init__(
        self,
        sse: SseSettings,
        close_timeout: float,
        backpressure: BackpressureSettings,
        gate: Gate,
        user_timeout: float,
    ) -> None:
        super().__init__(close_timeout, backpressure, gate, user_timeout)
        self.retry = sse.retry
        self.keepalive = Ticker(sse.keepalive, self.links, _keep_alive) if sse.keepalive else None
        # An envelope stream's keep-alive is an event its page sees (EventSource hides comments): a client
        # can tell a quiet stream from a half-open one (a network switch leaves the socket without a FIN).
        # The first one follows the welcome at once: the client watches the stream from the start.
        self.keepalive_frame = {"type": "keepalive", "interval": sse.keepalive}
        self.keepalive_event = sse_event("keepalive", orjson.dumps(self.keepalive_frame))


class SseLink(SocketLink):
    """One event stream: the session's Transport. Its response head goes out
    once the session's channels are live (``begin``): EventSource's ``open``
    then means that what is published after reaches it."""

    __slots__ = ("begun", "codec", "origin")

    name = "sse"
    duplex = False

    def __init__(self, transport: asyncio.Transport, ctx: SseLinks, codec: SseCodec, origin: str | None = None) -> None:
        super().__init__(transport, ctx)
        self._ctx: SseLinks = ctx
        self.codec = codec
        self.origin = origin  # a page of another site that limits.origins allows: every answer names it (CORS)
        self.begun = False  # the response head is out
        if ctx.keepalive is not None:
            ctx.keepalive.start()

    def begin(self) -> None:
        """Send the head (naming ``origin`` for CORS) and the ``retry:`` hint."""
        if not self.begun and not self.gone and not self.closing:
            self.begun = True
            head = _HEAD % (http_date().encode(), cors_headers(self.origin))
            self._transport.write(head + b"retry: %d\n\n" % self._ctx.retry)

    def first_frames(self) -> list[dict[str, Any]]:
        """An envelope stream's first ``keepalive``, which says how often the next ones come."""
        return [self._ctx.keepalive_frame] if self.codec is SSE_ENVELOPE and self._ctx.keepalive else []

    def data_received(self, data: bytes) -> None:
        """The client has nothing to say on the stream (a pipelined request is ignored)."""

    def eof_received(self) -> bool:
        return False  # the client is done sending: the stream ends (EventSource never half-closes)

    def refuse(self, refusal: Refusal) -> None:
        """Before the head: an HTTP status with a JSON reason (EventSource stops on it)."""
        if not self.closing and not self.gone:
            self.closing = True
            self._transport.write(http_error(refusal.status, refusal.error, refusal.message, self.origin))
            self._transport.close()
            self._timer = self._loop.call_later(self._ctx.close_timeout, self._give_up)

    def _farewell(self, reason: Disconnect) -> None:
        if not self.begun:  # ended while its channels were being joined: an HTTP error then
            status = _STATUS.get(reason.code, 503)
            body = http_error(status, reason.label, reason.message, self.origin)
        else:
            body = b""
            if reason not in _SILENT:
                farewell = {"type": "close", "code": reason.code, "reason": reason.message}
                body = sse_event("close", orjson.dumps(farewell))
            if reason.retry_ms:  # EventSource waits this long before it reconnects
                body += b"retry: %d\n\n" % reason.retry_ms
        if body:
            self._transport.write(body)
        self._transport.close()  # after what is buffered is written

    def tick(self) -> None:
        """A keep-alive comment (envelope streams: a ``keepalive`` event), unless bytes are still on their way."""
        if self.begun and not self.closing and not self.buffered():
            self._transport.write(self._ctx.keepalive_event if self.codec is SSE_ENVELOPE else _COMMENT)


def _keep_alive(link: SseLink, now: float) -> None:
    """Each ``sse.keepalive``: the stall check, then the keep-alive."""
    link.check_stall(now)
    link.tick()


class SseEndpoint(StreamEndpoint[SseLinks]):
    """``GET /sse``: screens, takes the socket, and opens the session on it.
    Refusals are HTTP statuses with a JSON reason (EventSource stops on them)."""

    async def open(self, request: Head, forget: Callable[[], None]) -> Reply | None:
        origin = self._gate.cross_origin(request)
        try:
            self._gate.screen(request)
        except Refusal as refusal:
            self._gate.refused(SseLink.name, refusal)
            return error_reply(refusal.status, refusal.error, refusal.message, cors_pairs(origin))
        transport = request.transport
        if transport is None or transport.is_closing():  # the client already left
            return None
        codec = SSE_ENVELOPE if request.query.get("envelope") in ("1", "true") else SSE
        link = SseLink(transport, self.links, codec, origin)
        if isinstance(request, FrontHead):
            request.take_rest()  # what came after the request is not read on a stream; reading goes on
        # EventSource reconnects to the same URL with a newer Last-Event-ID: it wins over ?since=.
        last_event_id = request.headers.get("Last-Event-ID")
        await self._opener.serve(request, link, forget, last_event_id, link.begin)
        return None


def _serve(node: Node, opener: Opener) -> SseEndpoint:
    s = node.settings
    links = SseLinks(s.sse, s.ws.close_timeout, s.backpressure, node.gate, s.http.tcp_user_timeout)
    return SseEndpoint(node.gate, opener, links)


KIND = TransportKind(SseLink.name, "/sse", _serve)
