"""A nats-py client that dispatches live subscriptions in its reader.

nats-py gives each subscription an asyncio queue and a task (or an iterator)
and hands messages over through them: ~5 KiB per subscription, a task switch
per message, and no order across subscriptions — two channels' messages can
be handled in another order than the server sent them. A node needs that order
(one id is a client's whole resume position) and holds one subscription per
user, so its live subscriptions are handled here instead: synchronously, in
the reader, in arrival order. Everything else (JetStream, KV, requests) goes
through nats-py as usual.

This relies on ``Client._process_msg`` and ``Client._sid``, private to nats-py
(checked at import; the version range is pinned in setup.cfg).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.subscription import Subscription

# The reader dispatches what it has read without returning to the event loop;
# it yields after about this much, so the writers of what it queued get to
# run (a burst from NATS must not overflow the queues of healthy clients).
# Each message counts its payload plus a fixed cost.
YIELD_EVERY = 64 * 1024
MESSAGE_COST = 256

# (subject, payload, headers or None)
Handler = Callable[[bytes, bytes, dict[str, str] | None], None]

if "_process_msg" not in vars(Client) or not inspect.iscoroutinefunction(Client._process_msg):
    raise ImportError("this nats-py has no Client._process_msg coroutine: Herald needs nats-py 2.x")


class DispatchingClient(Client):
    def __init__(self) -> None:
        super().__init__()
        self._handlers: dict[int, Handler] = {}
        self._burst = 0

    async def subscribe_direct(self, subject: str, handler: Handler) -> Subscription:
        """Subscribe with ``handler`` called for each message, in the reader."""
        # nats-py numbers the subscription synchronously inside subscribe(),
        # before its first await: register under that number first, so a
        # message that arrives before subscribe() returns already finds it.
        sid = self._sid + 1
        self._handlers[sid] = handler
        try:
            sub = await self.subscribe(subject)  # no callback: no task; its queue stays empty
        except BaseException:
            self._handlers.pop(sid, None)
            raise
        if sub._id != sid:  # pragma: no cover - a nats-py that numbers differently
            self._handlers.pop(sid, None)
            await sub.unsubscribe()
            raise RuntimeError("nats-py subscription ids are not sequential")
        # The SUB waits in nats-py's pending buffer, but flush() writes its
        # PING straight to the socket: without this, the PONG can come back
        # before the server has seen the SUB, and "subscribed" would not yet
        # mean "live". Wait until the flusher has written the SUB.
        await self._flush_pending(force_flush=True)
        return sub

    async def unsubscribe_direct(self, sub: Subscription) -> None:
        self._handlers.pop(sub._id, None)
        await sub.unsubscribe()

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
