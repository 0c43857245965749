"""nats-server's clock, as seen from this process: JetStream stamps messages
with it, so whatever compares a message's time with "now" (how long ago it
was stored) must read "now" on it too, not on this host's clock, which may be
off by seconds or minutes (NTP not synced yet after a boot, a VM resumed).

The offset comes from the ``ts`` of a JetStream API answer (STREAM.INFO,
CONSUMER.INFO: the server's time when it answered), taken at the middle of
the request: off by at most half the round trip."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import orjson
from nats.aio.client import Client

from .timestamps import parse_rfc3339

# A read whose answer took longer than this (seconds) may be off by half of it: its ts is not used.
READ_MAX = 1.0


class ServerClock:
    """The offset of nats-server's clock from this host's, from the answers ``ask`` gets;
    ``read`` is told this host's clock minus the server's at each reading."""

    def __init__(self, read: Callable[[float], None] | None = None) -> None:
        self.offset = 0.0  # seconds the server's clock is ahead of ours (until an answer says)
        self._read = read

    def now(self) -> float:
        """The time on nats-server's clock, in unix seconds."""
        return time.time() + self.offset

    def note(self, answer: dict[str, Any], asked: float, answered: float) -> None:
        """Take the server's time from a JetStream API answer asked at
        ``asked`` and answered at ``answered`` (this host's ``time.time()``)."""
        stamp = answer.get("ts")
        if isinstance(stamp, str) and 0 <= answered - asked < READ_MAX:
            with contextlib.suppress(ValueError):  # not a time: the offset stays as it was
                self.offset = parse_rfc3339(stamp) - (asked + answered) / 2
                if self._read is not None:
                    self._read(-self.offset)

    async def ask(self, nc: Client, subject: str, timeout: float) -> dict[str, Any]:
        """The JSON answer of a JetStream API request (nats-py's info
        dataclasses drop ``ts``), noting the server's time it carries. Raises
        what the request raises, or ValueError if the answer is not an object."""
        asked = time.time()
        reply = await nc.request(subject, b"", timeout=timeout)
        answered = time.time()
        answer = orjson.loads(reply.data)
        if not isinstance(answer, dict):
            raise ValueError(f"not a JSON object: {reply.data[:80]!r}")
        self.note(answer, asked, answered)
        return answer
