"""An in-memory broker with the same behaviour as the NATS one, for unit tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from .base import (
    BrokerStats,
    BrokerUnavailable,
    Delivery,
    DeliveryCallback,
    History,
    KickCallback,
    Replay,
    TooManyConnections,
)
from .channels import DEFAULT_EVENT
from .history import retain
from .interest import Interest


class MemoryBroker:
    def __init__(
        self, on_delivery: DeliveryCallback, unsubscribe_delay: float = 0.0, history: History | None = None
    ) -> None:
        self._on_delivery = on_delivery
        self._history = history or History()
        self._reads: dict[str, int] = {}
        self._present: dict[str, set[str]] = {}
        self._conns: dict[str, list[str]] = {}
        self.kick: KickCallback = lambda conn: None
        self._log: list[Delivery] = []
        self._last_on_channel: dict[str, int] = {}
        self._subscribed: set[str] = set()
        self._interest = Interest(self._acquire, self._release, unsubscribe_delay)
        self._stats = BrokerStats()
        self.available = True

    @property
    def ready(self) -> bool:
        return self.available

    async def start(self) -> None:
        self._stats.connected = True

    async def _acquire(self, channel: str) -> None:
        self._subscribed.add(channel)

    async def _release(self, channel: str) -> None:
        self._subscribed.discard(channel)

    async def want(self, channel: str) -> None:
        await self._interest.want(channel)

    async def unwant(self, channel: str) -> None:
        await self._interest.unwant(channel)

    def _check(self) -> None:
        if not self.available:
            raise BrokerUnavailable("broker unavailable")

    def _emit(self, delivery: Delivery) -> None:
        self._stats.messages_received += 1
        if delivery.channel in self._subscribed:
            # Deliver on a later loop pass, as a network broker would.
            asyncio.get_running_loop().call_soon(self._on_delivery, delivery)

    async def publish(self, channel: str, payload: bytes, event: str | None = None) -> int:
        self._check()
        seq = len(self._log) + 1
        delivery = Delivery(
            channel,
            seq,
            self._last_on_channel.get(channel, 0),
            time.time(),
            event or DEFAULT_EVENT,
            payload,
        )
        self._last_on_channel[channel] = seq
        self._log.append(delivery)
        self._emit(delivery)
        return seq

    async def publish_ephemeral(self, channel: str, payload: bytes, event: str | None = None) -> None:
        self._check()
        self._emit(Delivery(channel, 0, 0, time.time(), event or DEFAULT_EVENT, payload))

    async def replay(self, channels: Sequence[str], after_seq: int, limit: int) -> Replay:
        self._check()
        wanted = set(channels)
        found = [d for d in self._log[after_seq:] if d.channel in wanted]
        return retain(found, self._history, limit, time.time())

    async def read_position(self, user: str) -> int:
        self._check()
        return self._reads.get(user, 0)

    async def open_connection(self, user: str, conn: str, limit: int, close_oldest: bool) -> None:
        conns = self._conns.setdefault(user, [])
        if len(conns) >= limit:
            if not close_oldest:
                raise TooManyConnections(f"at most {limit} connections per user")
            for victim in conns[: len(conns) + 1 - limit]:
                conns.remove(victim)
                self.kick(victim)
        conns.append(conn)

    def close_connection(self, user: str, conn: str) -> None:
        conns = self._conns.get(user, [])
        if conn in conns:
            conns.remove(conn)

    def mark_present(self, channel: str, user: str, present: bool) -> None:
        users = self._present.setdefault(channel, set())
        if present:
            users.add(user)
        else:
            users.discard(user)

    async def members(self, channel: str) -> list[str]:
        self._check()
        return sorted(self._present.get(channel, ()))

    async def mark_read(self, user: str, seq: int) -> int:
        self._check()
        position = self._reads[user] = max(seq, self._reads.get(user, 0))
        return position

    def stats(self) -> BrokerStats:
        self._stats.connected = self.available
        self._stats.subscriptions = len(self._subscribed)
        return self._stats

    async def close(self) -> None:
        await self._interest.release_all()
