"""JetStream publishes with many in flight, acks matched as they come.

Each message goes out as a plain PUB with a reply subject of its own
(``ReplyInbox``); the stream's ack comes back to it. A batch is written in
order without waiting between messages (the stream stores them in that
order: one connection's messages keep their order), then its acks are
awaited together.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import nats.errors
import orjson

from .base import BrokerUnavailable
from .inbox import OnReply, expire
from .link import NatsLink

# A message to publish: (subject, payload, headers or None).
Outgoing = tuple[str, bytes, dict[str, str] | None]


@dataclass(frozen=True, slots=True)
class Ack:
    """Where the stream stored a message; ``duplicate``: it had it already
    (same ``Nats-Msg-Id`` within the stream's duplicate window) and ``seq`` is
    the first copy's."""

    seq: int
    duplicate: bool = False


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

    async def publish(self, messages: list[Outgoing]) -> list[Ack]:
        """Publish ``messages`` in order; their acks, in the same order. Raises
        BrokerUnavailable (or Refused) if any is not acknowledged in time —
        the ones before it may be stored."""
        if not messages:
            return []
        loop = asyncio.get_running_loop()
        pending: list[asyncio.Future[Ack]] = []
        replies: list[str] = []
        # One timer for the whole batch (not a timeout scope and a gather).
        timer = loop.call_later(self._timeout, expire, pending)
        try:
            commands: list[bytes] = []
            for subject, payload, headers in messages:
                future: asyncio.Future[Ack] = loop.create_future()
                nc, reply = await self._inbox.open(_resolver(future), self._buffered)
                replies.append(reply)
                pending.append(future)
                head = self._head if headers is None else _head(self._stream, headers)
                commands.append(_hpub(subject, reply, head, payload))
            if not nc.write_soon(b"".join(commands)):
                for (subject, payload, headers), reply in zip(messages, replies, strict=True):
                    await nc.publish(subject, payload, reply=reply, headers={**self._headers, **(headers or {})})
            return [await future for future in pending]
        except TimeoutError:
            raise BrokerUnavailable("publish not acknowledged in time") from None
        except (OSError, nats.errors.Error) as exc:
            raise BrokerUnavailable(f"publish not acknowledged: {exc.__class__.__name__}") from None
        finally:
            timer.cancel()
            for reply in replies:
                self._inbox.close(reply)
            for future in pending:
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # retrieved: one failure is raised, the others are not warnings


def _head(stream: str, headers: dict[str, str]) -> bytes:
    """The NATS header block; values are ours (checked event names, message ids)."""
    lines = [f"{name}: {value}" for name, value in {"Nats-Expected-Stream": stream, **headers}.items()]
    return ("NATS/1.0\r\n" + "\r\n".join(lines) + "\r\n\r\n").encode()


def _hpub(subject: str, reply: str, head: bytes, payload: bytes) -> bytes:
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
        subject.encode(),
        reply.encode(),
        len(head),
        len(head) + len(payload),
        head,
        payload,
    )


def _resolver(future: asyncio.Future[Ack]) -> OnReply:
    """What to do with the reply to one message: resolve its future."""

    def resolve(data: bytes, headers: dict[str, str] | None) -> None:
        if future.done():
            return
        if headers and headers.get("Status") == "503":
            future.set_exception(BrokerUnavailable("no stream answered (is JetStream up?)"))
            return
        try:
            ack = orjson.loads(data)
        except orjson.JSONDecodeError:
            future.set_exception(Refused(f"unreadable ack: {data[:80]!r}"))
            return
        error = ack.get("error") if isinstance(ack, dict) else None
        if error is not None or not isinstance(ack, dict) or "seq" not in ack:
            description = error.get("description") if isinstance(error, dict) else ack
            code = error.get("err_code") if isinstance(error, dict) else 0
            refused = f"the stream refused the message: {description}"
            future.set_exception(Refused(refused, code if isinstance(code, int) else 0))
            return
        future.set_result(Ack(int(ack["seq"]), bool(ack.get("duplicate"))))

    return resolve
