"""The seam between the gateway and a broker, by role.

Each role is a small protocol the gateway part that needs it is handed at
construction: the fan-out wants channels (``PubSub``), opening and resuming
read the stream (``History``), the inbox keeps read positions
(``ReadPositions``), rooms count their members (``Presence``), admission
counts connections per user (``Connections``), and a node asks another one
something (``Relay``). What the broker has to tell the
gateway goes to one ``BrokerEvents`` object given to the broker when it is
built, never assigned afterwards. No NATS type appears here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from .base import BrokerStats, Delivery, Kick, Publishable, Published, Replay
from .channels import Channel


@dataclass(frozen=True, slots=True)
class BrokerEvents:
    """What a broker tells the gateway, given to it when it is built. Each is
    called synchronously, one at a time, in the order the broker learns of
    it; never awaited."""

    # A live delivery of a wanted channel, gap-free and in stream order.
    deliver: Callable[[Delivery], None]
    # Messages of a channel were lost in transit and cannot be recovered from
    # the stream: its subscribers must be told (a reset).
    lost: Callable[[Channel], None]
    # Close the local connection with this id: the cluster admitted a newer
    # one of its user (why: to make room, or its client named it).
    kick: Callable[[str, Kick], None]
    # Answer a request another node addressed to this one (``Relay.ask``):
    # the one event that is awaited, each in a task of its own.
    request: Callable[[bytes], Awaitable[bytes]]
    # This node's wall clock minus the stream's (nats-server's, which stamps
    # the messages), in seconds, each time the broker reads it anew.
    clock_offset: Callable[[float], None] = lambda _: None
    # The connection ended for good (why, in words): no reconnect follows
    # (nats-py closes on the server's -ERR, e.g. maximum subscriptions or
    # connections exceeded). None: the broker logs it, and is unavailable.
    closed: Callable[[str], None] | None = None


class PubSub(Protocol):
    """Live flow of channels, and publishing into them."""

    async def want(self, channel: Channel) -> None:
        """Start delivering ``channel`` (reference counted). The interest is
        on its way to the broker: ``live`` says when it is there."""

    async def live(self, position: int | None = None) -> None:
        """Returns once the broker has every interest wanted before the call:
        what is published after is delivered. ``position``: the stream's last
        sequence read after those interests were asked for, if known."""

    async def unwant(self, channel: Channel) -> None:
        """Drop one reference to ``channel``."""

    async def publish(
        self, channel: Channel, payload: bytes, event: str | None = None, sender: str | None = None
    ) -> int:
        """Store a message in the stream; returns its sequence once acked.
        ``sender``: the user publishing it from a client connection."""
        ...

    async def publish_batch(self, items: Sequence[Publishable]) -> list[Published]:
        """Store ``items`` in order, many in flight at once; where each is held
        (a repeat of an ``msg_id`` within the duplicate window is not stored
        again: its first copy's id). All or none are stored where the stream
        takes atomic batches; else one by one, and if BrokerUnavailable is
        raised, those before the failure may be stored."""
        ...

    async def publish_ephemeral(
        self, channel: Channel, payload: bytes, event: str | None = None, sender: str | None = None
    ) -> None:
        """Deliver to whoever is connected now; never stored, no sequence."""


class History(Protocol):
    """What the stream still holds."""

    async def replay(
        self, channels: Sequence[Channel], after_seq: int, limit: int, lasts: Sequence[int] | None = None
    ) -> Replay:
        """Stored messages of ``channels`` with sequence > ``after_seq``, oldest
        first, within each family's retention and at most ``limit`` (the newest).
        ``lasts``: each channel's ``last``, when the caller asked it already."""
        ...

    async def last(self, channel: Channel) -> int:
        """The last sequence stored on ``channel`` (0: none), as the stream's leader says."""
        ...

    async def page(self, channel: Channel, before: int | None, limit: int) -> list[Delivery]:
        """The newest ``limit`` held messages of ``channel`` older than
        ``before`` (None: the newest), oldest first: a page of its history.
        Held: within the channel family's retention, as for a replay."""

    async def position(self, max_age: float = 0.0) -> int:
        """The stream's last sequence (0 while it is empty): asked now, or an
        answer that came at most ``max_age`` seconds before the call."""


class ReadPositions(Protocol):
    """Each user's read position in the stream, cluster-wide."""

    async def position(self, user: str) -> int:
        """The user's read position (0 if never set)."""
        ...

    async def advance(self, user: str, seq: int) -> int:
        """Move the read position forward to ``seq`` (never back); returns it."""
        ...


class Presence(Protocol):
    """Which users are in which room, on any live node."""

    def mark(self, channel: Channel, user: str, present: bool) -> None:
        """``user`` has (or no longer has) a connection on room ``channel`` on
        this node. Never waits: written to the cluster in the background."""

    async def members(self, channel: Channel) -> list[str]:
        """Users with a connection on room ``channel`` on any live node, sorted."""
        ...


class Connections(Protocol):
    """Connections per user, counted cluster-wide."""

    async def open(self, user: str, conn: str, limit: int, close_oldest: bool, replaces: str | None = None) -> None:
        """Count a new connection of ``user``. ``replaces``: a connection the
        client gave up, kicked and counted out in the same write if it is one
        of the user's (else ignored). At ``limit``: raise
        TooManyConnections, or (``close_oldest``) have the oldest kicked."""

    def close(self, user: str, conn: str) -> asyncio.Future[None] | None:
        """The connection is gone (counted out in the background); once per
        connection: a second close of it does nothing. The count-out under
        way, for a caller that waits for it (None: nothing to wait for)."""

    async def settle(self, timeout: float, counting: Collection[asyncio.Future[None]] | None = None) -> None:
        """Returns once ``counting`` (count-outs ``close`` returned; None:
        every one begun before the call) is done, or after ``timeout``
        seconds, or once NATS is away (none can be done)."""


class Relay(Protocol):
    """Requests addressed to one node, answered by that node's
    ``BrokerEvents.request``."""

    @property
    def max_answer(self) -> int:
        """The largest answer a node can send back (bytes): a larger one
        would be dropped on the way, and the asker would time out."""
        ...

    async def ask(self, node: str, body: bytes, timeout: float) -> bytes:
        """The answer of ``node``; NodeGone if no node by that id listens,
        BrokerUnavailable if the broker is away or the node does not answer
        within ``timeout`` seconds."""

    async def ask_all(self, body: bytes, timeout: float) -> tuple[list[bytes], bool]:
        """The answers of every live node (this one's too), and whether every
        one answered within ``timeout`` (False: those that did)."""
        ...


class Broker(Protocol):
    """A broker's life and its roles, for the composition root that builds a node."""

    @property
    def ready(self) -> bool:
        """Connected and the stream exists: the node can serve."""
        ...

    @property
    def pubsub(self) -> PubSub: ...

    @property
    def history(self) -> History: ...

    @property
    def reads(self) -> ReadPositions: ...

    @property
    def presence(self) -> Presence: ...

    @property
    def connections(self) -> Connections: ...

    @property
    def relay(self) -> Relay: ...

    async def start(self) -> None: ...

    def stats(self) -> BrokerStats: ...

    async def close(self) -> None: ...
