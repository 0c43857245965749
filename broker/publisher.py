"""Publishing from a backend straight through NATS, with retry.

    async with NatsPublisher(["nats://10.0.0.5:4222"]) as pub:
        msg_id = await pub.publish("user:alice", {"title": "Invoice paid"}, event="notice")

The message goes to the input subject and is stored by the stream (the
publish waits for its ack), so connected clients get it live and the others
find it when they resume. ``gateway.client.HttpPublisher`` does the same
through a node's HTTP API.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import orjson

from .base import BrokerUnavailable, MessageTooLarge, Publishable
from .channels import InvalidChannel, Subjects, check_event, parse_channel
from .jetstream import NatsBroker, NatsConfig
from .roles import BrokerEvents


def retry_delays(attempts: int, base: float, cap: float = 5.0) -> Iterator[float]:
    """Sleeps between ``attempts`` tries: exponential, capped, full jitter."""
    for attempt in range(attempts - 1):
        yield random.uniform(0, min(cap, base * 2**attempt))


def encode(data: Any) -> bytes:
    """Bytes are sent as they are; anything else as JSON."""
    return data if isinstance(data, bytes) else orjson.dumps(data)


class NatsPublisher:
    """Publishes into the stream from a backend (a short-lived connection of its own).
    ``timeout`` bounds the connect and, unless ``publish_timeout`` does, each
    publish's wait for its ack."""

    def __init__(
        self,
        urls: list[str] | tuple[str, ...] = ("nats://127.0.0.1:4222",),
        prefix: str = "herald",
        stream: str = "HERALD",
        attempts: int = 5,
        backoff: float = 0.2,
        timeout: float = 5.0,
        publish_timeout: float | None = None,
    ) -> None:
        config = NatsConfig(
            urls=tuple(urls),
            name="herald-publisher",
            subjects=Subjects(prefix, f"{prefix}_live"),
            stream=stream,
            connect_timeout=timeout,
            publish_timeout=timeout if publish_timeout is None else publish_timeout,
        )
        self._config = config
        self._broker = NatsBroker(config, _UNHEARD)
        self._attempts = attempts
        self._backoff = backoff

    async def connect(self) -> None:
        # Never creates or changes the stream: the nodes own its limits.
        await self._broker.start(manage_stream=False)

    async def publish(
        self, channel: str, data: Any, event: str | None = None, idempotency_key: str | None = None
    ) -> int:
        """Store one message; returns its id once acked. Retries while NATS
        does not answer; raises BrokerUnavailable after the last try, and
        InvalidChannel at once for a bad channel or event name, MessageTooLarge
        at once for a message over NATS max_payload.
        ``idempotency_key``: a repeat within the stream's duplicate window
        (publish.dedup_window) is not stored again and returns the first id —
        so these retries (and the caller's) publish once."""
        target = parse_channel(channel)
        if event is not None:
            check_event(event)
        if idempotency_key is not None and not 0 < len(idempotency_key) <= 128:
            raise InvalidChannel("idempotency_key must be 1 to 128 characters")
        item = Publishable(target, encode(data), event, idempotency_key)
        for delay in [*retry_delays(self._attempts, self._backoff), None]:
            try:
                if self._broker.closed_for_good:
                    await self._reconnect()
                return (await self._broker.pubsub.publish_batch([item]))[0].seq
            except MessageTooLarge:
                raise
            except BrokerUnavailable:
                if delay is None:
                    raise
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _reconnect(self) -> None:
        """A new connection for one nats-py closed for good (on a server's
        -ERR such as maximum connections exceeded): it never reconnects."""
        closed, self._broker = self._broker, NatsBroker(self._config, _UNHEARD)
        await closed.close()
        await self.connect()

    async def close(self) -> None:
        await self._broker.close()

    async def __aenter__(self) -> NatsPublisher:
        await self.connect()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def _ignore(*_: object) -> None:
    """A publisher wants no channel: nothing is delivered, lost or kicked."""


async def _unaddressed(_: bytes) -> bytes:
    """A publisher does not listen for requests: none reaches it."""
    return b""


_UNHEARD = BrokerEvents(_ignore, _ignore, _ignore, _unaddressed)
