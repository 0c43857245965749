"""The WebSocket transport: ``GET /ws``.

The handshake is answered here and the socket handed to a ``WsLink``, which
reads it through the sans-I/O parser (wsproto.py), queues the client's
commands for the command handler in order, answers the close handshake and
keeps the heartbeat; one node-wide ``Ticker`` keeps every link's heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..admission import Gate, Refusal
from ..commands import Commands
from ..disconnect import HEARTBEAT_TIMEOUT, Disconnect
from ..frames import WS, ws_frame
from ..head import FrontHead, Head
from ..http import Reply, error_reply, hard_abort
from ..metrics import Metrics
from ..node import Node
from ..session import Session
from ..settings import BackpressureSettings, WsSettings
from .kind import TransportKind
from .link import Links, Opener, SocketLink, StreamEndpoint, ends_on_failure
from .ticker import Ticker
from .wsproto import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    PING,
    VERSION,
    FrameParser,
    accept_key,
    close_frame,
    switching_protocols,
)

log = logging.getLogger("herald.ws")

# Frames waiting for their command handler; past this the socket is not read.
_INBOX_PAUSE, _INBOX_RESUME = 64, 16


class WsLinks(Links):
    """The WebSocket links of one node, and what they all share."""

    __slots__ = ("commands", "frame_rejections", "heartbeat", "max_frame", "pinger")

    def __init__(
        self,
        ws: WsSettings,
        backpressure: BackpressureSettings,
        commands: Commands,
        gate: Gate,
        metrics: Metrics,
        user_timeout: float,
    ) -> None:
        super().__init__(ws.close_timeout, backpressure, gate, user_timeout)
        self.commands = commands
        self.max_frame = ws.max_frame
        self.frame_rejections = metrics.limit_rejections.labels("frame_size")
        self.heartbeat = ws.heartbeat
        # Each half heartbeat: a ping to the links quiet for a heartbeat, closing those that did
        # not answer the ping of the tick before.
        self.pinger = Ticker(ws.heartbeat / 2, self.links, self._beat) if ws.heartbeat else None

    def _beat(self, link: WsLink, now: float) -> None:
        link.check_stall(now)
        link.heartbeat(now, self.heartbeat)


class WsLink(SocketLink):
    """The protocol of one upgraded socket: the session's Transport, and the
    reader of its client's frames."""

    __slots__ = (
        "_ending",
        "_inbox",
        "_parser",
        "_reading_paused",
        "_worker",
        "last_in",
        "peer_closed",
        "ping_at",
    )

    name = "ws"
    duplex = True
    codec = WS

    def __init__(self, transport: asyncio.Transport, ctx: WsLinks) -> None:
        super().__init__(transport, ctx)
        self._ctx: WsLinks = ctx
        self._parser: FrameParser | None = None  # only while a frame or message is unfinished
        self._inbox: list[tuple[int, object]] | None = None  # frames for the command handler
        self._worker: asyncio.Task[None] | None = None
        self._reading_paused = False
        self._ending: Disconnect | None = None  # the client's close, once its commands are answered
        self.peer_closed = False  # the client's close frame (or a protocol error) came
        self.last_in = self._loop.time()
        self.ping_at = 0.0
        if ctx.pinger is not None:
            ctx.pinger.start()

    # -- reading --------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.last_in = self._loop.time()
        self.ping_at = 0.0  # any data proves the peer alive, not only a pong
        if self.peer_closed:
            return
        parser = self._parser or FrameParser(self._ctx.max_frame)
        events = parser.feed(data)
        self._parser = None if parser.idle else parser
        for opcode, payload in events:
            if opcode == OP_CLOSE:
                assert isinstance(payload, Disconnect)
                self._peer_ended(payload)
                return
            if opcode == OP_PING and not self._started:
                self._pong_now(payload)
                continue
            self._enqueue(opcode, payload)

    def _pong_now(self, payload: object) -> None:
        """A ping while the session opens: an open waits for NATS (seconds
        while it is away), and a client's heartbeat must not give up first.
        Answered at once, outside the command budget (no session yet), and
        only while the socket holds nothing unsent (RFC 6455 5.5.3 allows
        answering only the latest of several pings): a flood cannot grow it."""
        assert isinstance(payload, bytes)
        if not self.closing and not self._transport.get_write_buffer_size():
            self._transport.write(ws_frame(payload, OP_PONG))

    def _peer_ended(self, reason: Disconnect) -> None:
        """The client sent its close frame or broke the protocol (or a limit):
        nothing more is read, and nothing is waited for once our close is out.
        Commands that came before it are run and answered first."""
        self.peer_closed = True
        self._parser = None
        if reason.label == "too_big":
            self._ctx.frame_rejections.inc()
        if (self._inbox or self._worker is not None) and self.session is not None and self.session.active:
            # One is running, or more wait: the worker ends the link once it has answered them.
            self._ending = reason
            if self._worker is None and self._started:
                self._start_worker()
            return
        self._end(reason)

    def _end(self, reason: Disconnect) -> None:
        self._close_all(reason)
        if self.closing and not self.gone:
            self._transport.close()

    def _close_all(self, reason: Disconnect) -> None:
        """Close the session (its queued answers go out first, then our close
        frame), or only the link while there is no session yet."""
        if self.session is not None:
            self.session.close(reason)
        else:
            self.close(reason)

    def _enqueue(self, opcode: int, data: object) -> None:
        inbox = self._inbox
        if inbox is None:
            inbox = self._inbox = []
        inbox.append((opcode, data))
        if len(inbox) >= _INBOX_PAUSE and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
        if self._worker is None and self._started:
            self._start_worker()

    def _start_worker(self) -> None:
        session = self.session
        if session is not None and session.active:
            self._worker = self._loop.create_task(self._work(session))

    async def _work(self, session: Session) -> None:
        """Handle queued frames in order; exists only while there are some."""
        commands = self._ctx.commands
        inbox = self._inbox
        try:
            with ends_on_failure(session):
                while inbox and session.active:
                    opcode, data = inbox.pop(0)
                    if opcode == OP_TEXT:
                        assert isinstance(data, str)
                        await commands.handle(session, data)
                    elif opcode == OP_BINARY:
                        commands.refuse_binary(session)
                    elif commands.within_rate(session):  # client pings count against the frame budget
                        assert isinstance(data, bytes)
                        session.outbound.push(ws_frame(data, OP_PONG))
                    if self._reading_paused and len(inbox) <= _INBOX_RESUME and not self.gone:
                        self._reading_paused = False
                        self._transport.resume_reading()
        finally:
            self._worker = None
            if not inbox:
                self._inbox = None
                ending, self._ending = self._ending, None
                if ending is not None and not self.gone:
                    self._end(ending)

    # -- life -----------------------------------------------------------------

    def start(self) -> None:
        super().start()
        if not (self.gone or self.closing) and self._inbox:
            self._start_worker()

    def _farewell(self, reason: Disconnect) -> None:
        if reason is HEARTBEAT_TIMEOUT:  # 1006 is never sent: the peer is not there to read it
            hard_abort(self._transport)
        else:
            self._transport.write(close_frame(reason))

    def _stop_work(self) -> asyncio.Task[None] | None:
        # Forgotten here, not only by _work's finally: a worker cancelled
        # before its first step never runs that, and its CancelledError's
        # traceback (holding this link) would make a cycle only the GC frees.
        worker, self._worker = self._worker, None
        if worker is not None and worker is not asyncio.current_task():
            worker.cancel()
        return worker

    def heartbeat(self, now: float, interval: float) -> None:
        """A ping when the peer was quiet for ``interval``; closed if the last
        ping went unanswered. Not while the node does not read the socket (its
        commands queue up): the answer would not be read."""
        if self._reading_paused:
            self.ping_at = 0.0
        elif self.ping_at:
            self._close_all(HEARTBEAT_TIMEOUT)
        elif now - self.last_in >= interval and not self.closing:
            self.ping_at = now
            self._transport.write(PING)


class WsEndpoint(StreamEndpoint[WsLinks]):
    """``GET /ws``: screens, upgrades, and hands the socket to a link; the
    session is opened on it (refusals after the upgrade are close codes: a
    browser cannot see an HTTP status)."""

    taken_status = 101

    async def open(self, request: Head, forget: Callable[[], None]) -> Reply | None:
        accept = accept_key(request.method, request.headers) if request.version >= (1, 1) else None
        if accept is None:
            return _not_an_upgrade(request)
        try:
            self._gate.screen(request)  # before the upgrade: a cross-site page learns nothing
        except Refusal as refusal:
            self._gate.refused(WsLink.name, refusal)
            return error_reply(refusal.status, refusal.error, refusal.message)
        transport = request.transport
        if transport is None or transport.is_closing():  # the client already left
            return None
        transport.write(switching_protocols(accept))
        link = WsLink(transport, self.links)
        if isinstance(request, FrontHead):
            # Frames that came with the request head (a client that did not
            # wait for the 101): read before whatever comes next.
            early = request.take_rest()
            if early:
                link.data_received(early)
        await self._opener.serve(request, link, forget)
        return None


def _not_an_upgrade(request: Head) -> Reply:
    version = request.headers.get("Sec-WebSocket-Version")
    if version is not None and version != VERSION:  # RFC 6455 4.4: say which version this server speaks
        message = f"WebSocket version {version} is not supported: use {VERSION}"
        return error_reply(426, "bad_request", message, (("Sec-WebSocket-Version", VERSION),))
    return error_reply(400, "bad_request", "expected a WebSocket upgrade (HTTP/1.1 GET, version 13)")


def _serve(node: Node, opener: Opener) -> WsEndpoint:
    s = node.settings
    links = WsLinks(s.ws, s.backpressure, node.commands, node.gate, node.metrics, s.http.tcp_user_timeout)
    return WsEndpoint(node.gate, opener, links)


KIND = TransportKind(WsLink.name, "/ws", _serve)
