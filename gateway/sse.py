"""The Server-Sent-Events transport: ``GET /sse``.

aiohttp-sse prepares the response (headers, keep-alive comments); after that,
prebuilt event bytes are written straight to the transport as HTTP chunks.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from broker import BrokerUnavailable

from .admission import Gate, Refusal
from .disconnect import CLIENT_CLOSED, GOING_AWAY, INTERNAL, UNAVAILABLE, Disconnect
from .frames import SSE
from .http import SocketWire, drain_or_abort, json_error
from .resume import Resumer
from .sessions import Sessions
from .settings import BackpressureSettings, SseSettings

log = logging.getLogger("herald.sse")


class SseConnection(SocketWire):
    """Wire and closer of one event stream: event bytes go out as HTTP chunks."""

    __slots__ = ("_response", "_started", "_writer")

    def __init__(
        self, response: EventSourceResponse, request: web.Request, write_buffer: int, socket_buffer: int
    ) -> None:
        assert request.transport is not None
        super().__init__(request.transport, write_buffer, socket_buffer)
        self._writer = request.writer
        self._response = response
        self._started = False  # nothing may be written before the response head

    async def drained(self) -> None:
        """aiohttp's own flow control: returns once the transport resumes."""
        if self._transport.is_closing():
            raise ConnectionResetError("connection closing")
        await self._writer.drain()

    async def start(self, request: web.Request, retry: int) -> None:
        """Send the response head and the ``retry:`` hint. Called once the
        channels are joined: EventSource's "open" then means live."""
        await self._response.prepare(request)
        # The first write sends the buffered headers; raw chunks may follow it.
        await self._response.write(b"retry: %d\n\n" % retry)
        if self._response.chunked:
            self.frame = _chunk
        self._started = True

    def close(self, reason: Disconnect) -> None:
        if reason.retry_ms and self._started:  # EventSource waits this long before it reconnects
            self.write(b"retry: %d\n\n" % reason.retry_ms)
        # Ends ``response.wait()`` in the handler, which finishes the stream.
        self._response.stop_streaming()


def _chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk (the response body is chunked)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


class SseEndpoint:
    """``GET /sse``: admits, attaches, and serves the stream until it ends."""

    def __init__(
        self,
        sse: SseSettings,
        backpressure: BackpressureSettings,
        close_timeout: float,
        gate: Gate,
        sessions: Sessions,
        resumer: Resumer,
    ) -> None:
        self._sse = sse
        self._backpressure = backpressure
        self._close_timeout = close_timeout  # ws.close_timeout: the same bound for ending a stream
        self._gate = gate
        self._sessions = sessions
        self._resumer = resumer

    async def handle(self, request: web.Request) -> web.StreamResponse:
        gate = self._gate
        try:
            gate.screen(request)
            admission = gate.admit(request, request.headers.get("Last-Event-ID"))
            conn_id = await gate.count_in(admission.identity)
        except Refusal as refusal:
            return json_error(refusal.status, refusal.error, refusal.message)
        if request.transport is None:  # the client left while it was being admitted
            gate.count_out(admission.identity.user, conn_id)
            return web.Response(status=499)

        s = self._sse
        response = EventSourceResponse(ping_interval=s.keepalive)
        response.force_close()  # one stream per connection: never reused for keep-alive
        transport = request.transport
        assert transport is not None
        bp = self._backpressure
        conn = SseConnection(response, request, bp.write_buffer, bp.socket_buffer)
        session = self._sessions.open(conn_id, admission.identity, SSE, conn, conn.close)
        reason: Disconnect = CLIENT_CLOSED
        try:
            await self._resumer.attach(
                session, admission.channels, admission.since, joined=lambda: conn.start(request, s.retry)
            )
            await response.wait()
            if session.disconnect is not None:
                reason = session.disconnect
                await _end_stream(response, transport, self._close_timeout)
        except ConnectionResetError:  # gone before or while the stream started
            reason = CLIENT_CLOSED
        except BrokerUnavailable as exc:
            reason = UNAVAILABLE
            log.warning("stream %s: %s", session.id, exc)
            if not response.prepared:  # refused before the stream started: say why
                return json_error(503, "unavailable", str(exc))
        except asyncio.CancelledError:
            # The client went away (handler cancellation) or the server is stopping.
            reason = session.disconnect or GOING_AWAY
            raise
        except Exception:
            log.exception("stream %s failed", session.id)
            reason = INTERNAL
            transport.abort()
        finally:
            await gate.finish(session, reason)
        return response


async def _end_stream(response: EventSourceResponse, transport: asyncio.Transport, timeout: float) -> None:
    """Finish the chunked body; a peer that does not read it in time is aborted."""
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        async with asyncio.timeout_at(deadline):
            await response.write_eof()
    except Exception:  # noqa: BLE001 - a stalled or vanished peer ends the same way
        transport.abort()
        return
    transport.close()
    await drain_or_abort(transport, deadline)
