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
channel, and is dropped: each channel's messages come once, in order (a
``Reset`` of a channel starts its count over: a recreated stream's ids do).
``subscribe(room, since)`` asks for a room's messages again: until it is
answered, that room's messages after ``since`` come once each, in whatever
order the live ones and the replay interleave.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .events import Event, Message, Reset, Welcome


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
        # Rewound channels: the position asked from, and the ids yielded since.
        self._replaying: dict[str, tuple[int, set[int]]] = {}
        self.duplicates = 0

    def __len__(self) -> int:
        return len(self._items)

    def welcomed(self, welcome: Welcome) -> None:
        """A connection opened: with nothing received yet, the welcome's
        position is where a reconnect resumes from."""
        if self.since is None and welcome.position is not None:
            self.since = welcome.position

    def rewind(self, channel: str, since: str) -> None:
        """``subscribe(room, since)`` asked for the room's messages after
        ``since`` again: let them through, each once, until ``rewound``
        (live ones may come before the replay, with larger ids)."""
        self._replaying[channel] = (int(since), set())

    def rewound(self, channel: str) -> None:
        """The subscribe that rewound ``channel`` was answered: its replay is in."""
        self._replaying.pop(channel, None)

    async def put(self, event: Event) -> None:
        """Add one event (waiting while the buffer is full); a message moves
        the resume position, and one seen already is dropped."""
        if isinstance(event, Reset):
            # Refetch and carry on: what follows may number from anywhere (a
            # recreated stream starts over), not as a repeat of what came.
            self._newest.pop(event.channel, None)
        elif isinstance(event, Message) and event.id is not None:
            self.since = event.id
            seq = int(event.id)
            newest = self._newest.get(event.channel, -1)
            replaying = self._replaying.get(event.channel)
            if replaying is not None:
                since, seen = replaying
                if seq <= since or seq in seen:
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
