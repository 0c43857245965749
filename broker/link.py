"""The node's NATS connection as the broker's roles see it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection
from typing import Any

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

    async def wait_connected(self, tasks: Collection[asyncio.Future[Any]], timeout: float) -> None:
        """Wait for ``tasks`` at most ``timeout`` seconds, and no longer than
        NATS stays connected: what they write would only time out once it
        left (a node stopped together with its nats-server: a Ctrl-C to both)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending = set(tasks)
        while pending and self.connected:
            left = deadline - loop.time()
            if left <= 0:
                return
            _, pending = await asyncio.wait(pending, timeout=min(left, 0.1))

    def fail(self, reason: str) -> None:
        """NATS closed the connection for good: every request waiting fails
        now, not at its timeout — the reply inbox's with
        BrokerUnavailable(``reason``), nats-py's own (JetStream's API, KV)
        with ConnectionClosedError."""
        self.replies.fail(reason)
        if self.nc is not None:
            self.nc.fail_requests()

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
