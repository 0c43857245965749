"""The seam between the gateway and a message broker."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .channels import glob_match


@dataclass(frozen=True, slots=True)
class Delivery:
    """One decoded message for a channel.

    ``seq`` is the global stream sequence (0 for ephemeral messages, which have
    none), ``prev_seq`` the previous sequence on the same channel (0 if unknown),
    ``ts`` the time the stream stored it (unix seconds).
    """

    channel: str
    seq: int
    prev_seq: int
    ts: float
    event: str
    payload: bytes


DeliveryCallback = Callable[[Delivery], None]
# Called with a channel whose live flow lost messages the broker could not
# recover from the stream: its subscribers must be told (a reset).
LossCallback = Callable[[str], None]
KickCallback = Callable[[str], None]


class TooManyConnections(Exception):
    """The user has as many connections as allowed (policy refuse-new)."""


@dataclass(frozen=True, slots=True)
class Retention:
    """How much of one channel family a replay may hand out."""

    max_msgs: int
    max_age: float


@dataclass(frozen=True, slots=True)
class History:
    """Retention per channel family; ``broadcast`` counts as a room."""

    user: Retention = Retention(50, 7 * 86400.0)
    room: Retention = Retention(1000, 86400.0)
    # (room id glob, retention) in order: the first that matches a room wins.
    rooms: tuple[tuple[str, Retention], ...] = ()

    def of(self, channel: str) -> Retention:
        if channel.startswith("user:"):
            return self.user
        if self.rooms and channel.startswith("room:"):
            room = channel[5:]
            for pattern, retention in self.rooms:
                if glob_match((pattern,), room):
                    return retention
        return self.room

    def _all(self) -> list[Retention]:
        return [self.user, self.room, *(r for _, r in self.rooms)]

    @property
    def max_msgs(self) -> int:
        return max(r.max_msgs for r in self._all())

    @property
    def max_age(self) -> float:
        return max(r.max_age for r in self._all())


@dataclass(frozen=True, slots=True)
class Replay:
    """What a replay found: the deliveries, oldest first, and the channels for
    which messages after the position are no longer held (retention, or more
    than the replay limit) — their subscribers must be told."""

    deliveries: list[Delivery]
    lost: frozenset[str] = frozenset()


class BrokerUnavailable(Exception):
    """The broker cannot take the request now (disconnected, no ack in time)."""


@dataclass(slots=True)
class BrokerStats:
    """Plain counters; the gateway exports them as metrics."""

    connected: bool = False
    subscriptions: int = 0
    messages_received: int = 0
    reconnects: int = 0
    slow_consumer_errors: int = 0
    malformed_messages: int = 0
    gap_repairs: int = 0
    gap_repaired_messages: int = 0
    gaps_lost: int = 0
    duplicates_dropped: int = 0


class Broker(Protocol):
    """What the gateway needs from a broker. Deliveries go to the callback the
    broker was built with, synchronously, one at a time."""

    @property
    def ready(self) -> bool:
        """Connected and the stream exists: the node can serve."""
        ...

    async def start(self) -> None: ...

    async def want(self, channel: str) -> None:
        """Start delivering ``channel`` (reference counted)."""
        ...

    async def unwant(self, channel: str) -> None:
        """Drop one reference to ``channel``."""
        ...

    async def publish(self, channel: str, payload: bytes, event: str | None = None) -> int:
        """Store a message in the stream; returns its sequence once acked."""
        ...

    async def publish_ephemeral(self, channel: str, payload: bytes, event: str | None = None) -> None:
        """Deliver to whoever is connected now; never stored, no sequence."""
        ...

    async def replay(self, channels: Sequence[str], after_seq: int, limit: int) -> Replay:
        """Stored messages of ``channels`` with sequence > ``after_seq``, oldest
        first, within each family's retention and at most ``limit`` (the newest)."""
        ...

    async def read_position(self, user: str) -> int:
        """The user's read position (0 if never set), cluster-wide."""
        ...

    async def mark_read(self, user: str, seq: int) -> int:
        """Move the read position forward to ``seq`` (never back); returns it."""
        ...

    def mark_present(self, channel: str, user: str, present: bool) -> None:
        """``user`` has (or no longer has) a connection on room ``channel`` on
        this node. Never waits: written to the cluster in the background."""
        ...

    async def members(self, channel: str) -> list[str]:
        """Users with a connection on room ``channel`` on any live node, sorted."""
        ...

    # Called with the id of a local connection the cluster asks to close
    # (another node admitted a newer one of its user: close-oldest).
    kick: KickCallback

    async def open_connection(self, user: str, conn: str, limit: int, close_oldest: bool) -> None:
        """Count a new connection of ``user`` cluster-wide. At ``limit``: raise
        TooManyConnections, or (``close_oldest``) have the oldest closed."""
        ...

    def close_connection(self, user: str, conn: str) -> None:
        """The connection is gone (in the background)."""
        ...

    def stats(self) -> BrokerStats: ...

    async def close(self) -> None: ...
