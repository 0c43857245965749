"""A WebSocket connection after its handshake (RFC 6455, server side).

aiohttp parses the HTTP request; once the upgrade is accepted the socket is
handed to a ``WsLink`` and aiohttp lets go of it. What aiohttp would keep per
upgraded connection — the request and its headers, two handler tasks, a
reader queue, a heartbeat timer — is gone: an idle connection is its
transport, a ``WsLink`` and its ``Session``, and one node-wide ``Pinger``
keeps every link's heartbeat. Client frames are few and small (commands), so
the parser is plain Python; frames to the client are prebuilt bytes (see
outbound.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from broker import BrokerUnavailable
from broker.tasks import spawn

from .admission import Gate
from .commands import Commands
from .disconnect import (
    CLIENT_CLOSED,
    GOING_AWAY,
    HEARTBEAT_TIMEOUT,
    INTERNAL,
    NOT_UTF8,
    PROTOCOL_ERROR,
    TOO_BIG,
    UNAVAILABLE,
    Disconnect,
)
from .frames import ws_frame
from .http import SocketWire, free_socket, hard_abort
from .metrics import Metrics
from .session import Session
from .settings import BackpressureSettings, WsSettings

log = logging.getLogger("herald.ws")

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_PING = ws_frame(b"", OP_PING)
# Frames waiting for their command handler; past this the socket is not read.
_INBOX_PAUSE, _INBOX_RESUME = 64, 16
# Sessions being finished (see broker.tasks.spawn).
_finishing: set[asyncio.Task[None]] = set()


def close_frame(reason: Disconnect) -> bytes:
    return ws_frame(reason.code.to_bytes(2, "big") + reason.message.encode()[:123], OP_CLOSE)


def _unmask(mask: bytes | bytearray, data: bytes | bytearray) -> bytes:
    n = len(data)
    if not n:
        return b""
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(n, "little")


@contextlib.contextmanager
def ends_on_failure(session: Session) -> Iterator[None]:
    """A broker outage closes the session 1013; anything else is logged and
    closes it 1011. The node goes on either way."""
    try:
        yield
    except BrokerUnavailable as exc:
        log.warning("connection %s: %s", session.id, exc)
        session.close(UNAVAILABLE)
    except Exception:
        log.exception("connection %s failed", session.id)
        session.close(INTERNAL)


class WsLinks:
    """The links of one node still open, and what they all share."""

    __slots__ = (
        "close_timeout",
        "commands",
        "frame_rejections",
        "gate",
        "links",
        "max_frame",
        "pinger",
        "socket_buffer",
        "write_buffer",
    )

    def __init__(
        self, ws: WsSettings, backpressure: BackpressureSettings, commands: Commands, gate: Gate, metrics: Metrics
    ) -> None:
        self.commands = commands
        self.gate = gate
        self.max_frame = ws.max_frame
        self.close_timeout = ws.close_timeout
        self.write_buffer = backpressure.write_buffer
        self.socket_buffer = backpressure.socket_buffer
        self.frame_rejections = metrics.limit_rejections.labels("frame_size")
        self.links: set[WsLink] = set()
        self.pinger = Pinger(ws.heartbeat, self.links) if ws.heartbeat else None

    async def wait_closed(self) -> None:
        """After the node closed its sessions: give their close handshakes
        ``close_timeout`` to finish (aiohttp does not know these sockets)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.close_timeout + 0.5
        while self.links and loop.time() < deadline:
            await asyncio.sleep(0.02)


class WsLink(SocketWire, asyncio.Protocol):
    """The protocol of one upgraded socket: parses client frames, queues them
    for the command handler in order, answers the close handshake, keeps the
    heartbeat, and is the session's Wire and closer."""

    __slots__ = (
        "_buf",
        "_ctx",
        "_drain",
        "_fragments",
        "_fragments_op",
        "_inbox",
        "_loop",
        "_paused",
        "_reading_paused",
        "_started",
        "_timer",
        "_worker",
        "closing",
        "gone",
        "last_in",
        "peer_closed",
        "ping_at",
        "session",
    )

    def __init__(self, transport: asyncio.Transport, ctx: WsLinks) -> None:
        super().__init__(transport, ctx.write_buffer, ctx.socket_buffer)
        self._ctx = ctx
        self._loop = loop = asyncio.get_running_loop()
        self._buf: bytearray | None = None  # bytes of a frame not yet whole
        self._fragments: bytearray | None = None  # a fragmented message being assembled
        self._fragments_op = 0
        self._inbox: list[tuple[int, Any]] | None = None  # frames for the command handler
        self._worker: asyncio.Task[None] | None = None
        self._reading_paused = False
        self._paused = False  # the transport's write buffer is above its limit
        self._drain: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._started = False  # the handler has set the session up (or given up)
        self.session: Session | None = None
        self.closing = False  # our close frame is out (or the socket aborted)
        self.peer_closed = False  # the client's close frame (or a protocol error) came
        self.gone = False
        self.last_in = loop.time()
        self.ping_at = 0.0
        transport.set_protocol(self)
        ctx.links.add(self)
        if ctx.pinger is not None:
            ctx.pinger.start()

    # -- reading --------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.last_in = self._loop.time()
        self.ping_at = 0.0  # any data proves the peer alive, not only a pong
        if self.peer_closed:
            return
        pending = self._buf
        if pending is not None:  # a frame arriving in pieces: kept growing in place, not recopied
            pending += data
            buf: bytes | bytearray = pending
        else:
            buf = data
        pos, end = 0, len(buf)
        max_frame = self._ctx.max_frame
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            opcode, size, head = b0 & 0x0F, b1 & 0x7F, pos + 2
            if size == 126:
                if end - head < 2:
                    break
                size, head = int.from_bytes(buf[head : head + 2], "big"), head + 2
            elif size == 127:
                if end - head < 8:
                    break
                size, head = int.from_bytes(buf[head : head + 8], "big"), head + 8
            if b0 & 0x70 or not b1 & 0x80:  # reserved bits (no extension agreed) or an unmasked client frame
                self._fail(PROTOCOL_ERROR)
                return
            if opcode >= OP_CLOSE:
                if not b0 & 0x80 or size > 125 or opcode > OP_PONG:
                    self._fail(PROTOCOL_ERROR)
                    return
            elif opcode > OP_BINARY:
                self._fail(PROTOCOL_ERROR)
                return
            elif size + (len(self._fragments) if opcode == OP_CONTINUATION and self._fragments else 0) > max_frame:
                self._ctx.frame_rejections.inc()
                self._fail(TOO_BIG)
                return
            stop = head + 4 + size
            if end < stop:
                break
            payload = _unmask(buf[head : head + 4], buf[head + 4 : stop])
            pos = stop
            self._frame(b0 & 0x80, opcode, payload)
            if self.peer_closed:
                return
        if pos == end:
            self._buf = None
        elif pending is not None:
            del pending[:pos]
        else:
            self._buf = bytearray(buf[pos:])

    def _frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode in (OP_TEXT, OP_BINARY):
            if self._fragments is not None:  # a new message inside a fragmented one
                self._fail(PROTOCOL_ERROR)
            elif fin:
                self._message(opcode, payload)
            else:
                self._fragments, self._fragments_op = bytearray(payload), opcode
        elif opcode == OP_CONTINUATION:
            fragments = self._fragments
            if fragments is None:
                self._fail(PROTOCOL_ERROR)
                return
            fragments += payload
            if fin:
                self._fragments = None
                self._message(self._fragments_op, bytes(fragments))
        elif opcode == OP_PING:
            self._enqueue(OP_PING, payload)
        elif opcode == OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.peer_closed = True
            self._end(GOING_AWAY if code == 1001 else CLIENT_CLOSED)
        # OP_PONG: data_received already noted the peer alive.

    def _message(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_BINARY:
            self._enqueue(OP_BINARY, payload)
            return
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            self._fail(NOT_UTF8)
            return
        self._enqueue(OP_TEXT, text)

    def _fail(self, reason: Disconnect) -> None:
        """The client broke the protocol (or a limit): nothing more is read."""
        self.peer_closed = True
        self._buf = None
        self._end(reason)

    def _end(self, reason: Disconnect) -> None:
        self._close_all(reason)
        if self.closing and not self.gone:
            # The peer sent its close (or broke the protocol): nothing to wait for.
            self._transport.close()

    def _close_all(self, reason: Disconnect) -> None:
        """Close the session (its queued answers go out first, then our close
        frame), or only the link while there is no session yet."""
        if self.session is not None:
            self.session.close(reason)
        else:
            self.close(reason)

    def _enqueue(self, opcode: int, data: Any) -> None:
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
                        await commands.handle(session, data)
                    elif opcode == OP_BINARY:
                        commands.refuse_binary(session)
                    elif commands.within_rate(session):  # client pings count against the frame budget
                        session.outbound.push(ws_frame(data, OP_PONG))
                    if self._reading_paused and len(inbox) <= _INBOX_RESUME and not self.gone:
                        self._reading_paused = False
                        self._transport.resume_reading()
        finally:
            self._worker = None
            if not inbox:
                self._inbox = None

    # -- life -----------------------------------------------------------------

    def start(self) -> None:
        """The handler is done setting up (the session attached, or not made):
        queued frames are handled from now on, and a lost socket ends the session."""
        self._started = True
        if self.gone or self.closing:
            self._finish()
        elif self._inbox:
            self._start_worker()

    def close(self, reason: Disconnect) -> None:
        """Close with ``reason`` (the session's closer): the close frame after
        what is queued; the peer gets ``close_timeout`` to read it and answer."""
        if self.closing or self.gone:
            return
        self.closing = True
        if reason is HEARTBEAT_TIMEOUT:  # 1006 is never sent: the peer is not there to read it
            hard_abort(self._transport)
        else:
            self._transport.write(close_frame(reason))
            self._timer = self._loop.call_later(self._ctx.close_timeout, self._give_up)
        if self._started:
            self._finish()  # its channels are released now, not when the peer is done reading

    def _give_up(self) -> None:
        self._timer = None
        if not self.gone:
            free_socket(self._transport)

    def heartbeat(self, now: float, interval: float) -> None:
        """A ping when the peer was quiet for ``interval``; closed if the last
        ping went unanswered."""
        if self.ping_at:
            self._close_all(HEARTBEAT_TIMEOUT)
        elif now - self.last_in >= interval and not self.closing:
            self.ping_at = now
            self._transport.write(_PING)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.gone = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake_drain()
        self._ctx.links.discard(self)
        session = self.session
        if session is not None and session.active:
            session.close(CLIENT_CLOSED)  # the peer went without a close frame
        if self._started:
            self._finish()

    def _finish(self) -> None:
        session = self.session
        if session is None:
            return
        self.session = None
        worker = self._worker
        if worker is not None and worker is not asyncio.current_task():
            worker.cancel()
        spawn(_finishing, self._finished(session, worker))

    async def _finished(self, session: Session, worker: asyncio.Task[None] | None) -> None:
        if worker is not None and not worker.done():
            await asyncio.wait([worker])  # a command mid-way ends before the channels are released
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
            if self._drain is None:
                self._drain = self._loop.create_future()
            await self._drain
        if self.gone or self._transport.is_closing():
            raise ConnectionResetError("connection closing")


class Pinger:
    """One timer keeps every link's heartbeat: a tick each half ``interval``
    pings the links quiet for ``interval`` and closes those that did not
    answer the ping of the tick before."""

    __slots__ = ("_links", "_timer", "interval")

    def __init__(self, interval: float, links: set[WsLink]) -> None:
        self.interval = interval
        self._links = links
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Tick while there are links (a new link calls this)."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval / 2, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if not self._links:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for link in list(self._links):
            link.heartbeat(now, self.interval)
        self._timer = loop.call_later(self.interval / 2, self._tick)
