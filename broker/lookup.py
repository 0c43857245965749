"""JetStream lookups asked through the reply inbox: the last message stored
on a subject, a stream's first and last sequence.

What nats-py's ``kv.get``, ``js.get_msg(subject=...)`` and ``stream_info``
ask, without their request machinery (an inbox token, a future and a
``wait_for`` per request, stdlib json, dataclasses): a reply subject under the
shared inbox (``ReplyInbox``), the answer read with orjson or from its
headers. Asked on every connect (a user's connection count and read position,
whether the user's channel holds anything new, the welcome's position), so
they have to be cheap.

Every lookup is asked of the stream's leader (``STREAM.MSG.GET``, never
behind). A direct get (``DIRECT.GET``, ADR-31) may be answered by any copy,
possibly a write behind: a connection table or read position read so would
refuse a user under their limit or hand read messages out again; pages and
replays read with direct gets up to what a leader's lookup named (pages.py,
store.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from dataclasses import dataclass

import nats.errors
import orjson

from .base import BrokerUnavailable
from .dispatch import DispatchingClient, pub_command
from .inbox import ReplyInbox, expire, no_responders
from .server_clock import ServerClock


@dataclass(frozen=True, slots=True)
class Stored:
    """A stored message: its sequence, payload and own headers (e.g. KV-Operation)."""

    seq: int
    data: bytes
    headers: dict[str, str]


class LookupFailed(BrokerUnavailable):
    """JetStream answered with an error other than "no such message"."""


async def ask(
    inbox: ReplyInbox,
    subject: str,
    payload: bytes,
    timeout: float,
    buffered: bool = False,
    asked: str = "JetStream",
    resend: bool = False,
) -> tuple[bytes, dict[str, str] | None]:
    """One request through the inbox: its reply's payload and headers.
    BrokerUnavailable if none comes within ``timeout`` (or NATS fails);
    ``asked`` names who did not answer in its message. ``resend``: a read,
    sent again while unanswered on the same reply subject (``ReplyInbox.resend``)."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[tuple[bytes, dict[str, str] | None]] = loop.create_future()

    def take(data: bytes, headers: dict[str, str] | None) -> None:
        if not answer.done():
            answer.set_result((data, headers))

    reply = ""
    try:
        nc, reply = await inbox.open(take, answer, buffered)
        command = pub_command(subject, reply, payload)
        if not nc.write_soon(command):
            await nc.publish(subject, payload, reply=reply)
        if resend:
            inbox.resend(reply.encode(), command)
        expiry = loop.call_later(timeout, expire, (answer,))
        try:
            return await answer
        finally:
            expiry.cancel()
    except TimeoutError:
        raise BrokerUnavailable(f"{asked} did not answer in time") from None
    except (OSError, nats.errors.Error) as exc:
        raise BrokerUnavailable(f"{asked} request failed: {exc.__class__.__name__}") from None
    finally:
        inbox.close(reply)


class LastMessage:
    """Reads the last message of a subject of one stream, from its leader."""

    __slots__ = ("_api", "_buffered", "_inbox", "_timeout")

    def __init__(self, inbox: ReplyInbox, stream: str, timeout: float, buffered: bool = False) -> None:
        self._inbox = inbox
        self._timeout = timeout
        self._api = f"$JS.API.STREAM.MSG.GET.{stream}"
        # While NATS reconnects: wait for it (as nats-py's requests do) rather than fail at once.
        self._buffered = buffered

    async def get(self, subject: str) -> Stored | None:
        """The last message stored on ``subject``; None if there is none (or
        no such stream: JetStream says 404 for both, as nats-py reads it).
        Raises BrokerUnavailable if no answer comes in time or it is an error."""
        request = orjson.dumps({"last_by_subj": subject})
        data, headers = await ask(self._inbox, self._api, request, self._timeout, self._buffered, resend=True)
        return _leader_answer(data, headers)


async def stream_bounds(
    inbox: ReplyInbox, stream: str, timeout: float, clock: ServerClock | None = None
) -> tuple[int, int]:
    """The lowest and the highest sequence the stream holds, as its leader
    says (STREAM.INFO, what nats-py's stream_info asks; only the state is
    read, not the whole answer turned into dataclasses). Waits out a
    reconnect within ``timeout``, as nats-py did. The answer's time sets ``clock``."""
    asked = time.time()
    try:
        data, headers = await ask(inbox, f"$JS.API.STREAM.INFO.{stream}", b"", timeout, buffered=True, resend=True)
    except BrokerUnavailable as exc:
        raise BrokerUnavailable(f"stream info failed: {exc}") from None
    if no_responders(headers):
        raise BrokerUnavailable("stream info failed: no stream answered (is JetStream up?)")
    try:
        answer = orjson.loads(data)
        error = answer.get("error")
        if error is not None:
            raise BrokerUnavailable(f"stream info failed: {error.get('description')}")
        state = answer["state"]
        if clock is not None:
            clock.note(answer, asked, time.time())
        return int(state.get("first_seq") or 0), int(state.get("last_seq") or 0)
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        raise BrokerUnavailable(f"stream info failed: unreadable answer {data[:80]!r}") from None


def _leader_answer(data: bytes, headers: dict[str, str] | None) -> Stored | None:
    if no_responders(headers):
        raise BrokerUnavailable("no stream answered (is JetStream up?)")
    try:
        answer = orjson.loads(data)
        error = answer.get("error")
        if error is not None:
            if error.get("code") == 404:
                return None
            raise LookupFailed(f"message lookup refused: {error.get('description')}")
        message = answer["message"]
        raw = message.get("hdrs")
        own = DispatchingClient._parse_header_lines(base64.b64decode(raw)) if raw else {}
        payload = message.get("data")
        return Stored(int(message["seq"]), base64.b64decode(payload) if payload else b"", own)
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError, binascii.Error):
        raise LookupFailed(f"unreadable lookup answer: {data[:80]!r}") from None
