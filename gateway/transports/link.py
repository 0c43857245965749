"""A client socket after its request head, and the session opened on it.

The front door (or aiohttp, for a head of another shape) parses the request
head and routes it; the transport's endpoint then takes the socket
(``SocketLink``; aiohttp is made to forget it: ``detach``). What aiohttp
would keep per connection — the request and its headers, the handler tasks,
a reader queue, timers — is not kept: an idle connection is its asyncio
transport, a link and its ``Session``. ``Opener`` is what every transport
does next: admit the client, count it in, attach its session.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from aiohttp import web

from broker import BrokerUnavailable
from broker.channels import client_name
from broker.tasks import spawn
from broker.throttle import Throttle

from ..admission import Gate, Refusal
from ..disconnect import CLIENT_CLOSED, HEARTBEAT_TIMEOUT, INTERNAL, UNAVAILABLE, Disconnect
from ..frames import Codec
from ..head import FrontHead, Head
from ..http import Reply, SocketWire, body_timeout, free_socket
from ..resume import Resumer
from ..session import Session
from ..sessions import Sessions
from ..settings import BackpressureSettings

log = logging.getLogger("herald.transports")
# While NATS is away every client that opens a stream or sends a command meets
# it: one line per interval says so, not one per connection.
_unavailable = Throttle(log)

# Sessions being finished (see broker.tasks.spawn); never cancelled: see Gate.finish.
_finishing: set[asyncio.Task[None]] = set()
# Seconds a close that tells the client to come back at once (4008) waits at
# most for its connection to be counted out (Disconnect.count_out_first).
COUNT_OUT_WAIT = 0.5


def detach(request: web.BaseRequest) -> None:
    """Make aiohttp forget a connection whose socket a link now owns: no
    write, close or timer of aiohttp's touches it afterwards. The handler must
    return right after (aiohttp may cancel its task)."""
    handler = request.protocol
    handler.transport = None
    handler.connection_lost(None)


def lost_because(exc: BaseException | None) -> Disconnect:
    """Why a socket that went under us ended its session. ETIMEDOUT: the
    kernel gave up on a peer that acknowledged nothing for
    http.tcp_user_timeout (a half-open connection), not a client that left."""
    if isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT:
        return HEARTBEAT_TIMEOUT
    return CLIENT_CLOSED  # the peer went without a goodbye


@contextlib.contextmanager
def ends_on_failure(session: Session) -> Iterator[None]:
    """A broker outage closes the session 1013; anything else is logged and
    closes it 1011. The node goes on either way."""
    try:
        yield
    except BrokerUnavailable as exc:
        _unavailable("unavailable", "connection %s: %s (closed 1013)", session.id, exc)
        session.close(UNAVAILABLE)
    except Exception:
        log.exception("connection %s failed", session.id)
        session.close(INTERNAL)


class Links:
    """The open links of one transport on a node, and what they all share."""

    __slots__ = ("close_timeout", "gate", "links", "socket_buffer", "stall_timeout", "user_timeout", "write_buffer")

    def __init__(
        self, close_timeout: float, backpressure: BackpressureSettings, gate: Gate, user_timeout: float
    ) -> None:
        self.gate = gate
        self.close_timeout = close_timeout
        self.write_buffer = backpressure.write_buffer
        self.socket_buffer = backpressure.socket_buffer
        self.user_timeout = user_timeout  # http.tcp_user_timeout
        self.stall_timeout = backpressure.stall_timeout
        self.links: set[Any] = set()

    async def wait_closed(self) -> None:
        """After the node closed its sessions: give their closes
        ``close_timeout`` to finish (aiohttp does not know these sockets)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.close_timeout + 0.5
        while self.links and loop.time() < deadline:
            await asyncio.sleep(0.02)


class SocketLink(SocketWire, asyncio.Protocol):
    """One client socket after its request head: the session's Transport.

    Subclasses say what a close looks like on the wire (``_farewell``) and
    how a refusal before the session is told (``refuse``). A session ends
    once both its handler is done (``start``) and the link is closing or gone."""

    __slots__ = (
        "_ctx",
        "_drain",
        "_loop",
        "_paused",
        "_started",
        "_stuck_bytes",
        "_stuck_since",
        "_stuck_written",
        "_timer",
        "closing",
        "gone",
        "session",
    )

    name = ""
    duplex = False
    codec: Codec  # set by each transport

    def __init__(self, transport: asyncio.Transport, ctx: Links) -> None:
        super().__init__(transport, ctx.write_buffer, ctx.socket_buffer, ctx.user_timeout)
        self._ctx = ctx
        self._loop = asyncio.get_running_loop()
        self._paused = False  # the transport's write buffer is above its limit
        self._drain: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._started = False  # the handler has set the session up (or given up)
        self._stuck_bytes = 0  # what the socket held unsent at the last tick (check_stall)
        self._stuck_since = 0.0
        self._stuck_written = 0  # what the session's queue had handed it then
        self.session: Session | None = None
        self.closing = False  # our farewell is out (or the socket aborted)
        self.gone = False
        transport.set_protocol(self)
        ctx.links.add(self)

    # -- life -----------------------------------------------------------------

    def start(self) -> None:
        """The handler is done setting up (the session attached, or not made):
        a lost socket ends the session from now on."""
        self._started = True
        if self.gone or self.closing:
            self._finish()

    def check_stall(self, now: float) -> None:
        """On the transport's periodic tick (loop time ``now``): a socket that
        holds unsent bytes and took none for ``stall_timeout`` is a stalled
        peer. Past ``write_buffer`` the queue's own waiter finds it (outbound.py);
        below it, with nothing queued, only this does. What the socket holds
        is noted for the node's total too (outbound.HeldBytes)."""
        held = self.buffered()
        session = self.session
        if session is None:
            return
        outbound = session.outbound
        outbound.sample_wire(held)  # herald_outbound_queue_bytes: read here, not per connection on a scrape
        took = outbound.took_since(self._stuck_bytes, self._stuck_written)
        self._stuck_written = outbound.written
        if not held or not self._stuck_bytes or took:
            self._stuck_bytes, self._stuck_since = held, now  # nothing held, or the peer took some
        elif now - self._stuck_since >= self._ctx.stall_timeout:
            if session.active:
                outbound.on_overflow(True)
        else:
            self._stuck_bytes = held

    def first_frames(self) -> list[dict[str, Any]]:
        """Control frames the stream gets right after its welcome."""
        return []

    def refuse(self, refusal: Refusal) -> None:
        """Tell a client refused before it has a session, and close."""
        self.close(refusal.disconnect)

    def close(self, reason: Disconnect) -> None:
        """Close with ``reason`` (the session's Transport.close): the farewell
        after what is queued; the peer gets ``close_timeout`` to read it. A
        reason that tells the client to come back at once is sent once its
        connection is counted out (or after ``COUNT_OUT_WAIT``): the session
        is closing already, nothing more is queued for it, and no caller waits."""
        session = self.session
        if reason.count_out_first and session is not None and not (self.closing or self.gone):
            spawn(_finishing, self._close_counted_out(session, reason))
        else:
            self._close_now(reason)

    async def _close_counted_out(self, session: Session, reason: Disconnect) -> None:
        await self._ctx.gate.count_out_first([session], COUNT_OUT_WAIT)
        self._close_now(reason)

    def _close_now(self, reason: Disconnect) -> None:
        if self.closing or self.gone:
            return
        self.closing = True
        self._farewell(reason)
        if not self.gone:
            self._timer = self._loop.call_later(self._ctx.close_timeout, self._give_up)
        if self._started:
            self._finish()  # its channels are released now, not when the peer is done reading

    def _farewell(self, reason: Disconnect) -> None:
        """Write what ends the connection for ``reason`` (and close or abort)."""
        raise NotImplementedError

    def _give_up(self) -> None:
        self._timer = None
        if not self.gone:
            free_socket(self._transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.gone = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake_drain()
        self._ctx.links.discard(self)
        session = self.session
        if session is not None and session.active:
            session.close(lost_because(exc))
        if self._started:
            self._finish()

    def _finish(self) -> None:
        session = self.session
        if session is None:
            return
        self.session = None
        spawn(_finishing, self._finished(session, self._stop_work()))

    def _stop_work(self) -> asyncio.Task[None] | None:
        """Cancel what the link still does for the session; the task to wait for."""
        return None

    async def _finished(self, session: Session, work: asyncio.Task[None] | None) -> None:
        if work is not None and not work.done():
            await asyncio.wait([work])  # a command mid-way ends before the channels are released
        await self._ctx.gate.finish(session, session.disconnect or CLIENT_CLOSED)

    # -- writing (outbound.Wire) ----------------------------------------------

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drain()

    def _wake_drain(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    async def drained(self) -> None:
        if self._paused and not self.gone:
            if self._drain is None or self._drain.done():  # cancelled by a waiter's timeout
                self._drain = self._loop.create_future()
            await self._drain
        if self.gone or self._transport.is_closing():
            raise ConnectionResetError("connection closing")


class Opener:
    """What every transport does once it holds the socket: admit the client,
    count it in cluster-wide, open its session and attach it to its channels
    (the welcome first, then what it missed, then the live flow)."""

    def __init__(self, node_id: str, gate: Gate, sessions: Sessions, resumer: Resumer) -> None:
        self._node_id = node_id
        self._gate = gate
        self._sessions = sessions
        self._resumer = resumer

    async def serve(
        self,
        request: Head,
        link: SocketLink,
        forget: Callable[[], None],
        last_event_id: str | None = None,
        joined: Callable[[], None] | None = None,
    ) -> None:
        """Open the session on ``link`` (``joined``: called once its channels
        are live, before the welcome), then leave the socket to the link and
        ``forget`` it where the request came from (aiohttp: ``detach``). The
        handler must return right after."""
        try:
            await self._open(request, link, last_event_id, joined)
        finally:
            link.start()
            forget()  # last: aiohttp may cancel the handler's task from here on

    async def _open(
        self,
        request: Head,
        link: SocketLink,
        last_event_id: str | None,
        joined: Callable[[], None] | None,
    ) -> None:
        gate = self._gate
        try:
            admission = await gate.admit(request, link.name, last_event_id)
            conn_id = await gate.count_in(admission.identity, admission.replaces)
        except Refusal as refusal:
            link.refuse(gate.refused(link.name, refusal))
            return
        except Exception:  # a bug: told as such (WS 1011, SSE 500), logged; the node goes on
            log.exception("admitting a %s stream failed", link.name)
            link.refuse(gate.refused(link.name, Refusal(500, INTERNAL, "internal", "internal error")))
            return
        if link.gone:  # the client left while it was being admitted
            gate.count_out(admission.identity.user, conn_id)
            return
        session = link.session = self._sessions.open(conn_id, admission.identity, link)
        for frame in link.first_frames():
            session.send(frame)  # queued to follow the welcome
        welcome = {
            "type": "welcome",
            "conn": session.id,
            "user": session.user,
            "node": self._node_id,
            "channels": [client_name(c) for c in admission.channels],
        }
        with ends_on_failure(session):
            await self._resumer.attach(session, admission.channels, admission.since, welcome, joined)


L = TypeVar("L", bound=Links)


class StreamEndpoint(Generic[L]):
    """A transport's ``GET`` route: its streams opened through aiohttp
    (``handle``) or the front door (``answer``; see front.py), both by
    ``open``, which returns a refusal or takes the socket for a link."""

    max_body = 0  # as a front door route: no body
    taken_status = 200  # what aiohttp is told once the socket is taken (never sent)

    def __init__(self, gate: Gate, opener: Opener, links: L) -> None:
        self._gate = gate
        self._opener = opener
        self.links = links

    async def handle(self, request: web.Request) -> web.StreamResponse:
        reply = await self.open(request, lambda: detach(request))
        return web.Response(status=self.taken_status) if reply is None else reply.response()

    def refusal(self, head: Head, length: int) -> Reply | None:
        return None  # judged whole in open(): a stream's request has no body

    async def answer(self, head: FrontHead, body: bytes) -> Reply | None:
        return await self.open(head, _nothing)  # the front door keeps nothing of a socket it gave away

    def body_timed_out(self, seconds: float) -> Reply:
        return body_timeout(seconds)  # never asked: a GET with a body is not the front door's (max_body 0)

    async def open(self, request: Head, forget: Callable[[], None]) -> Reply | None:
        """The refusal, or None: the socket is the stream's (or the client left);
        ``forget`` makes where the request came from let go of the socket."""
        raise NotImplementedError

    async def wait_closed(self) -> None:
        await self.links.wait_closed()


def _nothing() -> None:
    pass
