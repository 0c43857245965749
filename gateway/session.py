"""One client connection: identity, channels, outbound queue, state, and the
live deliveries it holds aside while a replay runs.

A session does not know which transport carries it: it writes through its
``Transport`` (transports/contract.py) and ends it with a Disconnect. Everything the client
receives — deliveries, acks, errors — goes through the one bounded queue, so
ordering is the order in which they are queued.
"""

from __future__ import annotations

import asyncio
import enum
import time
from typing import Any

from broker import Channel, Delivery

from .auth import Identity
from .disconnect import SLOW_CONSUMER, STALLED, TOKEN_EXPIRED, Disconnect
from .flusher import Flusher
from .frames import Codec
from .limits import CommandLimiter
from .metrics import TransportMetrics
from .outbound import LIVE, REPLAYED, Outbound, QueueLimits
from .transports.contract import Transport

# A live delivery held while a replay runs, or a control frame about the live flow (a reset) in its place.
Held = Delivery | bytes


class State(enum.Enum):
    """Where a session is in its life: connecting → open → closing → closed."""

    CONNECTING = "connecting"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Session:
    """Owns one connection's identity, channels, queue and state, and what it
    holds aside while a replay runs."""

    __slots__ = (
        "_expiry",
        "channels",
        "codec",
        "disconnect",
        "early",
        "floors",
        "gated",
        "granted",
        "held",
        "id",
        "identity",
        "joining",
        "limiter",
        "outbound",
        "replaying",
        "state",
        "transport",
    )

    def __init__(
        self,
        conn_id: str,
        identity: Identity,
        transport: Transport,
        flusher: Flusher,
        limits: QueueLimits,
        metrics: TransportMetrics,
    ) -> None:
        self.id = conn_id
        self.identity = identity
        self.transport = transport
        # Read per recipient by the fan-out: kept here, not looked up on the transport.
        self.codec: Codec = transport.codec
        self.outbound = Outbound(transport, flusher, limits, metrics, self._on_overflow)
        self.channels: set[Channel] = set()
        # Rooms the backend joined it to (POST /api/subscribe): a refresh keeps
        # them, whatever the new token allows.
        self.granted: set[Channel] | None = None
        # Rooms that subscribes under way (waiting for a replay to end) will
        # join: they count against limits.max_subscriptions already.
        self.joining: set[Channel] | None = None
        self.state = State.CONNECTING
        self.disconnect: Disconnect | None = None
        # Control frames sent before the welcome (a server-side subscribe, a
        # reset of a channel being joined): they follow it. None once it is out.
        self.early: list[bytes] | None = []
        # Live deliveries held aside while a replay runs (see resume.py), and
        # frames about the live flow (a reset) in their place among them.
        self.held: list[Held] | None = None
        # Per replayed channel, the last sequence the replay sent: live copies
        # at or below it (a gap repair re-sending them) are skipped.
        self.floors: dict[Channel, int] | None = None
        # Whether a live delivery must pass ``pass_live`` (held or floors set):
        # one attribute for the fan-out to read per recipient.
        self.gated = False
        self.limiter: CommandLimiter | None = None  # made on the first command
        # Held while a replay runs (the opening one, a subscribe with since):
        # one at a time, each holding the live flow until it is done (resume.py).
        self.replaying = asyncio.Lock()
        self._expiry: asyncio.TimerHandle | None = None
        self.set_expiry(identity.expires)

    @property
    def user(self) -> str:
        return self.identity.user

    @property
    def metrics(self) -> TransportMetrics:
        """Its transport's metrics (kept by its queue: one reference per session)."""
        return self.outbound.metrics

    @property
    def active(self) -> bool:
        return self.state in (State.CONNECTING, State.OPEN)

    def opened(self) -> None:
        if self.state is State.CONNECTING:
            self.state = State.OPEN

    def send(self, obj: dict[str, Any]) -> None:
        """Queue a control frame (ack, error, pong…); before the welcome, to follow it."""
        frame = self.codec.control(obj)
        if self.early is None:
            self.outbound.push(frame)
        else:
            self.early.append(frame)

    def resume_point(self, seq: int) -> None:
        """Tell the client (if its transport has a way) to resume from ``seq``
        should it get no message before its connection ends."""
        frame = self.codec.resume_point(seq)
        if frame is not None:
            self.outbound.push(frame)

    def send_in_flow(self, obj: dict[str, Any]) -> None:
        """Queue a control frame about the live flow (a reset): while a replay
        holds that flow, after the live deliveries held before it."""
        if self.held is None:
            self.send(obj)
        else:
            self.held.append(self.codec.control(obj))

    @property
    def welcomed(self) -> bool:
        """Whether its welcome went out: from then on it is a connection (before,
        an end is the refusal of a stream that was joining)."""
        return self.early is None

    def welcome(self, obj: dict[str, Any]) -> None:
        """Queue the welcome, always the first frame, then what was sent before
        it; the session counts as an open connection from here."""
        early, self.early = self.early or [], None
        metrics = self.metrics
        metrics.opened.inc()
        metrics.connections.inc()
        self.outbound.push(self.codec.control(obj))
        for frame in early:
            self.outbound.push(frame)

    # -- holding live deliveries while a replay runs ----------------------------

    def start_holding(self) -> None:
        """Live deliveries wait aside from now on, until ``stop_holding``."""
        if self.held is None:
            self.held = []
            self.gated = True

    def pass_live(self, d: Delivery) -> bool:
        """Whether a live delivery goes to the queue now: not while a replay
        runs (it is held, and queued after the replay), nor if a replay sent
        it already. Past ``max_held`` held the session is a slow consumer."""
        held = self.held
        if held is not None:
            if not self.active:
                return False  # closed during its replay: nothing more is held for it
            held.append(d)
            if len(held) > self.outbound.limits.max_held:
                self._on_overflow(False)
            return False
        return not self._replayed(d)

    def _replayed(self, d: Delivery) -> bool:
        floors = self.floors
        return bool(d.seq and floors and d.seq <= floors.get(d.channel, 0))

    def take_held(self) -> list[Held]:
        """What was held so far; holding goes on."""
        held, self.held = self.held or [], []
        return held

    def stop_holding(self) -> list[Held]:
        """What was held; live deliveries are queued directly again."""
        held, self.held = self.held or [], None
        self.gated = self.floors is not None
        return held

    def queue_replayed(self, d: Delivery, frame: bytes | None = None) -> None:
        """Queue a replayed delivery (``frame``: its frame, if made already)."""
        self.outbound.push(self.codec.message(d) if frame is None else frame, REPLAYED)
        floors = self.floors
        if floors is None:
            floors = self.floors = {}
            self.gated = True
        floors[d.channel] = d.seq

    def queue_held(self, d: Held, droppable: bool, frame: bytes | None = None) -> None:
        """Queue a held live delivery, unless a replay sent it already or its
        channel was left meanwhile, or a held control frame."""
        if isinstance(d, bytes):
            self.outbound.push(d)
        elif d.channel in self.channels and not self._replayed(d):
            self.outbound.push(self.codec.message(d) if frame is None else frame, LIVE, d.ts, droppable)

    # -- life ----------------------------------------------------------------------

    def set_expiry(self, expires: float | None) -> None:
        self._cancel_expiry()
        if expires is not None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, expires - time.time())
            self._expiry = loop.call_at(loop.time() + delay, self.close, TOKEN_EXPIRED)

    def _on_overflow(self, stalled: bool) -> None:
        if not self.active:
            return  # closed already: counted then, if for this
        self.metrics.slow_consumer.inc()
        self.close(STALLED if stalled else SLOW_CONSUMER)

    def close(self, reason: Disconnect) -> None:
        """Start closing; idempotent, never blocks. The transport finishes it."""
        if not self.active:
            return
        self.state = State.CLOSING
        self.disconnect = reason
        # One that does not read would not take its messages; its control
        # frames (the welcome above all) still go.
        self.outbound.write_out(messages=reason.label != "slow_consumer")
        self._stop()
        self.transport.close(reason)

    def closed(self, reason: Disconnect) -> Disconnect:
        """Mark the session closed; returns the reason that counts (the first one)."""
        if self.disconnect is None:
            self.disconnect = reason
        self.state = State.CLOSED
        self._stop()
        return self.disconnect

    def _stop(self) -> None:
        """Nothing more goes out and no timer fires for this session."""
        self.outbound.close()
        self._cancel_expiry()

    def _cancel_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
