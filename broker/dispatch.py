"""A nats-py client that dispatches live subscriptions in its reader.

nats-py gives each subscription an asyncio queue and a task (or an iterator)
and hands messages over through them: ~5 KiB per subscription, a task switch
per message, and no order across subscriptions — two channels' messages can
be handled in another order than the server sent them. A node needs that order
(one id is a client's whole resume position) and holds one subscription per
user, so its live subscriptions are handled here instead: synchronously, in
the reader, in arrival order. Everything else (JetStream, KV, requests) goes
through nats-py as usual.

This relies on nats-py internals — ``Client._process_msg``, ``_sid``,
``_subs``, ``_send_subscribe``, ``_flush_pending`` and the attributes its
reconnect and close read from a subscription — checked at import, and on
``_resp_map`` and ``_pongs`` (its requests' and flushes' futures, see
``fail_requests``); the version range is pinned in setup.cfg and the suite's reconnect tests cover it.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Callable

from nats.aio.client import Client
from nats.errors import ConnectionClosedError, ConnectionDrainingError

# The reader dispatches what it has read without returning to the event loop;
# it yields after about this much, so the writers of what it queued get to
# run (a burst from NATS must not overflow the queues of healthy clients).
# Each message counts its payload plus a fixed cost.
YIELD_EVERY = 64 * 1024
MESSAGE_COST = 256

# (subject, payload, headers or None)
Handler = Callable[[bytes, bytes, dict[str, str] | None], None]

_NEEDED = ("_process_msg", "_process_headers", "_send_subscribe", "_flush_pending")
if not all(inspect.iscoroutinefunction(getattr(Client, name, None)) for name in _NEEDED):
    raise ImportError("this nats-py lacks the client internals Herald dispatches through: it needs nats-py 2.x")


class LiveSubscription:
    """A subscription dispatched by ``DispatchingClient``: only what nats-py's
    client reads of the subscriptions it holds (to resubscribe after a
    reconnect, and on close) — no queue, no task, no iterator (~4 KiB less
    per subscription, and the node holds one per user)."""

    __slots__ = (
        "_id",
        "_jsi",
        "_max_msgs",
        "_message_iterator",
        "_pending_next_msgs_calls",
        "_queue",
        "_received",
        "_subject",
        "_wait_for_msgs_task",
    )

    def __init__(self, sid: int, subject: str) -> None:
        self._id = sid
        self._subject = subject
        self._queue = ""
        self._max_msgs = 0
        self._received = 0
        self._jsi = None
        self._wait_for_msgs_task = None
        self._message_iterator = None
        self._pending_next_msgs_calls = None

    @property
    def subject(self) -> str:
        return self._subject


_SPACE = re.compile(r"\s")
# What bytes.strip() strips, as nats-py strips names and values (str.strip()
# also strips \x1c-\x1f, \x85, \xa0...).
_ASCII_SPACE = " \t\n\r\x0b\x0c"


class DispatchingClient(Client):
    """A nats-py client that hands live messages to plain callbacks (no task or queue per subscription)."""

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        """nats-py's header parsing, its rules kept (names trimmed and without
        whitespace, values trimmed and decoded leniently) but 4 times faster: it
        ran a generator over every character of every name, ~40 µs a message
        — a cost every live message and every message a page reads pays."""
        out: dict[str, str] = {}
        for line in raw.decode("utf-8", "replace").split("\r\n"):
            name, sep, value = line.partition(":")
            if not sep:
                continue
            key = name.strip(_ASCII_SPACE)
            if key.isascii() and _SPACE.search(key) is None:
                out[key] = value.strip(_ASCII_SPACE)
        return out

    def __init__(self) -> None:
        super().__init__()
        self._handlers: dict[int, Handler] = {}
        self._burst = 0
        self._outgoing: list[bytes] = []  # see write_soon

    async def subscribe_direct(self, subject: str, handler: Handler) -> LiveSubscription:
        """Subscribe with ``handler`` called for each message, in the reader.
        Returns once the SUB is written to the socket."""
        sub = self._register(subject, handler)
        try:
            await self._send_subscribe(sub)  # type: ignore[arg-type]
            await self._flush_pending(force_flush=True)  # see confirm()
        except BaseException:
            self._forget(sub)
            raise
        return sub

    def subscribe_soon(self, subject: str, handler: Handler) -> LiveSubscription:
        """``subscribe_direct`` with the SUB written at the end of this loop
        pass, ahead of every command queued after it (``write_soon`` writes
        nats-py's buffer first): an answer to a request made after it shows
        the server has the subscription (``confirm`` when there is none).
        Nothing to await: a cancel cannot leave a subscription half made."""
        sub = self._register(subject, handler)
        self._queue_command(b"SUB %s %d\r\n" % (subject.encode(), sub._id))
        return sub

    def unsubscribe_soon(self, sub: LiveSubscription) -> None:
        """Drop ``sub``: its UNSUB written at the end of this loop pass, after
        every SUB queued before it. While reconnecting too: a SUB written
        during the outage waits in the same buffer, and the UNSUB behind it
        undoes it (else the server keeps the subject). Closed: nothing to drop."""
        self._forget(sub)
        if not self.is_closed:
            self._queue_command(b"UNSUB %d\r\n" % sub._id)

    def _queue_command(self, command: bytes) -> None:
        # nats-py's buffer: while reconnecting, written after the reconnect's
        # own SUBs of every subscription (the server takes a repeat as one).
        self._pending.append(command)
        self._pending_data_size += len(command)
        if not self._outgoing and self._transport is not None and self.is_connected:
            self._outgoing.append(b"")  # a write at the end of the pass, as write_soon's
            asyncio.get_running_loop().call_soon(self._write_out)

    def _register(self, subject: str, handler: Handler) -> LiveSubscription:
        if self.is_closed:
            raise ConnectionClosedError
        if self.is_draining:
            raise ConnectionDrainingError
        self._sid += 1
        sub = LiveSubscription(self._sid, subject)
        self._handlers[sub._id] = handler
        self._subs[sub._id] = sub  # type: ignore[assignment]  # resubscribed by nats-py on reconnect
        return sub

    async def confirm(self, timeout: int) -> None:
        """Return once the server has every SUB queued before the call: the
        pending buffer written, then a PING/PONG round trip. (The SUBs wait in
        nats-py's pending buffer, but flush() writes its PING straight to the
        socket: without the write first, the PONG could come back before the
        server has seen them.)"""
        await self._flush_pending(force_flush=True)
        await self.flush(timeout)

    def fail_requests(self) -> None:
        """The connection is closed for good: no answer comes to a request
        nats-py waits on (JetStream's API, KV, a direct get), nor a PONG to a
        flush's PING (nats-py's close stops its reader, and a PONG not read
        by then never is: confirm). Each fails now with ConnectionClosedError,
        as one made now would, not at its timeout."""
        for future in [*self._resp_map.values(), *self._pongs]:
            if not future.done():
                future.set_exception(ConnectionClosedError())
                future.exception()  # read: a request whose PUB failed never awaits its future

    def _forget(self, sub: LiveSubscription) -> None:
        self._handlers.pop(sub._id, None)
        self._subs.pop(sub._id, None)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        handler = self._handlers.get(sid)
        if handler is None:
            await super()._process_msg(sid, subject, reply, data, headers)  # type: ignore[arg-type]
            return
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        handler(subject, data, await self._process_headers(headers) if headers else None)
        self._burst += len(data) + MESSAGE_COST
        if self._burst >= YIELD_EVERY:
            self._burst = 0
            await asyncio.sleep(0)

    def write_soon(self, command: bytes) -> bool:
        """Write a protocol command at the end of this loop pass, with every
        other of the pass in one write; False while not connected (queue it
        the usual way: nats-py sends its buffer after the reconnect). nats-py
        queues each command for its flusher task: a Future, a queue, a task
        wake-up and a drain per publish."""
        if self._transport is None or not self.is_connected:
            return False
        self._outgoing.append(command)
        if len(self._outgoing) == 1:
            asyncio.get_running_loop().call_soon(self._write_out)
        self.stats["out_msgs"] += 1
        return True

    def _write_out(self) -> None:
        out, self._outgoing = self._outgoing, []
        if self._transport is None or not self.is_connected:  # lost meanwhile: sent after the reconnect
            self._pending.extend(out)
            self._pending_data_size += sum(map(len, out))
            return
        if self._pending:  # what nats-py queued goes first, in its order; its flusher then finds nothing
            out = [*self._pending, *out]
            self._pending = []
            self._pending_data_size = 0
        try:
            self._transport.writelines(out)
        except (OSError, RuntimeError):  # the socket is gone, nats-py has not seen it yet (uvloop: RuntimeError)
            self._pending = out  # sent after the reconnect, as above
            self._pending_data_size = sum(map(len, out))


def pub_command(subject: str, reply: str, payload: bytes) -> bytes:
    """A plain PUB with a reply subject (subjects are ours, already valid)."""
    return b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), len(payload), payload)
