"""Channel names, ids and NATS subjects: the one place that decides what is allowed.

Client-side channels are ``user`` (the connection's own user), ``room:<id>`` and
``broadcast``. Internally the user channel is ``user:<id>`` so that one name maps
to exactly one subject. Ids are restricted to characters that can never be a
NATS token separator or wildcard, which is what keeps a hostile id from widening
a subscription or reaching a foreign subject.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NewType

ID_RE = re.compile(r"[A-Za-z0-9_:@=+-]{1,128}")
EVENT_RE = re.compile(r"[A-Za-z0-9_.:@+-]{1,64}")
PREFIX_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
SEQ_RE = re.compile(r"[0-9]{1,20}")

BROADCAST_NAME = "broadcast"
ROOM = "room"
USER = "user"
DEFAULT_EVENT = "message"


class InvalidChannel(ValueError):
    """A channel, id or event name that the contract refuses."""


def shown(value: object, limit: int = 40) -> str:
    """``value`` as a refusal names it: ASCII-quoted (no newline or escape
    reaches a log line or a close reason), cut past ``limit`` characters so
    that a refusal still fits a 123-byte close reason."""
    if isinstance(value, str):
        text = ascii(value[: limit + 1])
        return text if len(text) <= limit + 2 else text[: limit + 1] + "..." + text[0]
    if value is None or isinstance(value, (bool, int, float)):
        text = repr(value) if not isinstance(value, int) or abs(value) < 10**limit else "(a large integer)"
        return text[:limit]
    return f"(a {type(value).__name__})"  # a JSON array or object: not an id, whatever it holds


def check_id(kind: str, value: object) -> str:
    """Return ``value`` if it is a valid user or room id, else raise InvalidChannel."""
    if not isinstance(value, str) or ID_RE.fullmatch(value) is None:
        raise InvalidChannel(f"invalid {kind} id {shown(value)}: must match [A-Za-z0-9_:@=+-]{{1,128}}")
    return value


def check_event(value: object) -> str:
    if not isinstance(value, str) or EVENT_RE.fullmatch(value) is None:
        raise InvalidChannel(f"invalid event name {shown(value)}: must match [A-Za-z0-9_.:@+-]{{1,64}}")
    return value


def parse_seq(value: object) -> int:
    """A stream position (``since``, ``Last-Event-ID``, ``read``): a string of
    ASCII digits, or (from JSON) a non-negative integer below 2**63."""
    if type(value) is int and 0 <= value < 2**63:
        return value
    if isinstance(value, str) and SEQ_RE.fullmatch(value) is not None and int(value) < 2**63:
        return int(value)
    digits = isinstance(value, str) and value.isascii() and value.isdigit()
    if digits or (type(value) is int and value >= 2**63):  # a stream id, but past any the stream can hold
        raise InvalidChannel("a position is too large: stream ids are below 2^63 (9223372036854775808)")
    raise InvalidChannel("a position must be a stream id (a string of digits)")


# A validated channel name: ``user:<id>``, ``room:<id>`` or ``broadcast``.
# Made only by room_channel / user_channel / parse_channel (which validate
# once, at the edge) and taken apart only by the functions below: nothing
# outside this module slices a channel name. A NewType, so the type checker
# refuses an unchecked string where a Channel is wanted, while at run time it
# is a plain str: compact, and keys of the delivery path's dicts keep str's
# fast layout (a str subclass cost ~100 B per connection).
Channel = NewType("Channel", str)


def room_channel(room_id: object) -> Channel:
    return _channel(ROOM, check_id(ROOM, room_id))


def user_channel(user_id: object) -> Channel:
    return _channel(USER, check_id(USER, user_id))


def parse_channel(name: object) -> Channel:
    """A fully named channel (``room:<id>``, ``user:<id>``, ``broadcast``)."""
    if name == BROADCAST_NAME:
        return BROADCAST
    if isinstance(name, str):
        kind, sep, ident = name.partition(":")
        if sep and kind in (ROOM, USER):
            return _channel(kind, check_id(kind, ident))
    raise InvalidChannel(f"invalid channel {shown(name)}: expected room:<id>, user:<id> or broadcast")


def _channel(kind: str, ident: str) -> Channel:
    return Channel(f"{kind}:{ident}")


def channel_id(channel: Channel) -> str:
    """The user or room id ("" for broadcast)."""
    return channel.partition(":")[2]


def is_room(channel: Channel) -> bool:
    return channel.startswith("room:")


def is_user(channel: Channel) -> bool:
    return channel.startswith("user:")


def client_name(channel: Channel) -> str:
    """The name a client sees: its own user channel is just ``user``."""
    return USER if is_user(channel) else channel


def _subject_suffix(channel: Channel) -> str:
    """The subject tokens after the prefix: ``room.<id>``, ``user.<id>``, ``broadcast``."""
    kind, _, ident = channel.partition(":")
    return f"{kind}.{ident}" if ident else kind


BROADCAST = Channel(BROADCAST_NAME)


@dataclass(frozen=True, slots=True)
class Subjects:
    """Maps channels to the input subjects publishers use and the live subjects
    the stream republishes to (which nodes subscribe to)."""

    prefix: str = "herald"
    live_prefix: str = "herald_live"

    def __post_init__(self) -> None:
        for key, value in (("prefix", self.prefix), ("live_prefix", self.live_prefix)):
            if PREFIX_RE.fullmatch(value) is None:
                raise InvalidChannel(f"invalid subject {key} {value!r}")
        a, b = self.prefix + ".", self.live_prefix + "."
        if a.startswith(b) or b.startswith(a):
            # Either way round, the republished copies would land in the stream again.
            raise InvalidChannel("prefix and live_prefix must not contain one another")

    def input_subject(self, channel: Channel) -> str:
        return f"{self.prefix}.{_subject_suffix(channel)}"

    def live_subject(self, channel: Channel) -> str:
        return f"{self.live_prefix}.{_subject_suffix(channel)}"

    def live_family(self, kind: str) -> str:
        """The live subject of every channel of one kind (``user``, ``room``)."""
        return f"{self.live_prefix}.{kind}.*"

    def stream_subjects(self) -> list[str]:
        return [f"{self.prefix}.user.>", f"{self.prefix}.room.>", f"{self.prefix}.{BROADCAST_NAME}"]

    def channel_of(self, subject: str) -> Channel | None:
        """Channel of an input or live subject, or None if it is not one of ours."""
        for prefix in (self.live_prefix, self.prefix):
            if subject.startswith(prefix) and subject[len(prefix) : len(prefix) + 1] == ".":
                rest = subject[len(prefix) + 1 :]
                if rest == BROADCAST_NAME:
                    return BROADCAST
                kind, _, ident = rest.partition(".")
                if kind in (ROOM, USER) and ID_RE.fullmatch(ident):
                    return _channel(kind, ident)
                return None
        return None


@functools.lru_cache(maxsize=4096)
def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern))


def glob_match(patterns: Iterable[str], value: str) -> bool:
    """``*`` matches any run of characters, ``?`` one; the whole value must match."""
    return any(_glob(p).fullmatch(value) for p in patterns)


# The header a message's event name travels in (absent: the default event).
EVENT_HEADER = "Herald-Event"


def event_of(headers: dict[str, str]) -> str:
    """A stored or live message's event name; a malformed one (it would break SSE framing) is replaced."""
    event = headers.get(EVENT_HEADER, DEFAULT_EVENT)
    if event is not DEFAULT_EVENT and EVENT_RE.fullmatch(event) is None:
        return DEFAULT_EVENT
    return event


# The header a client's message names its publisher in (the node sets it from
# the connection's identity; absent: a backend's message, from no one).
FROM_HEADER = "Herald-From"


def sender_of(headers: dict[str, str]) -> str | None:
    """The user who published a stored or live message (None: no one, or a
    value no user id could be: only a raw NATS publisher can write one)."""
    sender = headers.get(FROM_HEADER)
    if sender is None or ID_RE.fullmatch(sender) is None:
        return None
    return sender
