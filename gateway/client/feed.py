"""The events between the socket and the iterator, and the resume position.

The reader puts what the node sends; the application takes it out in the
same order. The buffer is bounded: when the application falls behind, the
reader stops reading, so the node sees a slow consumer (4008) and the client
reconnects and resumes, instead of memory growing without end. It survives
reconnects: nothing received is dropped by one.

Positions (docs/protocol.md §7.1): the client resumes from the last id it
*received* (not the largest), else from where it started (``since``), else
from ``welcome.position``. A message that comes a second time (after a gap
repair and a reconnect) has an id no larger than the last one of its
channel, and is dropped: each channel's messages come once, in order.

A ``Reset`` (docs/protocol.md §7.2) says messages were lost, not always that
ids start over. Only a reset for a position past the stream's end (the
stream was recreated or restored) starts the channel's count over; one for
messages no longer held, or lost in transit, is of the same stream, whose
ids keep growing: the count stays, or a later resume that brings the
channel's held messages again would hand them out twice. The frame does not
say which: the position it is about (where the connection resumed from, or
``subscribe``'s ``since``) is past the end when it is above every id this
stream is known to have reached (the welcome's ``position``, the ids
received since).

``subscribe(room, since)`` asks for a room's messages again: until it is
answered (when the answer is read, also after the caller's timeout: the
replay comes before it), that room's messages after ``since`` come once
each, in whatever order the live ones and the replay interleave, and so do
new ones (after the newest handed out) whatever ``since`` is.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .events import Event, Message, Reset, Welcome, is_id

Replay = tuple[int, set[int]]  # a rewind: the position asked from, and the ids yielded since


class Feed:
    """Events in order, at most ``size`` waiting, with the resume position."""

    def __init__(self, size: int, since: str | None = None) -> None:
        if size < 1:
            raise ValueError("the buffer needs room for one event")
        self._size = size
        self._items: deque[Event] = deque()
        self._ready = asyncio.Event()  # something to take, or the end
        self._room = asyncio.Event()  # below size again
        self._room.set()
        self._ended = False
        self._error: BaseException | None = None
        self._aborted = False
        self.since = since  # where the next connection resumes from
        self._newest: dict[str, int] = {}  # channel -> the largest id yielded on it
        self._replaying: dict[str, Replay] = {}  # rewound channels
        self._opened_from: int | None = None  # the position the connection resumed from
        self._reach: int | None = None  # the largest id the stream has, as far as known (None: unknown)
        self.duplicates = 0

    def __len__(self) -> int:
        return len(self._items)

    def welcomed(self, welcome: Welcome) -> None:
        """A connection opened: with nothing received yet, the welcome's
        position is where a reconnect resumes from."""
        self._opened_from = _seq(self.since)
        self._reach = _seq(welcome.position)
        if self.since is None and welcome.position is not None:
            self.since = welcome.position

    def rewind(self, channel: str, since: str) -> Replay:
        """``subscribe(room, since)`` asked for the room's messages after
        ``since`` again: let them through, each once, until ``rewound``
        (live ones may come before the replay, with larger ids)."""
        replay = self._replaying[channel] = (int(since), set())
        return replay

    def rewound(self, channel: str, replay: Replay) -> None:
        """The subscribe that made ``replay`` was answered (also after its
        caller's timeout: the replay comes before the answer), or can no
        longer be: its replay is in. A later rewind of the channel stays."""
        if self._replaying.get(channel) is replay:
            del self._replaying[channel]

    async def put(self, event: Event) -> None:
        """Add one event (waiting while the buffer is full); a message moves
        the resume position, and one seen already is dropped."""
        if isinstance(event, Reset):
            self._reset(event.channel)
        elif isinstance(event, Message) and event.id is not None:
            self.since = event.id
            seq = int(event.id)
            if self._reach is not None:
                self._reach = max(self._reach, seq)
            newest = self._newest.get(event.channel, -1)
            replaying = self._replaying.get(event.channel)
            if replaying is not None:
                since, seen = replaying
                # Handed out already: in this replay, or before both ``since`` and
                # the newest (above the newest: a live one, new whatever ``since`` is).
                if seq in seen or seq <= min(since, newest):
                    self.duplicates += 1
                    return
                seen.add(seq)
            elif seq <= newest:
                self.duplicates += 1
                return
            self._newest[event.channel] = max(seq, newest)
        while len(self._items) >= self._size and not self._aborted:
            self._room.clear()
            await self._room.wait()
        if not self._aborted:
            self._items.append(event)
            self._ready.set()

    def _reset(self, channel: str) -> None:
        """A reset of ``channel``: for a position past the stream's end, its
        ids start over: its count goes, and so does a rewind whose ``since``
        is not of this stream (live messages below it are new). A node that
        sends no ``position`` cannot be told: its count goes."""
        replaying = self._replaying.get(channel)
        about = replaying[0] if replaying is not None else self._opened_from
        past_the_end = about is not None and self._reach is not None and about > self._reach
        if past_the_end:
            self._replaying.pop(channel, None)
        if past_the_end or self._reach is None:
            self._newest.pop(channel, None)

    def end(self, error: BaseException | None = None) -> None:
        """No more events: ``get`` returns what is left, then None (or raises ``error``)."""
        if not self._ended:
            self._ended, self._error = True, error
            self._ready.set()

    def abort(self) -> None:
        """The application closed the client: ``get`` returns None at once."""
        self._aborted = True
        self._items.clear()
        self._ready.set()
        self._room.set()

    async def get(self) -> Event | None:
        """The next event; None once the feed has ended and is empty."""
        while True:
            if self._aborted:
                return None
            if self._items:
                event = self._items.popleft()
                if len(self._items) < self._size:
                    self._room.set()
                return event
            if self._ended:
                if self._error is not None:
                    raise self._error
                return None
            self._ready.clear()
            await self._ready.wait()


def _seq(text: str | None) -> int | None:
    """A position as a number (None: none, or not an id)."""
    return int(text) if text is not None and is_id(text) else None
