"""The node's NATS connection as the broker's roles see it."""

from __future__ import annotations

import asyncio
import contextlib

from nats.aio.client import Client
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


async def close_quietly(nc: Client) -> None:
    """Close ``nc``, bounded and whatever it raises: best effort on a
    half-open client (uvloop raises RuntimeError writing to the transport of
    a connection NATS already dropped), which is gone either way."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), timeout=2.0)
