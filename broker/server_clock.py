"""nats-server's clock, as seen from this process: JetStream stamps messages
with it, so whatever compares a message's time with "now" (how long ago it
was stored) must read "now" on it too, not on this host's clock, which may be
off by seconds or minutes (NTP not synced yet after a boot, a VM resumed).

The offset comes from the ``ts`` of a JetStream API answer (STREAM.INFO,
CONSUMER.INFO: the server's time when it answered), taken at the middle of
the request: off by at most half the round trip. A step of this host's clock
moves the offset: ``stepped`` tells one without asking the server."""

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
# Seconds this host's wall clock may move against its monotonic clock before
# that is a step. NTP's slewing moves both alike; a step (ntpd, chrony,
# an admin) or a resume from suspend moves the wall clock alone.
STEP = 0.01


class ServerClock:
    """The offset of nats-server's clock from this host's, from the answers ``ask`` gets;
    ``read`` is told this host's clock minus the server's at each reading."""

    def __init__(self, read: Callable[[float], None] | None = None) -> None:
        self.offset = 0.0  # seconds the server's clock is ahead of ours (until an answer says)
        self._read = read
        self._read_at: float | None = None  # time.monotonic() of the last reading
        self._wall_at_read = 0.0  # time.time() - time.monotonic() then: moves only when this host's clock steps

    def now(self) -> float:
        """The time on nats-server's clock, in unix seconds."""
        return time.time() + self.offset

    def age(self) -> float:
        """Seconds since the last reading (infinite before the first)."""
        return float("inf") if self._read_at is None else time.monotonic() - self._read_at

    def stepped(self) -> bool:
        """Whether this host's wall clock stepped since the last reading (or
        none was taken): the offset read then is wrong by the step."""
        return self._read_at is None or abs(time.time() - time.monotonic() - self._wall_at_read) > STEP

    def note(self, answer: dict[str, Any], asked: float, answered: float) -> None:
        """Take the server's time from a JetStream API answer asked at
        ``asked`` and answered at ``answered`` (this host's ``time.time()``)."""
        stamp = answer.get("ts")
        if isinstance(stamp, str) and 0 <= answered - asked < READ_MAX:
            with contextlib.suppress(ValueError):  # not a time: the offset stays as it was
                self.offset = parse_rfc3339(stamp) - (asked + answered) / 2
                self._read_at = time.monotonic()
                self._wall_at_read = time.time() - self._read_at
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
