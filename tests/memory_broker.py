"""An in-memory broker with the same behaviour as the NATS one, by role, for
unit tests of the gateway core (no nats-server)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Sequence

from broker import (
    BrokerEvents,
    BrokerStats,
    BrokerUnavailable,
    Channel,
    Delivery,
    Kick,
    NodeGone,
    Publishable,
    Published,
    Replay,
    RetentionPolicy,
    TooManyConnections,
)
from broker.channels import DEFAULT_EVENT
from broker.history import retain
from broker.interest import Interest


class MemoryStream:
    """The stream, the interest and the availability every role shares."""

    def __init__(self, events: BrokerEvents, unsubscribe_delay: float, retention: RetentionPolicy) -> None:
        self.events = events
        self.retention = retention
        self.log: list[Delivery] = []
        self.last_on_channel: dict[Channel, int] = {}
        self.subscribed: set[str] = set()
        self.interest = Interest(self._acquire, self._release, unsubscribe_delay)
        self.stats = BrokerStats()
        self.available = True

    def _acquire(self, key: str) -> None:
        self.subscribed.add(key)

    def _release(self, key: str) -> None:
        self.subscribed.discard(key)

    def check(self) -> None:
        if not self.available:
            raise BrokerUnavailable("broker unavailable")

    def emit(self, delivery: Delivery) -> None:
        self.stats.messages_received += 1
        if delivery.channel in self.subscribed:
            # Deliver on a later loop pass, as a network broker would.
            asyncio.get_running_loop().call_soon(self.events.deliver, delivery)


class MemoryPubSub:
    def __init__(self, stream: MemoryStream) -> None:
        self._stream = stream
        self._keys: dict[str, int] = {}  # msg id → sequence (no window: a test's life is short)

    async def want(self, channel: Channel) -> None:
        self._stream.interest.want(channel)

    async def live(self, position: int | None = None) -> None:
        pass  # an interest is live once wanted

    async def unwant(self, channel: Channel) -> None:
        self._stream.interest.unwant(channel)

    async def publish(
        self, channel: Channel, payload: bytes, event: str | None = None, sender: str | None = None
    ) -> int:
        s = self._stream
        s.check()
        seq = len(s.log) + 1
        last = s.last_on_channel.get(channel, 0)
        delivery = Delivery(channel, seq, last, time.time(), event or DEFAULT_EVENT, payload, sender=sender)
        s.last_on_channel[channel] = seq
        s.log.append(delivery)
        s.emit(delivery)
        return seq

    async def publish_batch(self, items: Sequence[Publishable]) -> list[Published]:
        done = []
        for item in items:
            first = self._keys.get(item.msg_id) if item.msg_id is not None else None
            if first is not None:
                done.append(Published(first, duplicate=True))
                continue
            seq = await self.publish(item.channel, item.payload, item.event, item.sender)
            if item.msg_id is not None:
                self._keys[item.msg_id] = seq
            done.append(Published(seq))
        return done

    async def publish_ephemeral(
        self, channel: Channel, payload: bytes, event: str | None = None, sender: str | None = None
    ) -> None:
        self._stream.check()
        self._stream.emit(Delivery(channel, 0, 0, time.time(), event or DEFAULT_EVENT, payload, sender=sender))


class MemoryHistory:
    def __init__(self, stream: MemoryStream) -> None:
        self._stream = stream

    async def replay(
        self, channels: Sequence[Channel], after_seq: int, limit: int, lasts: Sequence[int] | None = None
    ) -> Replay:
        s = self._stream
        s.check()
        wanted = set(channels)
        found = [d for d in s.log[after_seq:] if d.channel in wanted]
        return retain(found, s.retention, limit, time.time())

    async def last(self, channel: Channel) -> int:
        self._stream.check()
        return max((d.seq for d in self._stream.log if d.channel == channel), default=0)

    async def page(self, channel: Channel, before: int | None, limit: int) -> list[Delivery]:
        s = self._stream
        s.check()
        rule = s.retention.of(channel)
        held = [d for d in s.log if d.channel == channel][-rule.max_msgs :]
        now = time.time()
        older = [d for d in held if (before is None or d.seq < before) and now - d.ts <= rule.max_age]
        return older[-limit:] if limit else []

    async def position(self, max_age: float = 0.0) -> int:
        self._stream.check()
        return len(self._stream.log)


class MemoryReads:
    def __init__(self, stream: MemoryStream) -> None:
        self._stream = stream
        self._positions: dict[str, int] = {}

    async def position(self, user: str) -> int:
        self._stream.check()
        return self._positions.get(user, 0)

    async def advance(self, user: str, seq: int) -> int:
        self._stream.check()
        position = self._positions[user] = max(seq, self._positions.get(user, 0))
        return position


class MemoryPresence:
    def __init__(self, stream: MemoryStream) -> None:
        self._stream = stream
        self._present: dict[Channel, set[str]] = {}

    def mark(self, channel: Channel, user: str, present: bool) -> None:
        users = self._present.setdefault(channel, set())
        if present:
            users.add(user)
        else:
            users.discard(user)

    async def members(self, channel: Channel) -> list[str]:
        self._stream.check()
        return sorted(self._present.get(channel, ()))


class MemoryConnections:
    def __init__(self, stream: MemoryStream) -> None:
        self._stream = stream
        self._conns: dict[str, list[str]] = {}

    async def open(self, user: str, conn: str, limit: int, close_oldest: bool, replaces: str | None = None) -> None:
        conns = self._conns.setdefault(user, [])
        if replaces in conns:
            conns.remove(replaces)
            self._stream.events.kick(replaces, Kick.REPLACES)
        if len(conns) >= limit:
            if not close_oldest:
                raise TooManyConnections(f"at most {limit} connections per user")
            for victim in conns[: len(conns) + 1 - limit]:
                conns.remove(victim)
                self._stream.events.kick(victim, Kick.OLDEST)
        conns.append(conn)

    def close(self, user: str, conn: str) -> None:
        conns = self._conns.get(user, [])
        if conn in conns:
            conns.remove(conn)

    async def settle(self, timeout: float, counting: Collection[asyncio.Future[None]] | None = None) -> None:
        pass


class MemoryRelay:
    """One node alone: no other node answers; asking all asks this one."""

    max_answer = 1 << 20

    def __init__(self, stream: MemoryStream) -> None:
        self._stream = stream

    async def ask(self, node: str, body: bytes, timeout: float) -> bytes:
        raise NodeGone(f"node {node} is not running")

    async def ask_all(self, body: bytes, timeout: float) -> tuple[list[bytes], bool]:
        self._stream.check()
        return [await self._stream.events.request(body)], True


class MemoryBroker:
    """Every role over one in-memory stream (see ``broker.roles.Broker``)."""

    def __init__(
        self, events: BrokerEvents, unsubscribe_delay: float = 0.0, retention: RetentionPolicy | None = None
    ) -> None:
        self._stream = stream = MemoryStream(events, unsubscribe_delay, retention or RetentionPolicy())
        self.pubsub = MemoryPubSub(stream)
        self.history = MemoryHistory(stream)
        self.reads = MemoryReads(stream)
        self.presence = MemoryPresence(stream)
        self.connections = MemoryConnections(stream)
        self.relay = MemoryRelay(stream)

    @property
    def log(self) -> list[Delivery]:
        """Everything stored, in sequence order."""
        return self._stream.log

    @property
    def available(self) -> bool:
        return self._stream.available

    @available.setter
    def available(self, value: bool) -> None:
        self._stream.available = value

    @property
    def ready(self) -> bool:
        return self._stream.available

    async def start(self) -> None:
        self._stream.stats.connected = True

    def stats(self) -> BrokerStats:
        s = self._stream
        s.stats.connected = s.available
        s.stats.subscriptions = len(s.subscribed)
        return s.stats

    async def close(self) -> None:
        self._stream.interest.release_all()
