"""Retention applied at replay time.

The stream keeps one more message per subject than the largest family limit,
and for as long as the longest family age: so a replay that reads more than a
channel's limit knows messages were lost — cut by its family limit here, or
evicted by the stream — and says so instead of skipping them silently.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from .base import Delivery, Replay, RetentionPolicy
from .channels import Channel


def stream_cap(history: RetentionPolicy) -> int:
    """Messages the stream keeps per subject: the largest family limit, plus
    one so that an eviction past a position is visible to a replay."""
    return history.max_msgs + 1


def retain(
    found: Sequence[Delivery],
    history: RetentionPolicy,
    limit: int,
    now: float,
    lost: Iterable[Channel] = (),
) -> Replay:
    """Apply each channel's family limits to ``found`` (oldest first, every
    stored message after the position), then keep the newest ``limit``."""
    lost_channels = set(lost)
    counts = Counter(d.channel for d in found)
    skip: dict[Channel, int] = {}
    for channel, n in counts.items():
        excess = n - history.of(channel).max_msgs
        if excess > 0:
            skip[channel] = excess
            lost_channels.add(channel)
    kept: list[Delivery] = []
    for d in found:
        excess = skip.get(d.channel, 0)
        if excess:
            skip[d.channel] = excess - 1
        elif now - d.ts > history.of(d.channel).max_age:
            lost_channels.add(d.channel)
        else:
            kept.append(d)
    if len(kept) > limit:
        lost_channels.update(d.channel for d in kept[: len(kept) - limit])
        kept = kept[len(kept) - limit :]
    return Replay(kept, frozenset(lost_channels))
