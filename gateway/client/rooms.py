"""The rooms a client is in, and how a reconnect gets them back.

Two kinds (docs/protocol.md §3.2, ``subscribed``):

- rooms the client asked for (``rooms=``, an acknowledged ``subscribe``):
  they go in the URL of every new connection, so the node joins them before
  the ``welcome``;
- rooms the backend joined it to (a ``subscribed`` frame, from
  ``POST /api/subscribe``): the token may not allow them, so they are asked
  for again after each ``welcome`` with ``subscribe {room, since}`` — a room
  the token no longer allows then costs that room, not the connection.
  Asked rooms past what a URL holds (``MAX_QUERY``) become such rooms too.

The set follows the answers: the node runs one connection's commands in the
order sent and answers them in that order, so an acknowledged ``subscribe``
puts its room in, and an ``unsubscribe``'s answer, or an ``unsubscribed``
frame, takes it out of both kinds. A room with an ``unsubscribe`` under way
is left out of the set meanwhile (not in a new URL, not re-joined), and a
``subscribe`` of it answered before then does not put it back for good:
the ``unsubscribe``'s own answer comes after, and takes it out — unless it
is a ``rate_limited`` refusal: that command was not run, the connection is
still in the room, and the room stays. Without an answer (the connection
dropped) the room is left: the next connection is not in it. An answer read
after the command's timeout counts all the same, when it comes (the node
ran the command): until then, or until the connection ends, a timed-out
``unsubscribe`` is still under way. A re-join asks only for rooms still in
the set, each time it asks.

A re-join asks for the room's messages after the position the connection
resumed from. If that connection ends before the re-join is answered, the
next one asks from the same position again: by then the connection's own
position has moved on with the other channels' messages, past the room's.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlencode

# A connection's query is kept within this many bytes: the node refuses a
# request line over 8190 bytes (400) and nginx one over 8 KB (414), and every
# reconnect would be refused too. Rooms past it are re-joined after the
# welcome instead, as the backend's rooms are.
MAX_QUERY = 6144


class Rooms:
    """The client's room set: ``asked`` (in the URL) and ``granted`` (re-joined after a welcome)."""

    def __init__(self, asked: Iterable[str] = ()) -> None:
        self._asked = dict.fromkeys(asked)  # ordered sets
        self._granted: dict[str, None] = {}
        self._rejoining: dict[str, str | None] = {}  # granted room -> the position its re-join asks from
        self._leaving: dict[str, int] = {}  # room -> unsubscribes of it sent, not answered

    def all(self) -> tuple[str, ...]:
        return tuple(room for room in (*self._asked, *self._granted) if room not in self._leaving)

    def in_url(self) -> tuple[str, ...]:
        """The ``room`` parameters of a new connection: those that fit in
        ``MAX_QUERY``; the others become rooms re-joined after the welcome."""
        kept: list[str] = []
        size = 0
        for room in [r for r in self._asked if r not in self._leaving]:
            size += len(urlencode({"room": room})) + 1
            if size <= MAX_QUERY:
                kept.append(room)
            else:
                del self._asked[room]
                self._granted[room] = None
        return tuple(kept)

    def to_rejoin(self, channels: Iterable[str], since: str | None) -> tuple[tuple[str, str | None], ...]:
        """The granted rooms a new connection (on ``channels``, resumed from
        ``since``) is not in yet, each with the position to ask from: ``since``,
        or where an earlier re-join of it that was not answered asked from."""
        have = set(channels)
        return tuple(
            (room, self._rejoining.setdefault(room, since))
            for room in self._granted
            if f"room:{room}" not in have and room not in self._leaving
        )

    def is_granted(self, room: str) -> bool:
        """Whether ``room`` is still one to re-join (not left, nor asked for, nor being left)."""
        return room in self._granted and room not in self._leaving

    def rejoined(self, room: str) -> None:
        """A re-join was answered: the room's messages come from now on."""
        self._rejoining.pop(room, None)

    def joined(self, room: str) -> None:
        """A ``subscribe`` of ``room`` was acknowledged: the connection is in
        it, and every URL asks for it from now on (an ``unsubscribe`` sent
        after it is answered after it)."""
        self._granted.pop(room, None)
        self._rejoining.pop(room, None)
        self._asked[room] = None

    def granted(self, room: str) -> None:
        """The backend joined the connection to ``room``."""
        if room not in self._asked:
            self._granted[room] = None

    def left(self, room: str) -> None:
        """An ``unsubscribed`` frame, or a re-join refused."""
        self._asked.pop(room, None)
        self._granted.pop(room, None)
        self._rejoining.pop(room, None)

    def unsubscribing(self, room: str) -> None:
        """``unsubscribe`` is sent: ``room`` is out of the set until its answer."""
        self._leaving[room] = self._leaving.get(room, 0) + 1

    def unsubscribed(self, room: str, left: bool) -> None:
        """The ``unsubscribe`` of ``room`` is over: ``left``, or refused
        without being run (the connection is still in it)."""
        under_way = self._leaving.pop(room, 0)
        if under_way > 1:
            self._leaving[room] = under_way - 1
        if left:
            self.left(room)

    def keep_only(self, rooms: Iterable[str]) -> None:
        """After ``refresh``: the rooms the new token still allows."""
        kept = set(rooms)
        self._asked = {r: None for r in self._asked if r in kept}
        self._granted = {r: None for r in self._granted if r in kept}
        self._rejoining = {r: s for r, s in self._rejoining.items() if r in kept}
