"""Unit tests of ``broker.sequencer.Sequencer``: every sequence of a held
channel delivered once, in order; gaps fetched back from a (fake) stream;
what cannot be repaired reported as a loss, never skipped silently."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from broker import BrokerStats, BrokerUnavailable, Delivery, Replay
from broker.sequencer import Sequencer

from ..helpers import wait_for


class FakeStream:
    """A list-backed stream: one global sequence, per-channel previous
    sequence on live copies, and a fetch that can be held or made to fail."""

    def __init__(self) -> None:
        self.stored: list[Delivery] = []
        self.calls: list[tuple[tuple[str, ...], int, int]] = []
        self.gate: asyncio.Event | None = None  # fetches wait for it while set
        self.failures = 0  # the next N fetches raise BrokerUnavailable
        self._last: dict[str, int] = {}

    def add(self, channel: str) -> Delivery:
        """Store one message; returns its live copy (with prev_seq)."""
        seq = len(self.stored) + 1
        prev = self._last.get(channel, 0)
        self._last[channel] = seq
        payload = f"{channel}#{seq}".encode()
        self.stored.append(Delivery(channel, seq, 0, 1000.0 + seq, "message", payload))
        return Delivery(channel, seq, prev, 1000.0 + seq, "message", payload)

    def hold(self) -> None:
        self.gate = asyncio.Event()

    def open(self) -> None:
        assert self.gate is not None
        self.gate.set()

    async def fetch(self, channels: Sequence[str], after: int, limit: int) -> Replay:
        """Like ``Broker.replay``: the newest ``limit``, and the channels cut."""
        self.calls.append((tuple(channels), after, limit))
        if self.gate is not None:
            await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise BrokerUnavailable("stream unreachable (fake)")
        wanted = set(channels)
        found = [d for d in self.stored if d.channel in wanted and d.seq > after]
        cut = found[: max(0, len(found) - limit)]
        return Replay(found[len(cut) :], frozenset(d.channel for d in cut))


class Recorder:
    """deliver/lose callbacks writing one ordered log."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, int]] = []

    def deliver(self, d: Delivery) -> None:
        self.log.append(("msg", d.channel, d.seq))

    def lose(self, channel: str) -> None:
        self.log.append(("lost", channel, 0))

    @property
    def seqs(self) -> list[int]:
        return [seq for kind, _, seq in self.log if kind == "msg"]

    def of(self, channel: str) -> list[int]:
        return [seq for kind, ch, seq in self.log if kind == "msg" and ch == channel]

    @property
    def lost(self) -> list[str]:
        return [ch for kind, ch, _ in self.log if kind == "lost"]


def make(
    *channels: str, max_repair: int = 10_000, max_backlog: int = 100_000
) -> tuple[Sequencer, FakeStream, Recorder, BrokerStats]:
    stream, rec, stats = FakeStream(), Recorder(), BrokerStats()
    seq = Sequencer(
        rec.deliver,
        rec.lose,
        stream.fetch,
        stats,
        max_repair=max_repair,
        max_backlog=max_backlog,
        retry_wait=0.01,
    )
    for channel in channels:
        seq.track(channel)
    return seq, stream, rec, stats


async def settled(seq: Sequencer) -> None:
    await wait_for(lambda: not seq.repairing, timeout=3.0, interval=0.001)
    await asyncio.sleep(0)


async def test_in_order_passthrough() -> None:
    seq, stream, rec, stats = make("room:a", "room:b")
    for channel in ["room:a", "room:b", "room:a", "room:a", "room:b"]:
        seq.receive(stream.add(channel))
    assert rec.seqs == [1, 2, 3, 4, 5]
    assert not seq.repairing and stream.calls == []
    assert seq.high == 5
    assert (stats.gap_repairs, stats.gap_repaired_messages, stats.duplicates_dropped, stats.gaps_lost) == (0, 0, 0, 0)


async def test_duplicates_dropped() -> None:
    seq, stream, rec, stats = make("room:a")
    d1, d2 = stream.add("room:a"), stream.add("room:a")
    for d in (d1, d2, d2, d1):
        seq.receive(d)
    assert rec.seqs == [1, 2]
    assert stats.duplicates_dropped == 2
    assert stream.calls == []


async def test_gap_repaired_in_order_later_deliveries_wait() -> None:
    seq, stream, rec, stats = make("room:a", "room:b")
    seq.receive(stream.add("room:a"))  # 1
    stream.add("room:a")  # 2: missed
    stream.add("room:a")  # 3: missed
    stream.hold()
    seq.receive(stream.add("room:a"))  # 4, prev 3: gap
    assert seq.repairing
    await asyncio.sleep(0)
    assert stream.calls == [(("room:a",), 1, 10_001)]
    # While the repair runs, every sequenced live delivery waits (any channel).
    seq.receive(stream.add("room:b"))  # 5
    seq.receive(stream.add("room:a"))  # 6
    await asyncio.sleep(0.01)
    assert rec.seqs == [1]
    stream.open()
    await settled(seq)
    assert rec.of("room:a") == [1, 2, 3, 4, 6]
    assert rec.of("room:b") == [5]
    assert rec.lost == []
    assert stats.gap_repairs == 1
    assert stats.gap_repaired_messages >= 2
    assert stats.gaps_lost == 0
    # Flowing again without a fetch.
    seq.receive(stream.add("room:a"))
    assert rec.of("room:a")[-1] == 7
    assert len(stream.calls) == 1


async def test_repair_keeps_global_order_across_channels() -> None:
    # The docstring's promise ("every live delivery waits in one backlog, so
    # the node's order is kept across channels too") and the contract's
    # "one global sequence ... a single id is a complete resume position".
    seq, stream, rec, _ = make("room:a", "room:b")
    seq.receive(stream.add("room:a"))  # 1
    stream.add("room:a")  # 2: missed
    stream.hold()
    seq.receive(stream.add("room:a"))  # 3: gap → repair (held)
    seq.receive(stream.add("room:b"))  # 4: waits in the backlog
    seq.receive(stream.add("room:a"))  # 5: waits in the backlog
    stream.open()
    await settled(seq)
    assert rec.of("room:a") == [1, 2, 3, 5] and rec.of("room:b") == [4]
    assert rec.seqs == [1, 2, 3, 4, 5], "repair delivered a newer message of its channel before an older one waiting"


async def test_second_gap_found_while_releasing_backlog() -> None:
    seq, stream, rec, stats = make("room:a", "room:b")
    seq.receive(stream.add("room:a"))  # 1
    seq.receive(stream.add("room:b"))  # 2
    stream.add("room:a")  # 3: missed
    stream.hold()
    seq.receive(stream.add("room:a"))  # 4: gap on a
    stream.add("room:b")  # 5: missed too
    seq.receive(stream.add("room:b"))  # 6: a gap on b, found when the backlog is released
    stream.open()
    await settled(seq)
    assert rec.of("room:a") == [1, 3, 4]
    assert rec.of("room:b") == [2, 5, 6]
    assert [c[:2] for c in stream.calls] == [(("room:a",), 1), (("room:b",), 2)]
    assert stats.gap_repairs == 2 and stats.gaps_lost == 0
    assert rec.lost == []


async def test_untracked_channel_passes_unchecked() -> None:
    seq, stream, rec, stats = make("room:a")
    stream.add("room:x")
    d = stream.add("room:x")  # prev 1, never delivered: but nobody holds room:x
    seq.receive(d)
    seq.receive(d)  # not tracked: not de-duplicated either
    assert rec.log == [("msg", "room:x", 2), ("msg", "room:x", 2)]
    assert stream.calls == [] and not seq.repairing
    assert stats.duplicates_dropped == 0


async def test_ephemeral_delivered_immediately_during_repair() -> None:
    seq, stream, rec, _ = make("room:a")
    seq.receive(stream.add("room:a"))  # 1
    stream.add("room:a")  # 2: missed
    stream.hold()
    seq.receive(stream.add("room:a"))  # 3: gap
    assert seq.repairing
    seq.receive(Delivery("room:a", 0, 0, 0.0, "typing", b"{}"))
    seq.receive(Delivery("room:b", 0, 0, 0.0, "typing", b"{}"))
    assert rec.log == [("msg", "room:a", 1), ("msg", "room:a", 0), ("msg", "room:b", 0)]
    stream.open()
    await settled(seq)
    assert rec.of("room:a") == [1, 0, 2, 3]


async def test_fetch_failing_three_times_loses_channel_and_restarts_continuity() -> None:
    seq, stream, rec, stats = make("room:a", "room:b")
    seq.receive(stream.add("room:a"))  # 1
    seq.receive(stream.add("room:b"))  # 2
    stream.add("room:a")  # 3: missed
    stream.failures = 3
    seq.receive(stream.add("room:a"))  # 4: gap, never repaired
    seq.receive(stream.add("room:b"))  # 5: waits meanwhile
    await settled(seq)
    assert len(stream.calls) == 3
    assert rec.log == [
        ("msg", "room:a", 1),
        ("msg", "room:b", 2),
        ("lost", "room:a", 0),  # the reset comes before anything newer on the channel
        ("msg", "room:a", 4),
        ("msg", "room:b", 5),
    ]
    assert stats.gaps_lost == 1 and stats.gap_repaired_messages == 0
    # Continuity restarts from the message after the loss: the next gap is seen again.
    seq.receive(stream.add("room:a"))  # 6, prev 4: fine
    stream.add("room:a")  # 7: missed
    seq.receive(stream.add("room:a"))  # 8: gap → repaired this time
    await settled(seq)
    assert rec.of("room:a") == [1, 4, 6, 7, 8]
    assert stats.gaps_lost == 1


async def test_fetch_failing_twice_then_succeeding_repairs() -> None:
    seq, stream, rec, stats = make("room:a")
    seq.receive(stream.add("room:a"))
    stream.add("room:a")
    stream.failures = 2
    seq.receive(stream.add("room:a"))
    await settled(seq)
    assert len(stream.calls) == 3
    assert rec.of("room:a") == [1, 2, 3] and rec.lost == []
    assert stats.gaps_lost == 0


async def test_more_than_max_repair_missing_loses() -> None:
    seq, stream, rec, stats = make("room:a", max_repair=3)
    seq.receive(stream.add("room:a"))  # 1
    for _ in range(4):  # 2..5 missed: more than max_repair
        stream.add("room:a")
    seq.receive(stream.add("room:a"))  # 6
    await settled(seq)
    # A reset, then the newest max_repair of the gap, then the live flow.
    assert rec.log == [("msg", "room:a", 1), ("lost", "room:a", 0)] + [("msg", "room:a", n) for n in (3, 4, 5, 6)]
    assert stats.gaps_lost == 1
    assert stream.calls[0][2] == 4  # asks for one more than it may repair, to see it is too many


async def test_exactly_max_repair_missing_is_repaired() -> None:
    seq, stream, rec, stats = make("room:a", max_repair=3)
    seq.receive(stream.add("room:a"))  # 1
    for _ in range(3):  # 2..4 missed: exactly max_repair
        stream.add("room:a")
    seq.receive(stream.add("room:a"))  # 5
    await settled(seq)
    assert rec.lost == [] and stats.gaps_lost == 0
    assert rec.of("room:a") == [1, 2, 3, 4, 5]


async def test_backlog_overflow_loses_its_channels() -> None:
    seq, stream, rec, stats = make("room:a", "room:b", max_backlog=3)
    seq.receive(stream.add("room:a"))  # 1
    seq.receive(stream.add("room:b"))  # 2
    stream.add("room:a")  # 3: missed
    stream.hold()
    seq.receive(stream.add("room:a"))  # 4: gap; the repair hangs
    for _ in range(3):  # 5, 6, 7 on b: the backlog (4, 5, 6, 7) outgrows 3
        seq.receive(stream.add("room:b"))
    assert sorted(rec.lost) == ["room:a", "room:b"]
    assert stats.gaps_lost == 2
    assert rec.of("room:b") == [2]
    stream.open()
    await settled(seq)
    # Continuity restarts: what comes next is delivered, after the resets.
    seq.receive(stream.add("room:b"))  # 8
    assert rec.of("room:b")[-1] == 8
    first_reset = rec.log.index(("lost", "room:b", 0))
    assert ("msg", "room:b", 8) in rec.log[first_reset:]
    # Whatever room:a got after its reset is in order and without duplicates.
    after = [s for k, c, s in rec.log[rec.log.index(("lost", "room:a", 0)) :] if k == "msg" and c == "room:a"]
    assert after == sorted(set(after))


async def test_pause_then_catch_up_from_high() -> None:
    seq, stream, rec, stats = make("room:a", "room:b", "room:c")
    seq.receive(stream.add("room:a"))  # 1
    seq.receive(stream.add("room:b"))  # 2
    assert seq.high == 2
    seq.pause()  # disconnected
    stream.add("room:a")  # 3: stored while away
    stream.add("room:b")  # 4: stored while away, nothing follows on b
    stream.add("room:x")  # 5: not held
    stream.add("room:c")  # 6: stored while away, c had nothing before
    # Reconnected: NATS delivers new live messages before the stream is checked.
    seq.receive(stream.add("room:a"))  # 7
    await asyncio.sleep(0.01)
    assert rec.seqs == [1, 2], "live deliveries must wait while paused"
    seq.catch_up()
    await settled(seq)
    assert rec.seqs == [1, 2, 3, 4, 6, 7]
    assert stream.calls[0][1] == 2
    assert set(stream.calls[0][0]) == {"room:a", "room:b", "room:c"}
    assert stats.gap_repairs == 1 and stats.gap_repaired_messages >= 3
    assert rec.lost == []
    seq.receive(stream.add("room:b"))  # 8: flowing again
    assert rec.seqs[-1] == 8


async def test_pause_without_anything_missed_releases_backlog() -> None:
    seq, stream, rec, _ = make("room:a")
    seq.receive(stream.add("room:a"))
    seq.pause()
    seq.receive(stream.add("room:a"))
    assert rec.seqs == [1]
    seq.catch_up()
    await settled(seq)
    assert rec.seqs == [1, 2]


async def test_repair_finishing_while_paused_waits_for_catch_up() -> None:
    seq, stream, rec, _ = make("room:a", "room:b")
    seq.receive(stream.add("room:a"))  # 1
    seq.receive(stream.add("room:b"))  # 2
    stream.add("room:a")  # 3: missed
    stream.hold()
    seq.receive(stream.add("room:a"))  # 4: gap
    seq.pause()
    seq.receive(stream.add("room:b"))  # 5: waits
    stream.open()
    await wait_for(lambda: seq._task is None, timeout=3.0, interval=0.001)  # the repair ran
    await asyncio.sleep(0.01)
    # The pause dropped 4 from the backlog (the catch-up would fetch it): the
    # repair, bounded by 5, delivered it; 5 waits for the catch-up.
    assert rec.seqs == [1, 2, 3, 4]
    seq.catch_up()
    await settled(seq)
    assert rec.seqs == [1, 2, 3, 4, 5]
    assert stream.calls[-1][1] == 4  # caught up from the highest delivered


async def test_restart_resets_and_loses_every_tracked_channel() -> None:
    seq, stream, rec, stats = make("room:a", "user:alice")
    seq.receive(stream.add("room:a"))
    seq.receive(stream.add("user:alice"))
    seq.restart()
    assert sorted(rec.lost) == ["room:a", "user:alice"]
    assert seq.high == 0
    assert stats.gaps_lost == 2
    # The new stream numbers from 1 again: low sequences are new messages, not duplicates.
    seq.receive(Delivery("room:a", 1, 0, 0.0, "message", b"new"))
    seq.receive(Delivery("user:alice", 2, 0, 0.0, "message", b"new"))
    assert rec.log[-2:] == [("msg", "room:a", 1), ("msg", "user:alice", 2)]
    assert stats.duplicates_dropped == 0


async def test_untracked_during_repair_not_delivered() -> None:
    seq, stream, rec, _ = make("room:a")
    seq.receive(stream.add("room:a"))
    stream.add("room:a")
    stream.hold()
    seq.receive(stream.add("room:a"))
    seq.untrack("room:a")
    stream.open()
    await settled(seq)
    assert 2 not in rec.of("room:a")  # fetched for a channel no longer held: not delivered


async def test_a_catch_up_during_a_repair_delivers_what_was_stored_while_away() -> None:
    """A reconnect while a repair waits: the backlog from before the outage is
    dropped (the catch-up fetches it again), so its first entry is not taken
    for the start of the live flow and what was stored while away comes."""
    seq, stream, rec, _stats = make("room:a", "room:b", "room:d")
    seq.receive(stream.add("room:a"))  # 1
    seq.receive(stream.add("room:d"))  # 2
    stream.add("room:a")  # 3: missed live
    stream.hold()  # the repair's fetch is slow
    seq.receive(stream.add("room:a"))  # 4, prev 3: gap → repair (waits)
    await asyncio.sleep(0)
    seq.pause()  # NATS connection lost while repairing
    stream.add("room:d")  # 5: stored while away
    stream.add("room:d")  # 6: stored while away; nothing more on room:d
    seq.catch_up()  # reconnected
    seq.receive(stream.add("room:b"))  # 7: live after the reconnect
    stream.open()
    await settled(seq)
    await asyncio.sleep(0.05)
    assert rec.of("room:a") == [1, 3, 4]
    assert rec.of("room:b") == [7]
    assert rec.of("room:d") == [2, 5, 6] and not rec.lost
