"""JetStream publishes with many in flight, acks matched as they come.

Each message goes out as a plain PUB with a reply subject of its own
(``ReplyInbox``); the stream's ack comes back to it. A batch is written in
order without waiting between messages (the stream stores them in that
order: one connection's messages keep their order), then its acks are
awaited together — or, where the stream allows it, as one atomic batch
(ADR-50): only the message that commits it has a reply, and its ack says
where the last one went; the others precede it, all stored or none.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from functools import partial
from typing import Any

import nats.errors
import orjson

from .base import BrokerUnavailable, MessageTooLarge, Published
from .inbox import ReplyInbox, expire, no_responders
from .link import NatsLink

# A message to publish: (subject, payload, headers or None).
Outgoing = tuple[str, bytes, dict[str, str] | None]
# A message's id: a repeat within the stream's duplicate window is acked (as a
# duplicate, with the first one's sequence), not stored.
MSG_ID = "Nats-Msg-Id"
# The most messages the stream takes in one atomic batch (nats-server's limit).
ATOMIC_MAX = 1000
# Refusals of an atomic batch after which the messages can go one by one (none
# was stored): atomic publishing disabled (10174), a header it does not take
# in a batch (10177: Nats-Msg-Id before nats-server 2.14), a batch too large
# (10199), a message id already in the stream (10201), too many batches in
# flight on the stream (10210).
_NOT_AS_A_BATCH = frozenset({10174, 10177, 10199, 10201, 10210})


class Refused(BrokerUnavailable):
    """The stream answered, but did not store the message; ``code``: its
    JetStream error code (e.g. 10071, a wrong expected last sequence), 0 if none."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class AckedPublisher:
    """Publishes into the stream and waits for its acks."""

    def __init__(
        self,
        link: NatsLink,
        stream: str,
        timeout: float,
        buffered: bool = False,
        resend: bool = False,
        keyed_resend: bool = False,
    ) -> None:
        self._inbox = link.replies
        self._stream = stream  # expected: a subject another stream captured is refused, not stored there
        self._timeout = timeout
        self._headers = {"Nats-Expected-Stream": stream}
        self._head = _head(stream, {})
        self._buffered = buffered  # while NATS reconnects: wait for it (ReplyInbox.open)
        # Unacked messages sent again (``ReplyInbox.resend``): only for writes that
        # expect a revision (KV), whose repeat is refused once one is stored, and,
        # with ``keyed_resend``, writes whose every message has an id (the stream
        # acks a repeat of one it stored as a duplicate and stores nothing).
        self._resend = resend
        self._keyed_resend = keyed_resend
        # The stream takes atomic batches (allow_atomic, nats-server 2.12+): set once it is known.
        self.atomic = False
        self._batch_ids = itertools.count()
        self._batch_prefix = secrets.token_hex(8)

    async def publish(self, messages: list[Outgoing]) -> list[Published]:
        """Publish ``messages`` in order; where the stream stored them, in the
        same order. Raises BrokerUnavailable (or Refused) if any is not
        acknowledged in time — the ones before it may be stored, unless the
        stream took them as one atomic batch: then all are, or none."""
        try:
            if self.atomic and 1 < len(messages) <= ATOMIC_MAX:
                try:
                    return await self._publish_atomic(messages)
                except Refused as exc:
                    if exc.code not in _NOT_AS_A_BATCH:
                        raise
                    # Nothing was stored: e.g. a message id the stream has seen (a
                    # retried batch) refuses the whole batch; one by one, the
                    # repeats are dropped and the rest stored.
            return await self._publish_each(messages)
        except TimeoutError:  # see expire
            raise BrokerUnavailable("publish not acknowledged in time") from None
        except (OSError, nats.errors.Error) as exc:
            raise BrokerUnavailable(f"publish not acknowledged: {exc.__class__.__name__}") from None

    async def _publish_each(self, messages: list[Outgoing]) -> list[Published]:
        """Every message with a reply subject: an ack each."""
        if not messages:
            return []
        resend = self._resend or (
            self._keyed_resend and all(headers is not None and MSG_ID in headers for _, _, headers in messages)
        )
        acks = _Acks(self._inbox, self._timeout, resend)
        try:
            nc = self._inbox.current(self._buffered) or await self._inbox.ready(self._buffered)
            limit = nc.max_payload
            replies = [acks.reply_to() for _ in messages]
            commands = [
                _hpub(
                    subject,
                    reply,
                    _fitting(limit, self._head if headers is None else _head(self._stream, headers), payload),
                    payload,
                )
                for (subject, payload, headers), reply in zip(messages, replies, strict=True)
            ]
            written = b"".join(commands)
            if not nc.write_soon(written):
                for (subject, payload, headers), reply in zip(messages, replies, strict=True):
                    await nc.publish(
                        subject, payload, reply=reply.decode(), headers={**self._headers, **(headers or {})}
                    )
            if resend:
                self._inbox.resend(replies[0], written)  # until every ack came (close discards the replies)
            return [Published(int(ack["seq"]), bool(ack.get("duplicate"))) for ack in await acks.done]
        finally:
            acks.close()

    async def _publish_atomic(self, messages: list[Outgoing]) -> list[Published]:
        """One atomic batch (ADR-50): the last message commits it and alone
        gets an ack, with the last sequence; the others precede it."""
        acks = _Acks(self._inbox, self._timeout)
        batch = b"%s-%d" % (self._batch_prefix.encode(), next(self._batch_ids))
        try:
            nc = self._inbox.current(self._buffered) or await self._inbox.ready(self._buffered)
            opening = b"NATS/1.0\r\nNats-Expected-Stream: %s\r\nNats-Batch-Id: %s\r\nNats-Batch-Sequence: " % (
                self._stream.encode(),
                batch,
            )
            commands: list[bytes] = []
            for index, (subject, payload, headers) in enumerate(messages, 1):
                last = index == len(messages)
                head = b"%s%d\r\n%s%s\r\n" % (
                    opening,
                    index,
                    _lines(headers) if headers else b"",
                    b"Nats-Batch-Commit: 1\r\n" if last else b"",
                )
                _fitting(nc.max_payload, head, payload)
                commands.append(_hpub(subject, acks.reply_to() if last else b"", head, payload))
            if not nc.write_soon(b"".join(commands)):
                raise BrokerUnavailable("NATS is not connected")
            (commit,) = await acks.done
        finally:
            acks.close()
        if commit.get("count") != len(messages):
            raise BrokerUnavailable(f"the stream did not take the batch as one: {commit}")
        first = int(commit["seq"]) - len(messages) + 1
        return [Published(first + index) for index in range(len(messages))]


class _Acks:
    """The acks of one write, as they come: ``reply_to`` gives each message
    that expects one its reply subject; ``done`` has them all (read, see
    ``_read_ack``) in that order, or the first failure to arrive, or
    TimeoutError after ``timeout`` (one timer for the whole write, not a
    timeout scope and a gather). ``close`` forgets the replies and the timer.
    ``resent``: the messages are sent again while unacked, and "no
    responders" is no answer but a stream whose leader is moving (its
    subjects have no listener for a moment): the repeat may find the next."""

    __slots__ = ("_acks", "_inbox", "_left", "_replies", "_resent", "_timer", "done")

    def __init__(self, inbox: ReplyInbox, timeout: float, resent: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._inbox = inbox
        self._resent = resent
        self._acks: list[dict[str, Any] | None] = []
        self._replies: list[bytes] = []
        self._left = 0
        self.done: asyncio.Future[list[dict[str, Any]]] = loop.create_future()
        self._timer = loop.call_later(timeout, expire, (self.done,))

    def reply_to(self) -> bytes:
        """A reply subject for the next ack (all are asked for before any can come)."""
        reply = self._inbox.add(partial(self._take, len(self._acks)), self.done)
        self._acks.append(None)
        self._replies.append(reply)
        self._left += 1
        return reply

    def close(self) -> None:
        self._timer.cancel()
        self._inbox.discard(self._replies)
        if not self.done.done():
            self.done.cancel()
        # A refusal's traceback holds frames that hold this object: letting go
        # of the future that holds the refusal leaves no cycle for the GC.
        del self.done

    def _take(self, index: int, data: bytes, headers: dict[str, str] | None) -> None:
        if self.done.done() or self._acks[index] is not None:
            return
        if self._resent and no_responders(headers):
            return
        try:
            self._acks[index] = _read_ack(data, headers)
        except BrokerUnavailable as exc:
            self.done.set_exception(exc)
            return
        self._left -= 1
        if not self._left:
            self.done.set_result(self._acks)  # type: ignore[arg-type]  # none is None now


def _head(stream: str, headers: dict[str, str]) -> bytes:
    """The NATS header block; values are ours (checked event names, message ids)."""
    return b"NATS/1.0\r\n%s\r\n" % _lines({"Nats-Expected-Stream": stream, **headers})


def _lines(headers: dict[str, str]) -> bytes:
    return "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode()


def _fitting(limit: int, head: bytes, payload: bytes) -> bytes:
    """``head``, unless its message is over the server's max_payload (headers
    count): refused, as NATS closes a connection that sends one, and nats-py
    then closes for good."""
    size = len(head) + len(payload)
    if size > limit:
        raise MessageTooLarge(f"a message of {size} bytes (headers included) is over NATS max_payload ({limit})")
    return head


def _hpub(subject: str, reply: bytes, head: bytes, payload: bytes) -> bytes:
    """``reply`` empty: none (no ack is sent)."""
    return b"HPUB %s %s%d %d\r\n%s%s\r\n" % (
        subject.encode(),
        reply + b" " if reply else b"",
        len(head),
        len(head) + len(payload),
        head,
        payload,
    )


def _read_ack(data: bytes, headers: dict[str, str] | None) -> dict[str, Any]:
    """An ack that says where the stream stored a message (its ``seq``);
    BrokerUnavailable or Refused if it did not."""
    if no_responders(headers):
        raise BrokerUnavailable("no stream answered (is JetStream up?)")
    try:
        ack = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise Refused(f"unreadable ack: {data[:80]!r}") from None
    error = ack.get("error") if isinstance(ack, dict) else None
    if error is not None or not isinstance(ack, dict) or "seq" not in ack:
        description = error.get("description") if isinstance(error, dict) else ack
        code = error.get("err_code") if isinstance(error, dict) else 0
        raise Refused(f"the stream refused the message: {description}", code if isinstance(code, int) else 0)
    return ack
