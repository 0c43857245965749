"""The live flow: interest-counted subscriptions to live subjects, decoding,
gap repair, and publishing (``NatsPubSub``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import nats.errors

from .acks import MSG_ID, AckedPublisher, Outgoing
from .base import BrokerStats, BrokerUnavailable, Delivery, Kind, Publishable, Published
from .channels import DEFAULT_EVENT, EVENT_HEADER, FROM_HEADER, Channel, Subjects, event_of, is_user, sender_of
from .coalesce import Fresh
from .dispatch import DispatchingClient, LiveSubscription
from .interest import Interest
from .link import NatsLink
from .presence import PRESENCE_HEADER
from .roles import BrokerEvents, History
from .sequencer import Sequencer
from .timestamps import parse_rfc3339

# Interest key of the shared user subscription; never a valid channel name.
ALL_USERS = "user:*"


@dataclass(frozen=True, slots=True)
class LiveOptions:
    """How channels are subscribed and messages published."""

    stream: str
    subjects: Subjects
    publish_timeout: float = 5.0
    unsubscribe_delay: float = 1.0
    # One wildcard subscription for all user channels instead of one per user
    # (each costs nats-py a task and a queue, ~5 KiB): for nodes that serve
    # most of the users, at the price of receiving every user's messages.
    shared_user_subscription: bool = False
    max_repair: int = 10_000
    # Seconds the stream remembers a message id: a keyed publish is sent again
    # while unacked only if a repeat is sure to be known (longer than the timeout).
    dedup_window: float = 120.0


class NatsPubSub:
    """``broker.roles.PubSub``: one NATS subscription per wanted channel; each
    live message is decoded and handed, gap-free, to ``events.deliver``."""

    def __init__(
        self,
        link: NatsLink,
        options: LiveOptions,
        events: BrokerEvents,
        history: History,
        stats: BrokerStats,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._link = link
        # Now on the stream's clock: an ephemeral message, which the stream
        # never stamped, is stamped with it on arrival (for its latency).
        self._now = now
        self._options = options
        self._subjects = options.subjects
        self._stats = stats
        self._subs: dict[str, LiveSubscription] = {}
        self._interest = Interest(self._subscribe, self._unsubscribe, options.unsubscribe_delay)
        self.sequencer = Sequencer(events.deliver, events.lost, history.replay, stats, max_repair=options.max_repair)
        self._position = history.position
        # Channels newly wanted whose start the sequencer does not know yet (see live).
        self._fresh: list[Channel] = []
        self._receive = self.sequencer.receive
        # Channels wanted (reference counted): the ones whose flow is kept gap-free.
        self._wanted: dict[Channel, int] = {}
        self._acks = AckedPublisher(
            link, options.stream, options.publish_timeout, keyed_resend=options.dedup_window > options.publish_timeout
        )
        # One PING/PONG confirms every subscription made before it was sent (a connect storm makes many).
        self._confirm = Fresh(self._round_trip)
        self._queued = -1  # the inbox's count of requests when the last SUB was queued (see live)
        self._confirm_timeout = max(1, int(options.publish_timeout))

    @property
    def subscriptions(self) -> int:
        return len(self._subs)

    @property
    def atomic_batches(self) -> bool:
        """publish_batch stores all of a batch or none (the stream allows atomic batches)."""
        return self._acks.atomic

    @atomic_batches.setter
    def atomic_batches(self, allowed: bool) -> None:
        self._acks.atomic = allowed

    def _interest_key(self, channel: Channel) -> str:
        if self._options.shared_user_subscription and is_user(channel):
            return ALL_USERS
        return channel

    async def want(self, channel: Channel) -> None:
        self._interest.want(self._interest_key(channel))
        count = self._wanted.get(channel, 0)
        self._wanted[channel] = count + 1
        if not count:
            self.sequencer.track(channel)
            self._fresh.append(channel)

    async def unwant(self, channel: Channel) -> None:
        count = self._wanted.get(channel, 0)
        if count <= 1:
            self._wanted.pop(channel, None)
            self.sequencer.untrack(channel)
        else:
            self._wanted[channel] = count - 1
        self._interest.unwant(self._interest_key(channel))

    def _client(self) -> DispatchingClient:
        # Not link.client(): while NATS reconnects, nats-py buffers the SUB
        # and sends it on reconnecting, which is what a want() then needs.
        nc = self._link.nc
        if nc is None:
            raise BrokerUnavailable("NATS is not connected")
        return nc

    async def live(self, position: int | None = None) -> None:
        """Channels new to this node start their gap checks at ``position``,
        the stream's last sequence read after their SUBs (else read now):
        a message of theirs stored later comes live, or its loss is seen."""
        fresh, self._fresh = self._fresh, []
        if fresh:
            if position is None:
                try:
                    position = await self._position()  # asked after the SUBs
                except BrokerUnavailable:
                    self._fresh = fresh + self._fresh
                    raise
            for channel in fresh:
                self.sequencer.start(channel, position)
        # Often known already: the connect's other requests, made after its
        # SUBs, were answered. Else one PING/PONG for every SUB before it.
        if self._link.replies.seen(self._queued):
            return
        try:
            async with asyncio.timeout(self._confirm_timeout):
                await self._confirm.get()  # a round trip that starts after this call
        except (TimeoutError, nats.errors.Error, BrokerUnavailable) as exc:
            raise BrokerUnavailable(f"subscribe not confirmed: {exc.__class__.__name__}") from None

    def _subscribe(self, key: str) -> None:
        nc = self._client()
        handle = self._handle
        if key == ALL_USERS:
            channel_of = self._subjects.channel_of

            def on_message(subject: bytes, data: bytes, headers: dict[str, str] | None) -> None:
                handle(channel_of(subject.decode()), data, headers)

            subject = self._subjects.live_family("user")
        else:
            channel = cast(Channel, key)  # the key of a channel is that channel (see _interest_key)

            def on_message(subject: bytes, data: bytes, headers: dict[str, str] | None) -> None:
                handle(channel, data, headers)

            subject = self._subjects.live_subject(channel)
        try:
            self._subs[key] = nc.subscribe_soon(subject, on_message)
        except nats.errors.Error as exc:
            raise BrokerUnavailable(f"cannot subscribe: {exc.__class__.__name__}") from None
        self._queued = self._link.replies.mark()

    async def _round_trip(self) -> None:
        replies = self._link.replies
        number = replies.number()
        await self._client().confirm(self._confirm_timeout)
        replies.answered(number)

    def _unsubscribe(self, key: str) -> None:
        sub = self._subs.pop(key, None)
        nc = self._link.nc
        if sub is not None and nc is not None:
            nc.unsubscribe_soon(sub)

    def _handle(self, channel: Channel | None, data: bytes, headers: dict[str, str] | None) -> None:
        self._stats.messages_received += 1
        if channel is None:  # a live subject we cannot map (not published by the stream)
            self._stats.malformed_messages += 1
            return
        try:
            delivery = _decode(channel, data, headers, self._now)
        except (ValueError, KeyError):
            self._stats.malformed_messages += 1
            return
        self._receive(delivery)

    async def publish(
        self, channel: Channel, payload: bytes, event: str | None = None, sender: str | None = None
    ) -> int:
        (ack,) = await self._acks.publish([self._outgoing(Publishable(channel, payload, event, sender=sender))])
        return ack.seq

    async def publish_batch(self, items: Sequence[Publishable]) -> list[Published]:
        return await self._acks.publish([self._outgoing(item) for item in items])

    def _outgoing(self, item: Publishable) -> Outgoing:
        headers = _headers(item.event, item.sender)
        if item.msg_id is not None:
            headers[MSG_ID] = item.msg_id  # a repeat is not stored: the node may send it again
        return self._subjects.input_subject(item.channel), item.payload, headers or None

    async def publish_ephemeral(
        self, channel: Channel, payload: bytes, event: str | None = None, sender: str | None = None
    ) -> None:
        nc = self._link.client()
        await nc.publish(self._subjects.live_subject(channel), payload, headers=_headers(event, sender) or None)

    async def close(self) -> None:
        """Drop the subscriptions (their UNSUBs queued: nothing waits on NATS) and stop repairing."""
        self._interest.release_all()
        self.sequencer.close()


_ANNOUNCED = {"join": Kind.JOIN, "leave": Kind.LEAVE}


def _headers(event: str | None, sender: str | None) -> dict[str, str]:
    """A message's own headers, stored or live: its event name and the client who published it."""
    headers = {EVENT_HEADER: event} if event else {}
    if sender is not None:
        headers[FROM_HEADER] = sender
    return headers


def _decode(channel: Channel, data: bytes, headers: dict[str, str] | None, now: Callable[[], float]) -> Delivery:
    if not headers:
        return Delivery(channel, 0, 0, now(), DEFAULT_EVENT, data)
    event = event_of(headers)
    sender = sender_of(headers)
    seq_text = headers.get("Nats-Sequence")
    if seq_text is None:  # ephemeral: published straight to the live subject
        kind = _ANNOUNCED.get(headers.get(PRESENCE_HEADER, ""), Kind.MESSAGE)
        return Delivery(channel, 0, 0, now(), event, data, kind, sender)
    stamp = headers.get("Nats-Time-Stamp")
    return Delivery(
        channel,
        int(seq_text),
        int(headers.get("Nats-Last-Sequence") or 0),
        parse_rfc3339(stamp) if stamp else now(),
        event,
        data,
        sender=sender,
    )
