"""The rooms a client is in, and how a reconnect gets them back.

Two kinds (docs/protocol.md §3.2, ``subscribed``):

- rooms the client asked for (``rooms=``, an acknowledged ``subscribe``):
  they go in the URL of every new connection, so the node joins them before
  the ``welcome``;
- rooms the backend joined it to (a ``subscribed`` frame, from
  ``POST /api/subscribe``): the token may not allow them, so they are asked
  for again after each ``welcome`` with ``subscribe {room, since}`` — a room
  the token no longer allows then costs that room, not the connection.

An ``unsubscribed`` frame, or ``unsubscribe``, takes a room out of both;
``unsubscribe`` also when a ``subscribe`` of it is still under way: the node
runs the two in the order sent, so the room is left, and that subscribe's
ack must not put it back. A re-join asks only for rooms still in the set,
each time it asks.

A re-join asks for the room's messages after the position the connection
resumed from. If that connection ends before the re-join is answered, the
next one asks from the same position again: by then the connection's own
position has moved on with the other channels' messages, past the room's.
"""

from __future__ import annotations

from collections.abc import Iterable


class Rooms:
    """The client's room set: ``asked`` (in the URL) and ``granted`` (re-joined after a welcome)."""

    def __init__(self, asked: Iterable[str] = ()) -> None:
        self._asked = dict.fromkeys(asked)  # ordered sets
        self._granted: dict[str, None] = {}
        self._rejoining: dict[str, str | None] = {}  # granted room -> the position its re-join asks from
        self._joining: dict[str, int] = {}  # room -> subscribes under way, not left since

    def all(self) -> tuple[str, ...]:
        return (*self._asked, *self._granted)

    def in_url(self) -> tuple[str, ...]:
        """The ``room`` parameters of a new connection."""
        return tuple(self._asked)

    def to_rejoin(self, channels: Iterable[str], since: str | None) -> tuple[tuple[str, str | None], ...]:
        """The granted rooms a new connection (on ``channels``, resumed from
        ``since``) is not in yet, each with the position to ask from: ``since``,
        or where an earlier re-join of it that was not answered asked from."""
        have = set(channels)
        return tuple(
            (room, self._rejoining.setdefault(room, since)) for room in self._granted if f"room:{room}" not in have
        )

    def is_granted(self, room: str) -> bool:
        """Whether ``room`` is still one to re-join (not left, nor asked for since)."""
        return room in self._granted

    def rejoined(self, room: str) -> None:
        """A re-join was answered: the room's messages come from now on."""
        self._rejoining.pop(room, None)

    def joining(self, room: str) -> None:
        """``subscribe`` was sent: its answer goes to ``joined``."""
        self._joining[room] = self._joining.get(room, 0) + 1

    def joined(self, room: str, acked: bool) -> None:
        """The answer to a ``subscribe`` (``acked``: an ack): the room is in
        every URL from now on, unless it was left after the subscribe was sent."""
        under_way = self._joining.pop(room, 0)
        if under_way > 1:
            self._joining[room] = under_way - 1
        if acked and under_way:
            self._granted.pop(room, None)
            self._rejoining.pop(room, None)
            self._asked[room] = None

    def granted(self, room: str) -> None:
        """The backend joined the connection to ``room``."""
        if room not in self._asked:
            self._granted[room] = None

    def left(self, room: str) -> None:
        """An ``unsubscribed`` frame, or a re-join refused (also ``unsubscribing``)."""
        self._asked.pop(room, None)
        self._granted.pop(room, None)
        self._rejoining.pop(room, None)

    def unsubscribing(self, room: str) -> None:
        """``unsubscribe`` is sent: the node runs it after the subscribes of
        ``room`` sent before, so their acks no longer add it."""
        self.left(room)
        self._joining.pop(room, None)

    def keep_only(self, rooms: Iterable[str]) -> None:
        """After ``refresh``: the rooms the new token still allows."""
        kept = set(rooms)
        self._asked = {r: None for r in self._asked if r in kept}
        self._granted = {r: None for r in self._granted if r in kept}
        self._rejoining = {r: s for r, s in self._rejoining.items() if r in kept}
