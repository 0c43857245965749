"""Pages of one channel's history, read backwards with batch direct gets.

A page is the newest ``limit`` held messages of a channel older than a
position. JetStream reads only forward, but a batch direct get (ADR-31)
says on every message how many of its subject's messages follow it
(``Nats-Num-Pending``): that count places any sequence exactly among the
subject's messages. A page is then found with a few small requests and no
consumer — a probe or two to place the position and estimate how densely
the subject fills the stream, then one read that starts where the page
should (rarely a second one, when the estimate was off).

Direct gets may be answered by any replica of the stream, which may be a
write or more behind its leader (ADR-31). A page is read against the
subject's last sequence as the leader said it when the page was asked: a
read whose copy ends before that one is a copy behind, and the rest is read
as a replay reads it, up to that sequence (store.py ``_fetch``: a direct get
again, else a consumer that waits for its copy). So a page misses nothing the
leader held, and a client's welcome position, then a page, leave no message
out; with a copy up to date, a page costs no more reads than the direct gets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats.errors
import orjson

from .base import BrokerUnavailable, Delivery, Retention
from .channels import Channel, event_of, sender_of
from .link import NatsLink
from .timestamps import parse_rfc3339

# Most messages one read asks for: a page is at most history.page_max.
MAX_READ = 1000
# Fewest messages a read asks for once the count it was given is read
# without reaching the page's end (messages were published meanwhile).
MORE = 16


@dataclass(frozen=True, slots=True)
class Stored:
    """A message of the subject, and how many of the subject's follow it."""

    delivery: Delivery
    after: int


class DirectReader:
    """Batch direct gets (``$JS.API.DIRECT.GET.<stream>``), their replies
    taken in the client's reader (``ReplyInbox``)."""

    def __init__(self, link: NatsLink, stream: str, timeout: float) -> None:
        self._inbox = link.replies
        self._api = f"$JS.API.DIRECT.GET.{stream}"
        self._timeout = timeout

    async def read(
        self,
        subject: str,
        channel: Channel,
        start: int,
        count: int,
        timeout: float | None = None,
        patient: Callable[[], bool] | None = None,
    ) -> list[Stored]:
        """Up to ``count`` messages of ``subject`` from sequence ``start`` on,
        oldest first; within ``timeout`` (default: the request timeout) — or,
        if ``patient()`` says so then, within the request timeout."""
        replies: list[tuple[bytes, dict[str, str]]] = []
        done = asyncio.get_running_loop().create_future()

        def take(data: bytes, headers: dict[str, str] | None) -> None:
            if headers is None or "Status" in headers:  # the end of the batch (204), or nothing found (404)
                if not done.done():
                    done.set_result(None)
            else:
                replies.append((data, headers))

        reply = ""
        try:
            nc, reply = await self._inbox.open(take, done)
            request = {"seq": max(1, start), "next_by_subj": subject, "batch": count}
            await nc.publish(self._api, orjson.dumps(request), reply=reply)
            first = self._timeout if timeout is None else timeout
            await asyncio.wait((done,), timeout=first)  # a timeout leaves ``done`` to wait on
            if not done.done():
                if patient is None or not patient():
                    raise TimeoutError
                async with asyncio.timeout(max(0.0, self._timeout - first)):
                    await done
            done.result()  # BrokerUnavailable if NATS closed the connection for good meanwhile (ReplyInbox.fail)
        except (TimeoutError, nats.errors.Error) as exc:
            raise BrokerUnavailable(f"reading history failed: {exc.__class__.__name__}") from None
        finally:
            self._inbox.close(reply)
        return [_stored(data, headers, channel) for data, headers in replies]


def _stored(data: bytes, headers: dict[str, str], channel: Channel) -> Stored:
    seq = int(headers["Nats-Sequence"])
    ts = parse_rfc3339(headers["Nats-Time-Stamp"])
    delivery = Delivery(channel, seq, 0, ts, event_of(headers), data, sender=sender_of(headers))
    return Stored(delivery, int(headers.get("Nats-Num-Pending", 0)))


# The subject's messages after a sequence, oldest first, up to at least
# another (the leader's last), whichever copy of the stream holds them.
ReadUpTo = Callable[[int, int], Awaitable[list[Delivery]]]


class Pager:
    """Reads pages of one subject's history."""

    def __init__(self, reader: DirectReader, subject: str, channel: Channel, read_up_to: ReadUpTo) -> None:
        self._reader = reader
        self._subject = subject
        self._channel = channel
        self._read_up_to = read_up_to
        self._last = 0  # the subject's last sequence, as the leader said (page)
        self._rest: tuple[int, list[Delivery]] | None = None  # what a copy behind lacked: after a sequence

    async def _read(self, start: int, count: int, whole: bool = True) -> list[Stored]:
        """Up to ``count`` of the subject's messages from ``start`` on, as the
        leader held them (``whole``; else as the copy that answered holds
        them, for an estimate). A copy that answers without the leader's last
        message, and with none of the subject's after what it returned
        (``after`` 0), is behind: the rest is read up to that message."""
        got = await self._reader.read(self._subject, self._channel, start, count)
        read_to = got[-1].delivery.seq if got else start - 1
        if not whole or read_to >= self._last or (got and got[-1].after):
            return got
        rest = await self._rest_after(read_to)
        # Counts as the leader's: the copy's, plus what it lacked.
        return [Stored(s.delivery, s.after + len(rest)) for s in got] + [
            Stored(d, len(rest) - 1 - i) for i, d in enumerate(rest[: count - len(got)])
        ]

    async def _rest_after(self, seq: int) -> list[Delivery]:
        """The subject's messages after ``seq`` up to the leader's last, read
        once per page: a later read behind, further on, takes its part."""
        if self._rest is None or seq < self._rest[0]:
            self._rest = (seq, await self._read_up_to(seq, self._last))
        return [d for d in self._rest[1] if seq < d.seq <= self._last]

    async def page(self, last: int, before: int | None, limit: int, retention: Retention, now: float) -> list[Delivery]:
        """The newest ``limit`` held messages older than ``before``, oldest
        first; ``last``: the subject's last sequence as the stream's leader
        says it (0: it holds nothing) — the page holds every message up to it.
        Held: among the newest ``retention.max_msgs`` and not older than
        ``retention.max_age`` (nothing a resume could not return).

        The counts of the first reads only place the page's start: messages
        published (or dropped) between two reads shift them. The page itself
        is the newest of the messages read up to ``before``, and the read goes
        on until it has passed ``before``, or starts over from the subject's
        oldest message if it began past the page's start."""
        self._last = last
        end = last + 1 if before is None or before > last else before  # the page is before ``end``
        head = await self._read(1, 1) if last else []
        if not head or end <= head[0].delivery.seq:
            return []
        first, total = head[0].delivery.seq, head[0].after + 1
        newer = 0  # the subject's messages at or after ``end``
        if end <= last:
            probe = await self._read(end, 1)
            newer = probe[0].after + 1 if probe else 0
        want = min(limit, retention.max_msgs - newer)
        if want <= 0:
            return []
        older = max(1, total - newer)  # an estimate, as is every index below
        start_seq, start_index = await self._place(max(0, older - want), (first, 0), (end, older), want, total)
        found = await self._read_until(start_seq, end, older - start_index)
        if len(found) < want and start_seq != first:
            found = await self._read_until(first, end, older)  # placed past the page's start
        return [d for d in found[-want:] if now - d.ts <= retention.max_age]

    async def _read_until(self, start: int, end: int, count: int) -> list[Delivery]:
        """The subject's messages from ``start`` up to ``end`` (excluded),
        oldest first, in reads of at most ``MAX_READ``; ``count``: about how
        many there are (one more is asked for, to see the read reach ``end``)."""
        found: list[Delivery] = []
        left = max(0, count) + 1
        while True:
            asked = min(MAX_READ, left if left > 0 else MORE)
            got = await self._read(start, asked)
            for stored in got:
                if stored.delivery.seq >= end:
                    return found
                found.append(stored.delivery)
            if len(got) < asked:
                return found  # the subject has no more
            left -= asked
            start = got[-1].delivery.seq + 1

    async def _place(
        self, target: int, low: tuple[int, int], high: tuple[int, int], slack: int, total: int
    ) -> tuple[int, int]:
        """A (sequence, index) of a message at or before the one of index
        ``target`` (0: the subject's oldest), close enough that reading from
        it wastes at most ``slack`` messages: interpolation search between
        ``low`` (a message and its index) and ``high`` (a sequence and the
        index of the first message at or after it), halving when the messages
        are unevenly spread. ``total``: the subject's messages (an
        index is ``total - 1 -`` the count that follows it)."""
        (low_seq, low_index), (high_seq, high_index) = low, high
        halve = False
        for _ in range(32):
            if target - low_index <= slack or high_seq - low_seq <= 1:
                break
            if halve:
                guess = (low_seq + high_seq) // 2
            else:
                share = (target - low_index) / (high_index - low_index)
                guess = low_seq + max(1, int((high_seq - low_seq) * share) - 1)
            probe = await self._read(guess, 1, whole=False)  # a copy behind: an estimate all the same
            if not probe:
                break
            seq, index = probe[0].delivery.seq, total - 1 - probe[0].after
            before_gap = high_index - low_index
            if index <= target:
                low_seq, low_index = seq, index
            else:  # the first message at or after ``guess`` is past the target
                high_seq, high_index = guess, index
            halve = (high_index - low_index) * 2 > before_gap  # interpolation did not halve it: bisect next
        return low_seq, low_index
