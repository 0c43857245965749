"""What the webhook dispatcher handles: a stored user-channel message, and
the shared consumer's load (``HookSource`` in hooks.py yields and reports them)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.msg import Msg


@dataclass(frozen=True, slots=True)
class HookMessage:
    """One stored user-channel message as the dispatcher sees it."""

    id: int  # the stream sequence: with ``stream``, the idempotency key
    user: str
    event: str
    data: bytes
    timestamp: float  # when the stream stored it (unix seconds)
    attempt: int  # 1 for the first delivery to a dispatcher
    _msg: Msg
    stream: str = ""  # the stream's incarnation (a recreated stream numbers from 1 again)
    clock: Callable[[], float] = time.time  # now, on the clock that stored it (HookSource.now)

    @property
    def age(self) -> float:
        return self.clock() - self.timestamp

    async def done(self) -> None:
        await self._msg.ack()

    async def later(self, delay: float) -> None:
        """Hand it back, to come again (to any dispatcher) after ``delay`` seconds."""
        await self._msg.nak(delay=max(0.0, delay))

    async def working(self) -> None:
        """Still on it: JetStream keeps it from the others for another ack_wait."""
        await self._msg.in_progress()


@dataclass(frozen=True, slots=True)
class Backlog:
    """The shared consumer's load, for all dispatchers."""

    waiting: int  # not yet handed to a dispatcher
    held: int  # handed out, not answered: being POSTed, fetched and not yet due, or waiting for a delayed nak
    limit: int  # the consumer's max_ack_pending: at it, JetStream hands out nothing new

    @property
    def full(self) -> bool:
        return self.held >= self.limit > 0
