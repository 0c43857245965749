"""Commands awaiting their answers, matched by ``ref`` (docs/protocol.md §3.4).

Each command gets a fresh ``ref`` and a future. The answer with that ref
(``ack``, ``presence``, ``pong``, ``history``) resolves it; an ``error``
frame fails it with ``CommandError``. A command belongs to the connection it
was sent on: when that connection drops, its answer can never come, and it
fails with ``disconnected``.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from .events import CommandError

Answer = dict[str, Any]


class Calls:
    """The commands sent and not yet answered."""

    def __init__(self) -> None:
        self._refs = itertools.count(1)
        self._pending: dict[str, tuple[asyncio.Future[Answer], object]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def open(self, conn: object) -> tuple[str, asyncio.Future[Answer]]:
        """A new ref, and the future its answer resolves, for a command sent on ``conn``."""
        ref = str(next(self._refs))
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pending[ref] = (future, conn)
        return ref, future

    def forget(self, ref: str) -> None:
        """The caller stopped waiting (answered, timed out, cancelled)."""
        self._pending.pop(ref, None)

    def answer(self, frame: Answer) -> bool:
        """Resolve the command ``frame`` answers; False if it answers none
        (no ref, or the caller gave up already)."""
        ref = frame.get("ref")
        entry = self._pending.pop(ref, None) if isinstance(ref, str) else None
        if entry is None:
            return False
        future = entry[0]
        if future.done():
            return True
        if frame.get("type") == "error":
            retry = frame.get("retry_after")
            future.set_exception(
                CommandError(
                    str(frame.get("code", "error")),
                    str(frame.get("message", "")),
                    float(retry) if isinstance(retry, int | float) else None,
                )
            )
        else:
            future.set_result(frame)
        return True

    def fail(self, error: CommandError | Exception, conn: object | None = None) -> None:
        """Fail the commands sent on ``conn`` (None: every one) with ``error``."""
        for ref, (future, on) in list(self._pending.items()):
            if conn is None or on is conn:
                del self._pending[ref]
                if not future.done():
                    future.set_exception(error)
