"""The node's NATS connection as the broker's roles see it."""

from __future__ import annotations

from nats.js import JetStreamContext

from .base import BrokerUnavailable
from .dispatch import DispatchingClient
from .inbox import ReplyInbox


class NatsLink:
    """Holds the client once connected; every role asks it for the client (or
    JetStream) and gets BrokerUnavailable at once while NATS is away."""

    __slots__ = ("js", "nc", "replies")

    def __init__(self) -> None:
        self.nc: DispatchingClient | None = None
        self.js: JetStreamContext | None = None
        # One reply inbox for the roles' requests (history pages, publish acks, other nodes' answers).
        self.replies = ReplyInbox(self.client)

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    def client(self) -> DispatchingClient:
        if self.nc is None or not self.nc.is_connected:
            raise BrokerUnavailable("NATS is not connected")
        return self.nc

    def jetstream(self) -> JetStreamContext:
        if self.js is None or not self.connected:
            raise BrokerUnavailable("NATS is not connected")
        return self.js
