"""The sessions open on this node."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Iterator

from broker import Kick

from .auth import Identity
from .disconnect import CLIENT_CLOSED, RECONNECTED, REPLACED, SHUTDOWN, Disconnect
from .flusher import Flusher
from .metrics import Metrics
from .outbound import QueueLimits
from .session import Session, State
from .transports.contract import Transport

log = logging.getLogger("herald.node")


class Sessions:
    """Owns the set of this node's sessions: opens them (with their ids and
    queues), finds one by id, counts them out, and closes them all on a drain."""

    def __init__(self, node_id: str, flusher: Flusher, limits: QueueLimits, metrics: Metrics) -> None:
        self._node_id = node_id
        self._flusher = flusher
        self._limits = limits
        self._metrics = metrics
        self._open: set[Session] = set()
        self._by_id: dict[str, Session] = {}
        # From a random start: a restarted node (the same node id) hands out
        # none of its predecessor's ids, which clients may still name (replaces=).
        self._ids = itertools.count(random.randrange(1, 1 << 32))
        # Set once the node drains: new streams are refused from then on.
        self.draining = False
        self._waited = False  # a close_all waited its grace: those still open were given it

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[Session]:
        return iter(self._open)

    def new_id(self) -> str:
        return f"{self._node_id}:{next(self._ids)}"

    def open(self, conn_id: str, identity: Identity, transport: Transport) -> Session:
        session = Session(
            conn_id, identity, transport, self._flusher, self._limits, self._metrics.transport[transport.name]
        )
        self._open.add(session)
        self._by_id[conn_id] = session
        return session  # a connection (opened, the gauge) once its welcome goes out

    def remove(self, session: Session, reason: Disconnect) -> bool:
        """Mark ``session`` closed and count it out; False if it was already.
        One that ended before its welcome was a stream refused while joining
        (docs/protocol.md 8): never a connection, counted as a refusal by its
        label (unless its client just left)."""
        if session.state is State.CLOSED:
            return False
        final = session.closed(reason)
        self._open.discard(session)
        self._by_id.pop(session.id, None)
        if session.welcomed:
            session.metrics.connections.dec()
            self._metrics.count_closed(session.transport.name, final.label)
        elif final.label != CLIENT_CLOSED.label:
            self._metrics.refused.labels(session.transport.name, final.label).inc()
        return True

    def get(self, conn_id: str) -> Session | None:
        """The open session with that id, if it is on this node."""
        return self._by_id.get(conn_id)

    def of_user(self, user: str) -> list[Session]:
        """The user's open sessions on this node (a scan: for rare admin actions)."""
        return [s for s in self._open if s.user == user and s.active]

    def kick(self, conn_id: str, why: Kick) -> None:
        """The cluster admitted a newer connection of this one's user: to make
        room for it, or its client named this one as the stream it gave up."""
        session = self._by_id.get(conn_id)
        if session is not None:
            session.close(RECONNECTED if why is Kick.REPLACES else REPLACED)

    async def close_all(self, spread: float, grace: float) -> None:
        """Tell every client 1012 / end its SSE stream, each with its own
        reconnect delay within ``spread`` seconds so other nodes are not hit
        by all of them at once; returns when all are gone or after ``grace``."""
        spread_ms = int(spread * 1000)
        told = [session for session in self._open if session.active]
        for session in told:
            session.close(SHUTDOWN.reconnect_in(random.randint(0, spread_ms)) if spread_ms else SHUTDOWN)
        if self._waited and not told:
            return  # called again (the run loop, then aiohttp's on_shutdown): no second grace for the same ones
        deadline = time.monotonic() + grace
        while self._open and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._waited = True
        if self._open:
            log.info("%d connections did not close within the grace; they end with the process", len(self._open))
