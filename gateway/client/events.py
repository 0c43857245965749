"""What a node sends a client, as small typed values, and the client's errors.

``event_of`` turns a frame that is not a command's answer into a ``Message``,
``Reset``, ``Join``, ``Leave``, ``Subscribed``, ``Unsubscribed`` or
``Welcome`` (docs/protocol.md §3.2), and
ignores what it does not know: a client MUST ignore new frame types and keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# A stream id as text: ASCII digits (str.isdigit also takes "²", which int() refuses).
_ID_TEXT = re.compile(r"[0-9]{1,20}")


def is_id(text: str) -> bool:
    """Whether ``text`` is a stream id (what ``int()`` reads, as the node writes it)."""
    return _ID_TEXT.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class Message:
    """A message on one of the connection's channels: ``user``, ``broadcast``
    or ``room:<id>``. ``id`` is its stream id (a decimal string), None for an
    ephemeral message; ``data`` the published JSON value; ``sender`` the
    protocol's ``from``: the user who published it from a client connection,
    as the node verified it (None for a backend's message)."""

    channel: str
    id: str | None
    event: str
    data: Any
    sender: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The fields as ``herald listen`` prints them (``from`` only when there is one)."""
        doc = {"channel": self.channel, "id": self.id, "event": self.event, "data": self.data}
        if self.sender is not None:
            doc["from"] = self.sender
        return doc


@dataclass(frozen=True, slots=True)
class Reset:
    """Messages of ``channel`` this client should have had are lost to it:
    refetch that channel's state, then carry on with what follows."""

    channel: str
    reason: str


@dataclass(frozen=True, slots=True)
class Join:
    """A user's first connection entered ``room`` (rooms of ``rooms.join_leave``)."""

    room: str
    user: str


@dataclass(frozen=True, slots=True)
class Leave:
    """A user's last connection left ``room``."""

    room: str
    user: str


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The backend joined this connection to ``room`` (``POST /api/subscribe``);
    the client re-joins it after reconnects while the token allows it."""

    room: str


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    """The backend took this connection out of ``room``; reconnects no longer join it."""

    room: str


@dataclass(frozen=True, slots=True)
class Welcome:
    """The first frame of every connection. ``position`` is the stream's
    position as read just before the channels went live (None from nodes
    that do not send it); ``unread`` is None when the node's inbox is off."""

    conn: str
    user: str
    node: str
    channels: tuple[str, ...]
    unread: int | None
    position: str | None


Event = Message | Reset | Join | Leave | Subscribed | Unsubscribed | Welcome


def event_of(frame: dict[str, Any]) -> Event | None:
    """The typed value of a frame, or None for frames that are not events
    (unknown types, malformed fields)."""
    kind = frame.get("type")
    if kind == "message":
        return message_of(frame)
    if kind == "reset":
        channel = frame.get("channel")
        # Without a channel it says nothing a client can refetch.
        return Reset(channel, _str(frame.get("reason"))) if isinstance(channel, str) and channel else None
    if kind in ("join", "leave"):
        cls = Join if kind == "join" else Leave
        return cls(_str(frame.get("room")), _str(frame.get("user")))
    if kind in ("subscribed", "unsubscribed"):
        room = frame.get("room")
        if not isinstance(room, str):
            return None
        return Subscribed(room) if kind == "subscribed" else Unsubscribed(room)
    if kind == "welcome":
        unread = frame.get("unread")
        channels = frame.get("channels")
        return Welcome(
            _str(frame.get("conn")),
            _str(frame.get("user")),
            _str(frame.get("node")),
            tuple(str(c) for c in channels) if isinstance(channels, list) else (),
            unread if type(unread) is int else None,
            _id(frame.get("position")),
        )
    return None


def message_of(frame: dict[str, Any], channel: str | None = None) -> Message | None:
    """A ``message`` frame (also the items of a ``history`` answer, whose
    channel is ``channel`` if they do not name it)."""
    name = frame.get("channel", channel)
    if not isinstance(name, str):
        return None
    raw = frame.get("id")
    ident = _id(raw)
    if raw is not None and ident is None:
        return None  # neither a stored message (no id to resume from) nor an ephemeral one
    sender = frame.get("from")
    return Message(
        name, ident, _str(frame.get("event"), "message"), frame.get("data"), sender if isinstance(sender, str) else None
    )


def _str(value: Any, default: str = "") -> str:
    return value if isinstance(value, str) else default


def _id(value: Any) -> str | None:
    """A stream id as the string the protocol uses (integers are accepted)."""
    if isinstance(value, str) and is_id(value):
        return value
    if type(value) is int and value >= 0:
        return str(value)
    return None


class HeraldError(Exception):
    """Base of the client's errors."""


class CommandError(HeraldError):
    """A command was refused (an ``error`` frame: ``code`` from docs/protocol.md
    §9), or got no answer: ``timeout``, ``disconnected`` (the connection it was
    sent on dropped first: it may or may not have run), ``closed``."""

    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after  # seconds, with rate_limited


class CommandTimeout(CommandError, TimeoutError):
    """No answer within the client's timeout (also while reconnecting)."""

    def __init__(self, message: str) -> None:
        super().__init__("timeout", message)


class Stopped(HeraldError):
    """The node refused the client for good: 4000 (bad request), 4001 (a token
    refused again, or no ``get_token``), 4003 (room not allowed), 4029 (this
    connection was replaced by a newer one of the user: close-oldest, or a
    ``replaces`` naming it), 4403 (the backend
    disconnected the user for good), 1002, 1007, 1009 (a frame it could not
    take: over its ``ws.max_frame`` for 1009), or the same refused before the
    upgrade (HTTP 400, 401, 403: ``code`` is the close code of the status).
    Reconnecting would not help, or is not wanted, so the client stops;
    iterating over it raises this."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"stopped by the node: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason
