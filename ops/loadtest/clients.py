"""One ``asyncio.Protocol`` per connection: WebSocket or SSE, parsed
incrementally in ``data_received`` with no client library in the way.

Each connection tracks the sequence of its room (``SeqTrack``) and records
publish → receive latency into a histogram shared by the run. Stalling
connections stop reading after their first test message and record nothing.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from . import wsproto
from .http1 import ProtocolError, ResponseHead, parse_head, request
from .payload import extract
from .sse import Dechunker, EventParser, event_stream_body, is_message
from .stats import Histogram, SeqTrack
from .target import Endpoint, expand, loopback_url

if TYPE_CHECKING:
    from .cli import Config

WELCOME_EVENT = b"welcome"  # Herald's first event on a stream: the client is admitted

# tcpi_state values (include/net/tcp_states.h) that mean the peer ended the connection.
_TCP_CLOSE, _TCP_CLOSE_WAIT = 7, 8


class ConnectError(Exception):
    """A connection that did not become ready; the message is the reason label."""


class Client(asyncio.Protocol):
    """What WebSocket and SSE connections share: readiness, accounting, closing."""

    __slots__ = (
        "_head",
        "_ours",
        "close_code",
        "close_how",
        "closed_at",
        "connected_at",
        "endpoint",
        "head_at",
        "herald",
        "hist",
        "index",
        "last_rx",
        "open",
        "other",
        "paused",
        "ready",
        "ready_at",
        "resumed",
        "room",
        "stall",
        "started_at",
        "track",
        "transport",
    )

    def __init__(self, index: int, room: int, endpoint: Endpoint, herald: bool, hist: Histogram, stall: bool) -> None:
        self.index = index
        self.room = room
        self.endpoint = endpoint
        self.herald = herald  # Herald envelope: WS frames wrap the payload, control frames are skipped
        self.hist = hist
        self.stall = stall
        self.track = SeqTrack()
        self.other = 0  # frames / events that carried no test payload
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.open = False  # response head accepted
        self.paused = False
        self.resumed = False  # a stalled connection reading again, at the end of the run
        self.last_rx = 0.0  # wall time of the last test message (kept for stalled connections only)
        self.closed_at: float | None = None  # loop time the connection ended
        self.close_how: str | None = None  # "ws 4008", "eof", "reset", "sse end", …
        self.close_code: int | None = None  # a WebSocket close frame's code, whenever one arrives
        self._ours = False
        self._head: bytearray | None = bytearray()
        # time.monotonic() (the same clock in every process) at: the connect's start, the TCP
        # connection made, the response head parsed, ready; 0.0 until then. For the --storm figures.
        self.started_at = self.connected_at = self.head_at = self.ready_at = 0.0

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connected_at = time.monotonic()
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport.write(self._request())

    def data_received(self, data: bytes) -> None:
        if self._head is not None:
            self._head += data
            try:
                head = parse_head(self._head)
                if head is None:
                    return
                rest = bytes(self._head[head.size :])
                self._head = None
                self.head_at = time.monotonic()
                self._on_head(head, rest)
            except ProtocolError as exc:
                self._fail(str(exc))
                return
            if not rest:
                return
            data = rest
        try:
            self._body(data)
        except ProtocolError as exc:
            self._fail(f"protocol error: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended("reset" if exc is not None else "eof")

    # -- for subclasses --------------------------------------------------------

    def _request(self) -> bytes:
        raise NotImplementedError

    def _on_head(self, head: ResponseHead, rest: bytes) -> None:
        raise NotImplementedError

    def _body(self, data: bytes) -> None:
        raise NotImplementedError

    def _goodbye(self) -> bytes:
        return b""

    def _payload(self, data: bytes, now: float) -> bool:
        """A message that may carry a test payload: sequence accounting and
        latency (the hot path). False if it carried none."""
        found = extract(data)
        if found is None:
            return False
        self.track.see(found[0])
        if self.stall:
            self.last_rx = now
            if not self.paused and not self.resumed and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()
        else:
            self.hist.record(now - found[1])
        return True

    def _ready(self) -> None:
        if not self.ready.done():
            self.ready_at = time.monotonic()
            self.ready.set_result(None)

    def _ended(self, how: str) -> None:
        """The connection is over (first reason wins); a pending connect fails with it."""
        if self.closed_at is None:
            self.closed_at = asyncio.get_running_loop().time()
            self.close_how = "client" if self._ours else how
        if not self.ready.done():
            self.ready.set_exception(ConnectError(how))
            self.ready.exception()  # retrieved: no "never retrieved" warning if nobody awaits it

    def _fail(self, reason: str) -> None:
        self._ended(reason)
        if self.transport is not None:
            self.transport.abort()

    # -- for the runner --------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.open and self.closed_at is None

    def probe(self) -> None:
        """For a connection that stopped reading: has the server ended it? (asks the kernel)"""
        if self.closed_at is not None or self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        except (OSError, AttributeError):
            return
        if state == _TCP_CLOSE:
            self._ended("reset while stalled")
        elif state == _TCP_CLOSE_WAIT:
            self._ended("fin while stalled")

    def resume(self) -> None:
        """Read again (at the end of a run, to learn how the server closed a stalled connection)."""
        if self.paused and self.transport is not None and not self.transport.is_closing():
            self.paused = False
            self.resumed = True
            self.transport.resume_reading()

    def close(self) -> None:
        self._ours = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.paused:
            transport.abort()
            return
        goodbye = self._goodbye()
        if goodbye:
            transport.write(goodbye)
        transport.close()


class WsClient(Client):
    """WebSocket: the upgrade by hand, then unmasked server frames."""

    __slots__ = ("_key", "_parser")

    def __init__(self, index: int, room: int, endpoint: Endpoint, herald: bool, hist: Histogram, stall: bool) -> None:
        super().__init__(index, room, endpoint, herald, hist, stall)
        self._key = ""
        self._parser = wsproto.FrameParser()

    def _request(self) -> bytes:
        data, self._key = wsproto.upgrade_request(self.endpoint.host_header, self.endpoint.target)
        return data

    def _on_head(self, head: ResponseHead, rest: bytes) -> None:
        wsproto.check_upgrade(head, self._key)
        self.open = True
        if not self.herald:
            self._ready()  # Herald connections are ready at their welcome frame

    def _body(self, data: bytes) -> None:
        frames = self._parser.feed(data)
        now = time.time()
        herald = self.herald
        for opcode, payload in frames:
            if opcode == wsproto.TEXT or opcode == wsproto.BINARY:
                # Herald's {"type":"message",…,"data":<payload>} is found by the same search.
                if self._payload(payload, now):
                    continue
                if herald and payload.startswith(b'{"type":"welcome"'):
                    self._ready()
                else:
                    self.other += 1  # control frames (ack, error, …), foreign messages
            elif opcode == wsproto.PING:
                if self.transport is not None:
                    self.transport.write(wsproto.client_frame(wsproto.PONG, payload))
            elif opcode == wsproto.CLOSE:
                self.close_code = wsproto.close_code(payload)
                self._ended(f"ws {self.close_code}")
                self.close()  # echo the close and let the server end TCP
                return

    def _goodbye(self) -> bytes:
        return wsproto.close_frame(1000) if self.open else b""


class SseClient(Client):
    """Server-Sent Events: a GET by hand, then an event stream, chunked or
    close-delimited as the response head says. Only ``message`` events (or
    events without a name) can be deliveries: control and presence events
    (Herald's welcome, join, leave, reset, close…) are counted as ``other``.
    A Herald stream is ready at its ``welcome`` event (Herald has admitted the
    client then), any other at its response head."""

    __slots__ = ("_dechunk", "_events")

    def __init__(self, index: int, room: int, endpoint: Endpoint, herald: bool, hist: Histogram, stall: bool) -> None:
        super().__init__(index, room, endpoint, herald, hist, stall)
        self._dechunk: Dechunker | None = None  # None: the body is the raw bytes up to EOF
        self._events = EventParser()

    def _request(self) -> bytes:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        return request("GET", self.endpoint.host_header, self.endpoint.target, headers)

    def _on_head(self, head: ResponseHead, rest: bytes) -> None:
        if head.status != 200:
            body = rest[:160].decode("utf-8", "replace").strip()
            raise ProtocolError(f"http {head.status}" + (f" {body}" if body else ""))
        self._dechunk = event_stream_body(head)
        self.open = True
        if not self.herald:
            self._ready()

    def _body(self, data: bytes) -> None:
        dechunk = self._dechunk
        if dechunk is not None:
            data = dechunk.feed(data)
        events = self._events.feed(data)
        if events:
            now = time.time()
            for _, name, payload in events:
                if not is_message(name) or not self._payload(payload, now):
                    self.other += 1
                    if name == WELCOME_EVENT and self.herald:
                        self._ready()
        if dechunk is not None and dechunk.done:
            self._ended("sse end")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        # A close-delimited body ends with the connection: the server ended the stream.
        if exc is None and self.open and self._dechunk is None:
            self._ended("sse end")
        super().connection_lost(exc)


async def open_connection(client: Client, timeout: float, rcvbuf: int = 0) -> None:
    """Connect ``client`` and wait until it is ready; raises (and cleans up) otherwise.

    With ``rcvbuf`` the socket is made here, so that a small receive buffer is
    set before connecting (it only shapes the TCP window if set before the
    handshake); otherwise the event loop makes and connects it (cheaper: a
    connect storm's generator spends most of its time there).
    """
    loop = asyncio.get_running_loop()
    ep = client.endpoint
    client.started_at = time.monotonic()
    sock: socket.socket | None = None
    transport: asyncio.Transport | None = None
    try:
        async with asyncio.timeout(timeout):
            if rcvbuf:
                sock = socket.socket(ep.family, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                await loop.sock_connect(sock, (ep.address, ep.port))
                transport, _ = await loop.create_connection(lambda: client, sock=sock)
            else:
                transport, _ = await loop.create_connection(lambda: client, ep.address, ep.port, family=ep.family)
            await client.ready
    except BaseException:
        if transport is not None:
            transport.abort()
        elif sock is not None:
            sock.close()
        raise


def describe(exc: BaseException) -> str:
    """A short label for why a connect failed, for counting."""
    if isinstance(exc, ConnectError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, OSError):
        return f"oserror {exc.errno}" if exc.errno else type(exc).__name__
    return type(exc).__name__


def failure_label(exc: BaseException, client: Client) -> str:
    """``describe``, and for Herald a timeout after the head names the missing welcome."""
    label = describe(exc)
    if label == "timeout" and client.open and client.herald:
        what = "upgraded, but no Herald welcome frame" if isinstance(client, WsClient) else "no welcome event"
        label = f"{what} in time (not Herald? try --envelope raw)"
    return label


def new_client(cfg: Config, index: int, token: str, hist: Histogram) -> Client:
    """Connection ``index`` of a run: room ``r{index % rooms}``, its own user (token)."""
    room = index % cfg.rooms
    url = expand(cfg.url, room=f"r{room}", token=token, index=index)
    endpoint = loopback_url(url, ("ws", "http") if cfg.transport == "ws" else ("http",))
    kind = WsClient if cfg.transport == "ws" else SseClient
    return kind(index, room, endpoint, cfg.envelope == "herald", hist, cfg.stalls(index))


def tokens(secret: str | None, indices: Sequence[int]) -> list[str]:
    """A token per connection (user ``u{i}``, every room), minted up front so that
    minting never competes with connecting; empty strings without a secret."""
    if not secret:
        return [""] * len(indices)
    from gateway.auth import mint_token  # only needed with --jwt-secret

    return [mint_token(secret, f"u{i}", rooms=["*"], ttl=3600) for i in indices]
