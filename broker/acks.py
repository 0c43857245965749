"""JetStream publishes with many in flight, acks matched as they come.

Each message goes out as a plain PUB with a reply subject of its own
(``ReplyInbox``); the stream's ack comes back to it. A batch is written in
order without waiting between messages (the stream stores them in that
order: one connection's messages keep their order), then its acks are
awaited together.
"""

from __future__ import annotations

import asyncio
from functools import partial

import nats.errors
import orjson

from .base import BrokerUnavailable, Published
from .inbox import expire
from .link import NatsLink

# A message to publish: (subject, payload, headers or None).
Outgoing = tuple[str, bytes, dict[str, str] | None]


class Refused(BrokerUnavailable):
    """The stream answered, but did not store the message; ``code``: its
    JetStream error code (e.g. 10071, a wrong expected last sequence), 0 if none."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class AckedPublisher:
    """Publishes into the stream and waits for its acks."""

    def __init__(self, link: NatsLink, stream: str, timeout: float, buffered: bool = False) -> None:
        self._inbox = link.replies
        self._stream = stream  # expected: a subject another stream captured is refused, not stored there
        self._timeout = timeout
        self._headers = {"Nats-Expected-Stream": stream}
        self._head = _head(stream, {})
        self._buffered = buffered  # while NATS reconnects: wait for it (ReplyInbox.open)

    async def publish(self, messages: list[Outgoing]) -> list[Published]:
        """Publish ``messages`` in order; where the stream stored them, in the
        same order. Raises BrokerUnavailable (or Refused) if any is not
        acknowledged in time — the ones before it may be stored."""
        if not messages:
            return []
        loop = asyncio.get_running_loop()
        acks = _Acks(len(messages), loop.create_future())
        # One timer for the whole batch (not a timeout scope and a gather).
        timer = loop.call_later(self._timeout, expire, (acks.done,))
        inbox = self._inbox
        replies: list[bytes] = []
        try:
            nc = await inbox.ready(self._buffered)
            commands: list[bytes] = []
            for index, (subject, payload, headers) in enumerate(messages):
                reply = inbox.add(partial(acks.take, index))
                replies.append(reply)
                head = self._head if headers is None else _head(self._stream, headers)
                commands.append(_hpub(subject, reply, head, payload))
            if not nc.write_soon(b"".join(commands)):
                for (subject, payload, headers), reply in zip(messages, replies, strict=True):
                    await nc.publish(
                        subject, payload, reply=reply.decode(), headers={**self._headers, **(headers or {})}
                    )
            return await acks.done
        except TimeoutError:
            raise BrokerUnavailable("publish not acknowledged in time") from None
        except (OSError, nats.errors.Error) as exc:
            raise BrokerUnavailable(f"publish not acknowledged: {exc.__class__.__name__}") from None
        finally:
            timer.cancel()
            inbox.discard(replies)
            if not acks.done.done():
                acks.done.cancel()


class _Acks:
    """The acks of one batch as they come: ``done`` has them all, in order,
    or the first failure to arrive."""

    __slots__ = ("_acks", "_left", "done")

    def __init__(self, count: int, done: asyncio.Future[list[Published]]) -> None:
        self._acks: list[Published | None] = [None] * count
        self._left = count
        self.done = done

    def take(self, index: int, data: bytes, headers: dict[str, str] | None) -> None:
        if self.done.done() or self._acks[index] is not None:
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
    lines = [f"{name}: {value}" for name, value in {"Nats-Expected-Stream": stream, **headers}.items()]
    return ("NATS/1.0\r\n" + "\r\n".join(lines) + "\r\n\r\n").encode()


def _hpub(subject: str, reply: bytes, head: bytes, payload: bytes) -> bytes:
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
        subject.encode(),
        reply,
        len(head),
        len(head) + len(payload),
        head,
        payload,
    )


def _read_ack(data: bytes, headers: dict[str, str] | None) -> Published:
    """Where the stream stored a message, from its ack; BrokerUnavailable or
    Refused if it did not."""
    if headers and headers.get("Status") == "503":
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
    return Published(int(ack["seq"]), bool(ack.get("duplicate")))
