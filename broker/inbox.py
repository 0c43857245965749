"""One inbox subscription for many requests, handled in the client's reader.

Each request gets a reply subject of its own under the inbox and a callback
for what comes back to it: no task, queue or subscription per request (what
nats-py's request() costs), and replies are matched as they come, so many
requests can be in flight at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from .base import BrokerUnavailable
from .dispatch import DispatchingClient

# (payload, headers or None) of one reply.
OnReply = Callable[[bytes, dict[str, str] | None], None]
# Seconds after which a request not answered is sent again, where that is
# safe (``ReplyInbox.resend``).
RESEND_AFTER = 1.0


def expire(futures: Iterable[asyncio.Future[Any]]) -> None:
    """Fail those of ``futures`` not done yet with TimeoutError. Called by a
    timer (``loop.call_later``) bounding a wait for replies: cheaper than
    ``asyncio.timeout`` (no task cancelled and uncancelled), which on every
    connect adds up."""
    for future in futures:
        if not future.done():
            future.set_exception(TimeoutError())


def no_responders(headers: dict[str, str] | None) -> bool:
    """A reply that says nobody listens on the subject asked (503): JetStream
    is not there, or the stream's leader is moving."""
    return headers is not None and headers.get("Status") == "503"


class ReplyInbox:
    """Reply subjects under one wildcard subscription per connection (made
    again on a new client), shared by every kind of request.

    Replies also tell what the server has done: requests are numbered in the
    order they are made, and commands go out in the order they are queued, so
    the answer to request *n* shows the server has read every command queued
    before *n* was made (e.g. a SUB: ``mark``, ``seen``)."""

    def __init__(self, client: Callable[[], DispatchingClient]) -> None:
        self._client_of = client  # the connected client, or BrokerUnavailable
        self._client: DispatchingClient | None = None  # the client ``_prefix`` is subscribed on
        self._prefix = b""
        self._cut = 1  # where a reply subject's number starts
        self.issued = 0  # requests numbered so far: the next one's number
        # Every command queued before number ``proven`` was taken is known to
        # be read; ``_asked``: the last mark taken (replies are read for it).
        self.proven = 0
        self._asked = -1
        self._waiting: dict[bytes, OnReply] = {}
        # What each reply subject's request awaits: failed at once by ``fail``.
        self._waiters: dict[bytes, asyncio.Future[Any]] = {}
        # Requests sent again while unanswered: reply -> (when next, command),
        # in that order (each is due RESEND_AFTER after it was last sent).
        self._resends: dict[bytes, tuple[float, bytes]] = {}
        self._resending: asyncio.TimerHandle | None = None

    async def subscribe(self) -> DispatchingClient:
        """The inbox subscription on the current client (made now if needed:
        at the broker's start, so it is there before any request)."""
        nc = self._client_of()
        if nc is not self._client:
            prefix = nc.new_inbox()
            self._prefix = prefix.encode()
            self._cut = len(self._prefix) + 1
            await nc.subscribe_direct(prefix + ".*", self._on_reply)
            self._client = nc
        return nc

    async def open(
        self, on_reply: OnReply, waiter: asyncio.Future[Any], buffered: bool = False
    ) -> tuple[DispatchingClient, str]:
        """A reply subject whose replies go to ``on_reply`` until ``close``;
        ``waiter``: what the request awaits (see ``add``). ``buffered``: see ``ready``."""
        nc = self.current(buffered) or await self.ready(buffered)
        return nc, self.add(on_reply, waiter).decode()

    def current(self, buffered: bool = False) -> DispatchingClient | None:
        """What ``ready`` returns when it has nothing to wait for (the usual
        case), without its awaits; None when it has."""
        nc = self._client
        if nc is None:
            return None
        if buffered and nc.is_reconnecting:
            return nc
        return nc if self._client_of() is nc else None

    async def ready(self, buffered: bool = False) -> DispatchingClient:
        """The client to send requests on, with the inbox subscribed.
        ``buffered``: while the client reconnects, requests wait in its
        pending buffer and go out once reconnected, after the inbox's SUB
        (what nats-py's request() does), instead of failing at once."""
        nc = self._client
        if not (buffered and nc is not None and nc.is_reconnecting):
            nc = await self.subscribe()
        return nc

    def add(self, on_reply: OnReply, waiter: asyncio.Future[Any]) -> bytes:
        """A reply subject (after ``ready``) whose replies go to ``on_reply``
        until ``discard``. ``waiter``, what the request awaits, is failed at
        once if the connection closes for good (``fail``)."""
        number = self.issued
        self.issued = number + 1
        reply = b"%s.%d" % (self._prefix, number)
        self._waiting[reply] = on_reply
        self._waiters[reply] = waiter
        return reply

    def resend(self, reply: bytes, command: bytes) -> None:
        """Write ``command`` (a request made with ``reply``) again every
        RESEND_AFTER seconds until ``reply`` is discarded. For requests whose
        repeat changes nothing (a read; a write that expects a revision: a
        repeat of one stored is refused): a stream's leader that steps down or
        dies drops what was asked of it, and answers nothing until another
        leads it. Measured: a history page in flight at a stepdown failed
        after the whole 5 s timeout; asked again, it took 1 s. One timer for
        them all: a timer per request cost a connect ~4 % more CPU."""
        loop = asyncio.get_running_loop()
        self._resends[reply] = (loop.time() + RESEND_AFTER, command)
        if self._resending is None:
            self._resending = loop.call_later(RESEND_AFTER, self._resend_due)

    def _resend_due(self) -> None:
        self._resending = None
        resends = self._resends
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = []
        for reply, (at, _) in resends.items():
            if at > now:
                break
            due.append(reply)
        nc = self._client
        for reply in due:
            command = resends.pop(reply)[1]
            resends[reply] = (now + RESEND_AFTER, command)  # last again: still in order
            if nc is not None:
                nc.write_soon(command)  # not connected: the first waits in nats-py's buffer
        if resends:
            self._resending = loop.call_at(next(iter(resends.values()))[0], self._resend_due)

    def mark(self) -> int:
        """The mark of what is queued now (e.g. a SUB): the next answer that
        shows the server read it is noted (``seen``)."""
        self._asked = self.issued
        return self.issued

    def seen(self, mark: int) -> bool:
        """Whether the server is known to have read what was queued at ``mark``."""
        return mark < self.proven

    def number(self) -> int:
        """A number for a round trip made outside the inbox (a PING): what is
        queued after this call is not before it."""
        self.issued += 1
        return self.issued - 1

    def answered(self, number: int) -> None:
        """The round trip numbered ``number`` is answered: what was queued
        before it is read."""
        self.proven = max(self.proven, number + 1)

    def close(self, reply: str) -> None:
        self.discard((reply.encode(),))

    def discard(self, replies: Iterable[bytes]) -> None:
        waiting, waiters, resends = self._waiting, self._waiters, self._resends
        for reply in replies:
            waiting.pop(reply, None)
            waiters.pop(reply, None)
            resends.pop(reply, None)

    def fail(self, reason: str) -> None:
        """The connection is closed for good: no reply will come. Every
        request waiting fails now with BrokerUnavailable(``reason``), not at
        its timeout (a publish's: nats.publish_timeout), which held the
        node's drain and exit as long."""
        for waiter in set(self._waiters.values()):
            if not waiter.done():
                waiter.set_exception(BrokerUnavailable(reason))
                waiter.exception()  # read: its request may be gone before it looks

    def _on_reply(self, subject: bytes, data: bytes, headers: dict[str, str] | None) -> None:
        on_reply = self._waiting.get(subject)
        if on_reply is None:  # a request that gave up
            return
        if self._asked >= self.proven:  # a mark not seen yet: does this reply show it?
            self.answered(int(subject[self._cut :]))
        on_reply(data, headers)
