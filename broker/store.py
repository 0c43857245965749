"""Reading the stream back: stored messages after a position (``NatsHistory``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from .base import BrokerUnavailable, Delivery, Replay, RetentionPolicy
from .channels import Channel, Subjects, event_of
from .coalesce import Fresh
from .history import retain, stream_cap
from .link import NatsLink
from .lookup import LastMessage, stream_bounds
from .pages import DirectReader, Pager
from .snapshot import read_snapshot, snapshot_config


async def read_stored(
    js: JetStreamContext,
    stream: str,
    filters: Sequence[str],
    after_seq: int,
    limit: int,
    name: str,
    channel_of: Callable[[str], Channel | None],
    timeout: float,
) -> list[Delivery]:
    """Stored messages on ``filters`` after ``after_seq``, oldest first, at most ``limit``."""
    config = snapshot_config(name, list(filters), start_seq=after_seq + 1)
    try:
        return await read_snapshot(js, stream, config, lambda msg: _stored(msg, channel_of), limit, timeout)
    except (TimeoutError, nats.errors.Error) as exc:
        raise BrokerUnavailable(f"reading the stream failed: {exc.__class__.__name__}: {exc}") from None


def _stored(msg: Msg, channel_of: Callable[[str], Channel | None]) -> Delivery | None:
    channel = channel_of(msg.subject)
    if channel is None:
        return None
    meta = msg.metadata
    return Delivery(channel, meta.sequence.stream, 0, meta.timestamp.timestamp(), event_of(msg.headers or {}), msg.data)


async def last_sequence(leader: LastMessage, subject: str) -> int | None:
    """The last sequence stored on ``subject``: 0 if none, None if unknown.
    Asked of the stream leader: a direct get may be answered by a replica
    that is behind, and "nothing after the position" from it would skip
    messages the publisher already has acks for (ADR-31: stale reads)."""
    try:
        stored = await leader.get(subject)
    except BrokerUnavailable:
        return None  # no answer, an error, an odd reply: read the stream instead
    return 0 if stored is None else stored.seq or None


@dataclass(frozen=True, slots=True)
class StreamPlace:
    """Where the stream is and how long a read of it may take."""

    stream: str
    subjects: Subjects
    retention: RetentionPolicy
    request_timeout: float
    replay_timeout: float


class NatsHistory:
    """``broker.roles.History`` over the JetStream stream."""

    def __init__(self, link: NatsLink, place: StreamPlace) -> None:
        self._link = link
        self._place = place
        self._pages = DirectReader(link, place.stream, place.request_timeout)
        # Buffered while NATS reconnects, as js.get_msg was (within the request timeout).
        self._leader = LastMessage(link.replies, place.stream, place.request_timeout, direct=False, buffered=True)
        # Asked on every connect (the welcome's position, a resume's first
        # sequence): one request shared by a burst of them.
        self._bounds = Fresh(self._ask_bounds)

    async def replay(self, channels: Sequence[Channel], after_seq: int, limit: int) -> Replay:
        p = self._place
        self._link.jetstream()  # fails at once while NATS is away
        read_limit = len(channels) * stream_cap(p.retention)  # all the stream holds for them
        try:
            async with asyncio.timeout(p.replay_timeout):
                if len(channels) == 1:
                    # One channel (the inbox, a subscribe): a look at its last
                    # message (asked of the leader, see last_sequence) usually
                    # shows there is nothing to read. If one is held, nothing
                    # after the position was evicted either (eviction takes the
                    # oldest first); if none is, the stream may have dropped them all.
                    subject = p.subjects.input_subject(channels[0])
                    last = await last_sequence(self._leader, subject)
                    if last == 0 and after_seq > 0:
                        gone = after_seq + 1 < await self._first_sequence()
                        return Replay([], frozenset(channels) if gone else frozenset())
                    if last is not None and last <= after_seq:
                        return Replay([])
                if after_seq > 0:
                    found, first = await asyncio.gather(
                        self._fetch(channels, after_seq, read_limit), self._first_sequence()
                    )
                else:
                    found, first = await self._fetch(channels, after_seq, read_limit), 0
        except TimeoutError:
            raise BrokerUnavailable(f"replay took longer than {p.replay_timeout:g}s") from None
        # Messages after the position that the stream dropped as a whole (age,
        # size): any of these channels may have had some.
        evicted = channels if after_seq + 1 < first else ()
        return retain(found, p.retention, limit, time.time(), evicted)

    async def page(self, channel: Channel, before: int | None, limit: int) -> list[Delivery]:
        p = self._place
        js = self._link.jetstream()
        subject = p.subjects.input_subject(channel)
        pager = Pager(self._pages, subject, channel)
        try:
            async with asyncio.timeout(p.replay_timeout):
                try:
                    last = int((await js.get_msg(p.stream, subject=subject, direct=True)).seq or 0)
                except nats.js.errors.NotFoundError:
                    last = 0
                return await pager.page(last, before, limit, p.retention.of(channel), time.time())
        except (TimeoutError, nats.errors.Error) as exc:
            raise BrokerUnavailable(f"reading history failed: {exc.__class__.__name__}") from None

    async def position(self) -> int:
        return (await self._bounds.get())[1]

    async def _first_sequence(self) -> int:
        """The lowest sequence the stream still holds."""
        return (await self._bounds.get())[0]

    async def _ask_bounds(self) -> tuple[int, int]:
        self._link.jetstream()  # fails at once while NATS is away
        return await stream_bounds(self._link.replies, self._place.stream, self._place.request_timeout)

    async def _fetch(self, channels: Sequence[Channel], after_seq: int, limit: int) -> list[Delivery]:
        """Stored messages of ``channels`` after ``after_seq``, oldest first, at most ``limit``."""
        js = self._link.jetstream()
        nc = self._link.client()
        subjects = self._place.subjects
        return await read_stored(
            js,
            self._place.stream,
            [subjects.input_subject(c) for c in channels],
            after_seq,
            limit,
            nc._nuid.next().decode(),
            subjects.channel_of,
            self._place.request_timeout,
        )
