"""Counting what arrived: per-connection sequence tracking and a bounded
latency histogram. Both are on the receive hot path, so they are small."""

from __future__ import annotations

import math
from dataclasses import dataclass

_LOG = math.log
_STEP = math.log(1.01)  # bucket width: 1 % of the value
_INV = 1.0 / _STEP
_BUCKETS = int(math.log(1e10) * _INV) + 2  # 1 µs … ~3 h


class SeqTrack:
    """One connection's view of one room's sequence (which starts at 1).

    ``s == last + 1`` is in order; ``s > last + 1`` skips ``s - last - 1``
    messages (lost); ``s <= last`` is a duplicate (or so late it was already
    counted lost). Messages never seen after the last one received are lost
    too, but only the caller knows how many were published: see ``lost``.
    """

    __slots__ = ("dups", "gaps", "last", "received")

    def __init__(self) -> None:
        self.last = 0
        self.received = 0  # distinct in-order-or-ahead messages
        self.gaps = 0
        self.dups = 0

    def see(self, s: int) -> None:
        last = self.last
        if s == last + 1:
            self.last = s
            self.received += 1
        elif s > last:
            self.gaps += s - last - 1
            self.last = s
            self.received += 1
        else:
            self.dups += 1

    def lost(self, published: int) -> int:
        """Messages skipped so far plus the unreceived tail, ``published`` being the room's last sequence."""
        return self.gaps + max(0, published - self.last)


@dataclass(frozen=True, slots=True)
class Tally:
    """Totals over a set of connections at one instant; steps subtract two of them."""

    received: int = 0
    dups: int = 0
    lost: int = 0

    def __sub__(self, other: Tally) -> Tally:
        return Tally(self.received - other.received, self.dups - other.dups, self.lost - other.lost)


def tally(tracks: list[tuple[SeqTrack, int]]) -> Tally:
    """Sum over ``(track, published sequence of its room)`` pairs."""
    received = dups = lost = 0
    for track, published in tracks:
        received += track.received
        dups += track.dups
        lost += track.lost(published)
    return Tally(received, dups, lost)


class Histogram:
    """Latencies in log buckets 1 % wide: fixed memory whatever the count.

    ``record`` only bumps a bucket (and the exact maximum); counts and means are
    derived from the buckets when asked, which keeps the hot path short.
    """

    __slots__ = ("counts", "max")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.max = 0.0

    def record(self, seconds: float) -> None:
        if seconds > self.max:
            self.max = seconds
        us = seconds * 1e6
        if us >= 1.0:
            index = int(_LOG(us) * _INV) + 1
            self.counts[index if index < _BUCKETS else _BUCKETS - 1] += 1
        else:
            self.counts[0] += 1

    @property
    def count(self) -> int:
        return sum(self.counts)

    def take(self) -> Histogram:
        """A copy of what was recorded so far; this one starts empty again."""
        snap = Histogram()
        snap.counts, snap.max = self.counts, self.max
        self.counts = [0] * _BUCKETS
        self.max = 0.0
        return snap

    @staticmethod
    def _value(index: int) -> float:
        """Seconds at the middle of bucket ``index`` (0 holds everything under 1 µs)."""
        return math.exp((index - 0.5) * _STEP) / 1e6 if index else 1e-6

    def quantile(self, q: float) -> float:
        """Seconds below which a fraction ``q`` of the values lie (bucket midpoint, ±0.5 %)."""
        count = self.count
        if not count:
            return 0.0
        rank = max(1, math.ceil(q * count))
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return min(self.max, self._value(index))
        return self.max

    def mean(self) -> float:
        count = self.count
        if not count:
            return 0.0
        return sum(n * self._value(i) for i, n in enumerate(self.counts) if n) / count

    def summary_ms(self) -> dict[str, float]:
        ms = 1e3
        return {
            "count": self.count,
            "p50": round(self.quantile(0.50) * ms, 3),
            "p90": round(self.quantile(0.90) * ms, 3),
            "p99": round(self.quantile(0.99) * ms, 3),
            "max": round(self.max * ms, 3),
            "mean": round(self.mean() * ms, 3),
        }
