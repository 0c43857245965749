"""Finding a page of history with forward-only reads (broker/pages.py),
against a model stream: every page equals the naive answer, whatever the
spread of the channel's messages in the stream, and whether or not the copy
of the stream the reads come from is behind its leader."""

from __future__ import annotations

import asyncio
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.base import Delivery, Retention
from broker.channels import Channel, room_channel
from broker.pages import Pager, Stored

LOBBY = room_channel("lobby")


class ModelStream:
    """``seqs``: the sequences of the subject's messages; reads behave as a
    batch direct get does (forward from a sequence, with Nats-Num-Pending)."""

    def __init__(self, seqs: list[int], ts: float) -> None:
        self.seqs = seqs
        self.ts = ts
        self.reads = 0
        self.read_messages = 0
        self.caught_up = 0  # reads past a copy behind (read_up_to)

    async def read(self, subject: str, channel: Channel, start: int, count: int) -> list[Stored]:
        self.reads += 1
        following = [s for s in self.seqs if s >= max(1, start)][:count]
        self.read_messages += len(following)
        total = len(self.seqs)
        return [
            Stored(Delivery(channel, s, 0, self.ts, "message", b"{}"), total - 1 - self.seqs.index(s))
            for s in following
        ]

    async def read_up_to(self, after: int, reach: int) -> list[Delivery]:
        """Every message after ``after``, as the stream's leader holds them."""
        self.caught_up += 1
        return [Delivery(LOBBY, s, 0, self.ts, "message", b"{}") for s in self.seqs if s > after]


def naive(seqs: list[int], before: int | None, limit: int, max_msgs: int) -> list[int]:
    held = seqs[-max_msgs:] if max_msgs else []
    older = [s for s in held if before is None or s < before]
    return older[-limit:]


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[int], int | None, int, int]:
    # Runs of the channel's messages between runs of other channels' (skewed on purpose).
    seqs: list[int] = []
    seq = 0
    for _ in range(draw(st.integers(0, 8))):
        seq += draw(st.integers(1, 2000))  # other channels' messages
        run = draw(st.integers(1, 120))
        gap = draw(st.integers(1, 3))
        for _ in range(run):
            seq += gap
            seqs.append(seq)
    last = seqs[-1] if seqs else 0
    before = draw(st.one_of(st.none(), st.integers(1, last + 5)))
    return seqs, before, draw(st.integers(1, 200)), draw(st.integers(1, 1001))


@settings(max_examples=100, deadline=None)
@given(streams())
def test_every_page_is_the_naive_page(case: tuple[list[int], int | None, int, int]) -> None:
    seqs, before, limit, max_msgs = case
    stream = ModelStream(seqs, time.time())
    pager = Pager(stream, "s", LOBBY, stream.read_up_to)  # type: ignore[arg-type]
    last = seqs[-1] if seqs else 0
    page = asyncio.run(pager.page(last, before, limit, Retention(max_msgs, 3600.0), time.time()))
    assert [d.seq for d in page] == naive(seqs, before, limit, max_msgs)
    # Few requests, and little read beyond the page itself.
    assert stream.reads <= 20  # typically 3 or 4
    assert stream.read_messages <= 2 * limit + 20
    assert stream.caught_up == 0  # a copy up to date: direct gets only


def test_messages_past_their_age_are_not_in_a_page() -> None:
    stream = ModelStream(list(range(1, 11)), time.time() - 7200)
    pager = Pager(stream, "s", LOBBY, stream.read_up_to)  # type: ignore[arg-type]
    page = asyncio.run(pager.page(10, None, 5, Retention(100, 3600.0), time.time()))
    assert page == []


class BusyStream(ModelStream):
    """A model stream into which ``published`` more messages of the subject
    (at the stream's end) are published right after the ``after``-th read:
    a busy room, paged while it gets messages."""

    def __init__(self, seqs: list[int], ts: float, published: int, after: int) -> None:
        super().__init__(seqs, ts)
        self.published = published
        self.after = after

    async def read(self, subject: str, channel: Channel, start: int, count: int) -> list[Stored]:
        got = await super().read(subject, channel, start, count)
        if self.reads == self.after:
            self.seqs += [self.seqs[-1] + 1 + i for i in range(self.published)]
        return got


@settings(max_examples=100, deadline=None)
@given(streams(), st.integers(1, 50), st.integers(1, 4))
def test_a_page_read_while_messages_are_published_is_whole(
    case: tuple[list[int], int | None, int, int], published: int, after: int
) -> None:
    """Messages published between the pager's reads come after the page: it
    is the same page as without them (not a short one, which would say it is
    the last)."""
    seqs, before, limit, max_msgs = case
    # The held window does not move under it here: more than the subject
    # ever holds (with max_msgs 201 and 201 messages, one more publish
    # rightly takes the oldest out of the page).
    max_msgs += len(seqs) + published
    expected = naive(seqs, before, limit, max_msgs)
    stream = BusyStream(list(seqs), time.time(), published, after)
    last = seqs[-1] if seqs else 0
    end = before if before is not None and before <= last else last + 1
    pager = Pager(stream, "s", LOBBY, stream.read_up_to)  # type: ignore[arg-type]
    page = asyncio.run(pager.page(last, end, limit, Retention(max_msgs, 3600.0), time.time()))
    assert [d.seq for d in page] == expected


class CopyBehind(ModelStream):
    """A copy of the stream that has not yet applied the leader's writes
    after ``copy_end``: direct gets (any copy may answer) see the subject's
    messages up to it, counted as that copy counts them; ``read_up_to``
    reads what the leader holds (store.py reads up to it, or waits)."""

    def __init__(self, seqs: list[int], ts: float, copy_end: int) -> None:
        super().__init__([s for s in seqs if s <= copy_end], ts)
        self.leader = seqs

    async def read_up_to(self, after: int, reach: int) -> list[Delivery]:
        self.caught_up += 1
        assert reach == self.leader[-1]  # the leader's last: what the page was asked against
        return [Delivery(LOBBY, s, 0, self.ts, "message", b"{}") for s in self.leader if s > after]


@settings(max_examples=200, deadline=None)
@given(streams(), st.integers(1, 5), st.integers(0, 1))
def test_a_page_read_from_a_copy_behind_misses_nothing_the_leader_held(
    case: tuple[list[int], int | None, int, int], behind: int, near: int
) -> None:
    """A copy a few of the subject's messages behind (a follower that has not
    applied the last writes, the writer already acked): the page is the one
    the leader's messages make, the newest included — not one without them,
    which no live delivery would fill in (they are before the position a
    client's welcome gave it)."""
    seqs, before, limit, max_msgs = case
    if not seqs:
        return
    copy_end = seqs[-behind] - 1 if behind <= len(seqs) else 0
    if near and before is not None:
        before = min(before, copy_end + 1 + near)  # ``before`` at the copy's end: the page reaches past it
    stream = CopyBehind(seqs, time.time(), copy_end)
    pager = Pager(stream, "s", LOBBY, stream.read_up_to)  # type: ignore[arg-type]
    page = asyncio.run(pager.page(seqs[-1], before, limit, Retention(max_msgs, 3600.0), time.time()))
    got = [d.seq for d in page]
    # The held window's oldest edge is placed by the count of the copy that
    # answered, up to ``behind`` messages short: a page at that edge may show
    # as many more of its oldest (never fewer of its newest).
    assert got in [naive(seqs, before, limit, max_msgs + extra) for extra in range(behind + 1)]
    if max_msgs >= len(seqs):
        assert got == naive(seqs, before, limit, max_msgs)
    assert stream.caught_up <= 2
