"""Gap repair: every sequence of a held channel delivered once, in order.

Each live message carries the previous sequence stored on its subject. When
that is past the last one delivered on the channel, messages were missed (the
node was a slow consumer at the NATS level, or NATS reconnected): the missing
range is fetched from the stream and delivered before anything newer. While a
repair runs, every live delivery waits in one backlog, so the node's order is
kept across channels too. After a reconnect the same repair runs for every
held channel from the highest sequence seen, which also covers channels that
get nothing new afterwards.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from .base import BrokerStats, BrokerUnavailable, Delivery, Replay
from .channels import Channel

log = logging.getLogger("herald.broker")

# Stored messages of channels after a sequence, oldest first, at most n (the
# newest), and the channels for which some are no longer held: History.replay.
Fetch = Callable[[Sequence[Channel], int, int], Awaitable[Replay]]

# Channels per fetch when catching up after a reconnect (one consumer each).
CATCH_UP_BATCH = 256


class Sequencer:
    """Owns each wanted channel's last delivered sequence and the backlog that
    waits while a gap is repaired."""

    def __init__(
        self,
        deliver: Callable[[Delivery], None],
        lose: Callable[[Channel], None],
        fetch: Fetch,
        stats: BrokerStats,
        max_repair: int = 10_000,
        max_backlog: int = 100_000,
        retry_wait: float = 0.5,
        attempts: int = 3,
    ) -> None:
        self._deliver = deliver
        self._lose = lose
        self._fetch = fetch
        self._stats = stats
        self._max_repair = max_repair  # messages one repair may fetch; more is a reset
        self._max_backlog = max_backlog
        self._retry_wait = retry_wait
        self._attempts = attempts
        # Held channels → last sequence delivered (0: none yet).
        self._last: dict[Channel, int] = {}
        # Held channels with none delivered yet → the stream's last sequence
        # when their subscription was live (``start``): the first message's
        # previous one past it was missed.
        self._starts: dict[Channel, int] = {}
        self._backlog: list[Delivery] | None = None
        self._pending: list[tuple[list[Channel], int]] = []
        self._task: asyncio.Task[None] | None = None
        self._paused = False
        self.high = 0  # the highest sequence delivered

    @property
    def repairing(self) -> bool:
        return self._backlog is not None

    def start_at(self, seq: int) -> None:
        """The stream's last sequence when the node starts: a catch-up after a
        reconnect starts there if nothing was delivered live since."""
        self.high = max(self.high, seq)

    def track(self, channel: Channel) -> None:
        self._last.setdefault(channel, 0)

    def start(self, channel: Channel, seq: int) -> None:
        """``channel``'s subscription was live when the stream's last sequence
        was ``seq``: check its first message against that. The earliest
        start counts (a later one would pass over what an earlier joiner is owed)."""
        if self._last.get(channel) == 0:
            self._starts[channel] = min(seq, self._starts.get(channel, seq))

    def untrack(self, channel: Channel) -> None:
        self._last.pop(channel, None)
        self._starts.pop(channel, None)

    def receive(self, d: Delivery) -> None:
        """A live delivery, in the order NATS sent it."""
        backlog = self._backlog
        if backlog is not None and d.seq:
            backlog.append(d)
            if len(backlog) > self._max_backlog:
                self._overflow()
            return
        self._accept(d)

    def _accept(self, d: Delivery) -> None:
        seq = d.seq
        if seq:
            last = self._last.get(d.channel)
            if last is not None:
                if seq <= last:
                    self._stats.duplicates_dropped += 1
                    return
                after = last or self._starts.pop(d.channel, d.prev_seq)
                if d.prev_seq > after:
                    self._repair([d.channel], after, d)
                    return
                self._last[d.channel] = seq
            if seq > self.high:
                self.high = seq
        self._deliver(d)

    def pause(self) -> None:
        """Hold live deliveries back (disconnected: until ``catch_up``). What
        waited is dropped: the catch-up fetches it again, with what is stored
        while away (kept, its first entry would make the catch-up take that
        for live and skip it)."""
        self._paused = True
        self._backlog = []

    def catch_up(self) -> None:
        """After a reconnect: fetch what every held channel missed meanwhile,
        then release what waited."""
        self._paused = False
        channels = list(self._last)
        if channels:
            for i in range(0, len(channels), CATCH_UP_BATCH):
                self._repair(channels[i : i + CATCH_UP_BATCH], self.high, None)
        if self._task is None:
            self._release()

    def restart(self) -> None:
        """The stream started over: no sequence seen so far means anything now.
        Subscribers are told (what they held before may be gone)."""
        self.high = 0
        self._starts.clear()
        channels = list(self._last)
        for channel in channels:
            self._last[channel] = 0
        # Deliveries waiting were numbered by the new stream: keep them.
        for channel in channels:
            self._stats.gaps_lost += 1
            self._lose(channel)

    def _repair(self, channels: list[Channel], after: int, first: Delivery | None) -> None:
        if self._backlog is None:
            self._backlog = []
        if first is not None:
            self._backlog.append(first)
        self._pending.append((channels, after))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while self._pending:
                channels, after = self._pending.pop(0)
                await self._repair_one(channels, after)
                if not self._pending:
                    self._release()
        finally:
            self._task = None

    async def _repair_one(self, channels: list[Channel], after: int) -> None:
        self._stats.gap_repairs += 1
        replay: Replay | None = None
        for attempt in range(self._attempts):
            try:
                # One more than the limit: the message that revealed the gap is not missing.
                replay = await self._fetch(channels, after, self._max_repair + 1)
                break
            except BrokerUnavailable as exc:
                log.warning("gap repair of %d channel(s) after %d failed: %s", len(channels), after, exc)
                if attempt + 1 < self._attempts:
                    await asyncio.sleep(self._retry_wait)
        if replay is None:
            self._give_up(channels, after)
            return
        last = self._last
        for channel in sorted(replay.lost):
            # Part of the gap is no longer held (or it is longer than max_repair).
            if channel in last:
                self._stats.gaps_lost += 1
                self._lose(channel)
        # Everything from the first waiting delivery on comes live (it was
        # subscribed before that one was published): deliver only what is
        # older, so the node's order holds across channels.
        backlog = self._backlog
        bound = backlog[0].seq if backlog else None
        repaired = 0
        for d in replay.deliveries:
            if bound is not None and d.seq >= bound:
                break
            known = last.get(d.channel)
            if known is None or d.seq <= known:
                continue  # no longer held, or delivered already
            last[d.channel] = d.seq
            if d.seq > self.high:
                self.high = d.seq
            repaired += 1
            self._deliver(d)
        self._stats.gap_repaired_messages += repaired
        if repaired:
            log.info("gap repair: %d message(s) recovered on %d channel(s)", repaired, len(channels))

    def _give_up(self, channels: Sequence[Channel], after: int) -> None:
        log.error("gap after %d on %d channel(s) not repaired: subscribers get a reset", after, len(channels))
        for channel in channels:
            if channel in self._last:
                self._stats.gaps_lost += 1
                self._last[channel] = 0  # continuity restarts with the next message
                self._lose(channel)

    def _release(self) -> None:
        """Deliver what waited, in order; a new gap in it starts another repair."""
        if self._paused:
            return  # until catch_up()
        backlog, self._backlog = self._backlog or [], None
        for i, d in enumerate(backlog):
            self._accept(d)
            if self._backlog is not None:  # d revealed another gap and waits in the new backlog
                self._backlog.extend(backlog[i + 1 :])
                return

    def _overflow(self) -> None:
        """The backlog outgrew its bound (NATS unreachable for long): what it
        held is dropped, and its channels' subscribers are told."""
        backlog, self._backlog = self._backlog or [], []
        self._give_up(sorted({d.channel for d in backlog}), self.high)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
