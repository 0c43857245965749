"""Commands awaiting their answers, matched by ``ref`` (docs/protocol.md §3.4).

Each command gets a fresh ``ref`` and a future. The answer with that ref
(``ack``, ``presence``, ``pong``, ``history``) resolves it; an ``error``
frame fails it with ``CommandError``. A command belongs to the connection it
was sent on: when that connection drops, its answer can never come, and it
fails with ``disconnected``.

A command may have an effect on the client's state (``subscribe``,
``unsubscribe`` and ``refresh`` on the room set, ``refresh`` on the token,
``subscribe {since}`` on the repeat filter): it is applied, once, when the answer is
read, in the order the answers come — also when the caller stopped waiting
first (a timeout): the node ran the command all the same. It is applied
with None when no answer can come (the connection ended, or too many
commands were left waiting for theirs).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

from ..frames import dumps_exact
from .events import CommandError

Answer = dict[str, Any]
Effect = Callable[[Answer | None], None]  # a command's effect: its answer (an error frame too), or None: none came

_MAX_LATE = 1000  # commands given up on, kept for the effect of their answer
_REF_ROOM = 20  # bytes a ref of ours may take: the digits of a counter


def encode(kind: str, fields: dict[str, Any], max_frame: int) -> str:
    """A command's frame with an empty ref (``with_ref`` fills it in),
    integers exact at any size. Over ``max_frame`` the node would close the
    connection (1009) and the command certainly not run: refused here."""
    frame = dumps_exact({"type": kind, **fields, "ref": ""})
    if len(frame) + _REF_ROOM > max_frame:
        raise CommandError(
            "too_large", f"{kind} is {len(frame)} bytes, over the node's ws.max_frame ({max_frame}): not sent"
        )
    return frame.decode()


def with_ref(frame: str, ref: str) -> str:
    """A frame of ``encode`` (ending ``"ref":""}``) with its ``ref``: digits, nothing to escape."""
    return f"{frame[:-2]}{ref}{frame[-2:]}"


class Calls:
    """The commands sent and not yet answered."""

    def __init__(self) -> None:
        self._refs = itertools.count(1)
        self._pending: dict[str, tuple[asyncio.Future[Answer], object, Effect | None]] = {}
        self._late: dict[str, None] = {}  # refs of _pending whose caller gave up waiting, oldest first

    def __len__(self) -> int:
        return len(self._pending)

    def open(self, conn: object, effect: Effect | None = None) -> tuple[str, asyncio.Future[Answer]]:
        """A new ref, and the future its answer resolves, for a command sent on ``conn``."""
        ref = str(next(self._refs))
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pending[ref] = (future, conn, effect)
        return ref, future

    def unsent(self, ref: str) -> Effect | None:
        """The command could not be sent: forgotten, and its effect handed back (for the next try)."""
        entry = self._pending.pop(ref, None)
        return entry[2] if entry is not None else None

    def forget(self, ref: str) -> None:
        """The caller stopped waiting (answered, timed out, cancelled). A
        command with an effect not answered yet is kept for its answer, until
        its connection ends (the oldest goes, without one, past ``_MAX_LATE``)."""
        entry = self._pending.get(ref)
        if entry is None:
            return
        future, _, effect = entry
        future.cancel()
        if effect is None:
            del self._pending[ref]
            return
        self._late[ref] = None
        if len(self._late) > _MAX_LATE:
            self._settle(next(iter(self._late)), None)

    def answer(self, frame: Answer) -> bool:
        """Resolve the command ``frame`` answers (and apply its effect); False
        if it answers none (no ref, or the caller gave up already on a
        command without an effect)."""
        ref = frame.get("ref")
        future = self._settle(ref, frame) if isinstance(ref, str) else None
        if future is None:
            return False
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
        for ref, (_, on, _) in list(self._pending.items()):
            if conn is None or on is conn:
                future = self._settle(ref, None)
                if future is not None and not future.done():
                    future.set_exception(error)

    def _settle(self, ref: str, answer: Answer | None) -> asyncio.Future[Answer] | None:
        """Take ``ref`` out, applying its effect with ``answer``: its future (None: no such command)."""
        entry = self._pending.pop(ref, None)
        if entry is None:
            return None
        future, _, effect = entry
        self._late.pop(ref, None)
        if effect is not None:
            effect(answer)
        return future
