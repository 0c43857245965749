"""The seam between the gateway and a message broker."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


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

    async def replay(self, channels: Sequence[str], after_seq: int, limit: int) -> list[Delivery]:
        """Stored messages of ``channels`` with sequence > ``after_seq``, oldest first."""
        ...

    def stats(self) -> BrokerStats: ...

    async def close(self) -> None: ...
