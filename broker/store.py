"""Reading the stream back: stored messages after a position (``NatsHistory``).

A replay is bounded by the stream leader: each channel's last sequence is
asked of it first, and the read goes at least that far, whichever copy of a
replicated stream answers it (the others may be a moment behind). Channels
with nothing after the position are not read at all; a few messages per
channel are read with batch direct gets; more, or a copy behind, with a
snapshot consumer (snapshot.py). A history page (pages.py) is read against
its channel's last sequence from the leader too, and what a copy behind
lacked is read as a replay reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from .base import BrokerUnavailable, Delivery, Replay, RetentionPolicy
from .channels import Channel, Subjects, event_of, sender_of
from .coalesce import Fresh
from .history import retain, stream_cap
from .link import NatsLink
from .lookup import LastMessage, stream_bounds
from .pages import DirectReader, Pager, Stored
from .server_clock import ServerClock
from .shared import SharedReads
from .snapshot import read_snapshot, snapshot_config

T = TypeVar("T")


async def read_stored(
    js: JetStreamContext,
    stream: str,
    filters: Sequence[str],
    after_seq: int,
    limit: int,
    name: str,
    channel_of: Callable[[str], Channel | None],
    timeout: float,
    reach: Mapping[str, int] | None = None,
) -> list[Delivery]:
    """Stored messages on ``filters`` after ``after_seq``, oldest first, at
    most ``limit``, up to at least ``reach`` (see read_snapshot)."""
    config = snapshot_config(name, list(filters), start_seq=after_seq + 1)
    try:
        return await read_snapshot(js, stream, config, lambda msg: _stored(msg, channel_of), limit, timeout, reach)
    except (TimeoutError, nats.errors.Error) as exc:
        raise BrokerUnavailable(f"reading the stream failed: {exc.__class__.__name__}: {exc}") from None


def _stored(msg: Msg, channel_of: Callable[[str], Channel | None]) -> Delivery | None:
    channel = channel_of(msg.subject)
    if channel is None:
        return None
    meta = msg.metadata
    headers = msg.headers or {}
    stamp = meta.timestamp.timestamp()
    return Delivery(channel, meta.sequence.stream, 0, stamp, event_of(headers), msg.data, sender=sender_of(headers))


async def last_sequence(leader: LastMessage, subject: str) -> int:
    """The last sequence stored on ``subject``, 0 if none; BrokerUnavailable
    if the leader does not say. Asked of the stream leader: any other copy
    may be behind, and "nothing after the position" from it would skip
    messages the publisher already has acks for (ADR-31: stale reads)."""
    stored = await leader.get(subject)
    return 0 if stored is None else stored.seq


async def _each(calls: list[Awaitable[T]]) -> list[T]:
    """Every result, in order: a lone call awaited as it is (the inbox's
    replay on every connect: no task for it), several at once."""
    if len(calls) == 1:
        return [await calls[0]]
    return list(await asyncio.gather(*calls))


# Messages per channel a replay reads with a direct get before it needs a consumer.
DIRECT_BATCH = 100
# Seconds a reading of nats-server's clock is used for (a host's clock steps
# rarely; a step of this host's is seen at once: ServerClock.stepped).
CLOCK_AGE = 30.0
# A direct get answers in milliseconds: a copy that has not within this is
# passed over for the consumer read, not waited for the request timeout —
# unless MAX_CONSUMER_READS are under way: then it is this node that is slow
# to take the answers (a reconnect storm), and a consumer would cost more.
DIRECT_TIMEOUT = 1.0
# Consumer reads one node makes at once; more wait. Each is a consumer on the
# server, which refuses a stream's 1001st (a storm's clients got 1013).
MAX_CONSUMER_READS = 16


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

    def __init__(self, link: NatsLink, place: StreamPlace, clock_offset: Callable[[float], None] | None = None) -> None:
        self._link = link
        self._place = place
        self._pages = DirectReader(link, place.stream, place.request_timeout)
        # Buffered while NATS reconnects, as js.get_msg was (within the request timeout).
        self._leader = LastMessage(link.replies, place.stream, place.request_timeout, buffered=True)
        # Asked on every connect (the welcome's position, a resume's first
        # sequence): one request shared by a burst of them.
        self._bounds = Fresh(self._ask_bounds)
        # nats-server's clock, from the answers of _ask_bounds: messages' ages
        # (the families' max_age) are judged on the clock that stored them.
        self.clock = ServerClock(clock_offset)
        # A room's members resuming together read its missed messages once.
        self._direct_reads: SharedReads[list[Stored]] = SharedReads()
        self._consumer_reads: SharedReads[list[Delivery]] = SharedReads()
        self._consumer_slots = asyncio.Semaphore(MAX_CONSUMER_READS)
        self._late = 0  # direct gets passed over whose consumer reads are not done (see _fetch)

    async def replay(
        self, channels: Sequence[Channel], after_seq: int, limit: int, lasts: Sequence[int] | None = None
    ) -> Replay:
        p = self._place
        self._link.jetstream()  # fails at once while NATS is away
        try:
            async with asyncio.timeout(p.replay_timeout):
                # Each channel's last message, asked of the leader (see
                # last_sequence): the read goes up to it, whichever copy of the
                # stream it reads; and it often shows there is nothing to read.
                subjects = [p.subjects.input_subject(c) for c in channels]
                if lasts is None:
                    lasts = await _each([last_sequence(self._leader, s) for s in subjects])
                # A channel whose last message is at or before the position
                # missed nothing: had any been evicted after it, so would that
                # one (eviction takes the oldest first). One with none may have
                # had them all evicted.
                unread = {s: c for s, c, last in zip(subjects, channels, lasts, strict=True) if last > after_seq}
                empty = [c for c, last in zip(channels, lasts, strict=True) if last == 0]
                reach = {s: last for s, last in zip(subjects, lasts, strict=True) if last}
                if not unread:  # nothing after the position (the inbox, on most connects)
                    if await self._past_the_end(after_seq):
                        # Not a position of this stream (recreated, restored): what its
                        # channels hold now cannot be told apart from what was had.
                        return Replay([], frozenset(channels))
                    gone = bool(empty) and after_seq > 0 and after_seq + 1 < await self._first_sequence()
                    return Replay([], frozenset(empty) if gone else frozenset())
                if after_seq > 0:
                    found, first = await asyncio.gather(self._fetch(unread, after_seq, reach), self._first_sequence())
                else:
                    found, first = await self._fetch(unread, after_seq, reach), 0
        except TimeoutError:
            raise BrokerUnavailable(f"replay took longer than {p.replay_timeout:g}s") from None
        # Messages after the position that the stream dropped as a whole (age,
        # size): any of these channels may have had some.
        evicted = [*unread.values(), *empty] if after_seq + 1 < first else ()
        return retain(found, p.retention, limit, await self._now(), evicted)

    async def page(self, channel: Channel, before: int | None, limit: int) -> list[Delivery]:
        p = self._place
        self._link.jetstream()  # fails at once while NATS is away
        subject = p.subjects.input_subject(channel)

        async def read_up_to(after_seq: int, reach: int) -> list[Delivery]:
            return await self._fetch({subject: channel}, after_seq, {subject: reach})

        pager = Pager(self._pages, subject, channel, read_up_to)
        try:
            async with asyncio.timeout(p.replay_timeout):
                # Asked of the leader, as for a replay: the page holds every
                # message up to it, whichever copy its direct gets read.
                last = await last_sequence(self._leader, subject)
                return await pager.page(last, before, limit, p.retention.of(channel), await self._now())
        except (TimeoutError, nats.errors.Error) as exc:
            raise BrokerUnavailable(f"reading history failed: {exc.__class__.__name__}") from None

    async def position(self, max_age: float = 0.0) -> int:
        return (await self._bounds.recent(max_age))[1]

    async def last(self, channel: Channel) -> int:
        self._link.jetstream()  # fails at once while NATS is away
        return await last_sequence(self._leader, self._place.subjects.input_subject(channel))

    async def _past_the_end(self, seq: int) -> bool:
        """Whether ``seq`` is past the stream's last sequence (a recent answer
        says no for most; a fresh one confirms a yes: the stream only grows)."""
        return seq > (await self._bounds.recent(1.0))[1] and seq > (await self._bounds.get())[1]

    async def _first_sequence(self) -> int:
        """The lowest sequence the stream still holds."""
        return (await self._bounds.get())[0]

    def clock_due(self) -> bool:
        """Whether nats-server's clock is to be read again: this host's clock
        stepped since the last reading, or that reading is CLOCK_AGE old.
        Asked on every scrape, so that a step is seen even while nothing else
        asks the stream anything — but not read on every scrape: each reading
        is a STREAM.INFO on the stream's leader (100 nodes scraped every second
        asked it 100 times a second). The price: a step of nats-server's own
        clock is seen within CLOCK_AGE on a node that asks the stream nothing
        else (any connect, replay or history page reads it sooner)."""
        return self.clock.stepped() or self.clock.age() > CLOCK_AGE

    async def read_clock(self) -> None:
        """Read nats-server's clock again, unless read in the last second (or,
        with no step of this host's clock, in the last CLOCK_AGE seconds: an
        answer too slow for a reading is not asked again at once)."""
        with contextlib.suppress(BrokerUnavailable):
            await self._bounds.recent(1.0 if self.clock.stepped() else CLOCK_AGE)

    async def _now(self) -> float:
        """Now on nats-server's clock, as a STREAM.INFO of the last CLOCK_AGE seconds has it."""
        with contextlib.suppress(BrokerUnavailable):
            await self._bounds.recent(CLOCK_AGE)
        return self.clock.now()

    async def _ask_bounds(self) -> tuple[int, int]:
        self._link.jetstream()  # fails at once while NATS is away
        return await stream_bounds(self._link.replies, self._place.stream, self._place.request_timeout, self.clock)

    async def _fetch(self, channels: Mapping[str, Channel], after_seq: int, reach: dict[str, int]) -> list[Delivery]:
        """Every stored message of ``channels`` (by input subject) after
        ``after_seq``, oldest first, up to at least ``reach`` (subject → sequence).
        Channels a direct get reads whole come from it; the others, from one consumer."""
        late = 0  # this fetch's direct gets passed over for the consumer read

        def patient() -> bool:
            """Whether a direct get not answered within DIRECT_TIMEOUT is waited
            for: when as many consumer reads are owed as may run at once, it is
            this node that is slow to take answers, not a copy silent."""
            nonlocal late
            if self._late >= MAX_CONSUMER_READS:
                return True
            self._late += 1
            late += 1
            return False

        try:
            direct = await self._read_direct(channels, after_seq, reach, patient)
            found = [d for stored in direct.values() for d in stored]
            rest = {s: c for s, c in channels.items() if s not in direct}
            if rest:
                found += await self._read_consumer(rest, after_seq, {s: reach[s] for s in rest})
        finally:
            self._late -= late
        if len(channels) > 1:
            found.sort(key=lambda d: d.seq)
        return found

    async def _read_direct(
        self, channels: Mapping[str, Channel], after_seq: int, reach: dict[str, int], patient: Callable[[], bool]
    ) -> dict[str, list[Delivery]]:
        """What most replays need — a few messages per channel — read with one
        batch direct get each: no consumer to create and delete (on a cluster,
        each is a proposal of its meta leader). Any copy of the stream may
        answer, but a copy's log is a prefix of the leader's: one that holds
        ``reach`` holds everything before it. The channels read whole (by
        subject): not those on a copy behind, or with more than a batch after
        the position."""
        reads = await _each([self._read_one(s, c, after_seq, reach[s], patient) for s, c in channels.items()])
        whole: dict[str, list[Delivery]] = {}
        for subject, stored in zip(channels, reads, strict=True):
            if stored and stored[-1].delivery.seq >= reach[subject]:
                whole[subject] = [s.delivery for s in stored]
        return whole

    async def _read_one(
        self, subject: str, channel: Channel, after_seq: int, reach: int, patient: Callable[[], bool]
    ) -> list[Stored]:
        """One channel's batch direct get, shared (SharedReads); empty if it failed."""

        def start() -> Awaitable[list[Stored]]:
            return self._pages.read(subject, channel, after_seq + 1, DIRECT_BATCH, DIRECT_TIMEOUT, patient)

        try:
            return await self._direct_reads.read((subject, after_seq), {subject: reach}, start)
        except BrokerUnavailable:
            return []

    async def _read_consumer(
        self, channels: Mapping[str, Channel], after_seq: int, reach: dict[str, int]
    ) -> list[Delivery]:
        js = self._link.jetstream()
        nc = self._link.client()

        async def start() -> list[Delivery]:
            async with self._consumer_slots:
                return await read_stored(
                    js,
                    self._place.stream,
                    list(channels),
                    after_seq,
                    len(channels) * stream_cap(self._place.retention),  # all the stream holds for them
                    nc._nuid.next().decode(),
                    self._place.subjects.channel_of,
                    self._place.request_timeout,
                    reach,
                )

        # Shared: the list is read, never changed, by its callers.
        return await self._consumer_reads.read((frozenset(channels), after_seq), reach, start)
