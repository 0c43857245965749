"""The values that cross the seam between the gateway and a broker (the
roles themselves are in ``broker.roles``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

from .channels import Channel, channel_id, glob_match, is_room, is_user


class Kind(enum.Enum):
    """What a delivery is: a published message, or a room's join / leave
    announcement (payload: the user id; never stored, no sequence)."""

    MESSAGE = "message"
    JOIN = "join"
    LEAVE = "leave"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One decoded message for a channel.

    ``seq`` is the global stream sequence (0 for ephemeral messages, which have
    none), ``prev_seq`` the previous sequence on the same channel (0 if unknown),
    ``ts`` the time the stream stored it (unix seconds), ``sender`` the user
    who published it from a client connection (None: a backend's message).
    """

    channel: Channel
    seq: int
    prev_seq: int
    ts: float
    event: str
    payload: bytes
    kind: Kind = Kind.MESSAGE
    sender: str | None = None


class Publishable(NamedTuple):  # a tuple: one is made per message of a publish
    """A message for the stream; ``msg_id``: an idempotency key (a repeat
    within the stream's duplicate window is not stored again); ``sender``: the
    publishing user, for a client's message."""

    channel: Channel
    payload: bytes
    event: str | None = None
    msg_id: str | None = None
    sender: str | None = None


class Published(NamedTuple):
    """Where the stream holds a published message; ``duplicate``: it was a
    repeat of one published with the same key, whose id this is."""

    seq: int
    duplicate: bool = False


class NodeGone(Exception):
    """No node by that id is there to answer (stopped, or never was)."""


class TooManyConnections(Exception):
    """The user has as many connections as allowed (policy refuse-new)."""


class Kick(enum.Enum):
    """Why the cluster closes a connection to admit a newer one of its user."""

    OLDEST = "oldest"  # the user's oldest, to make room (policy close-oldest)
    REPLACES = "replaces"  # the one the new stream's client named (``replaces=``): it gave it up


@dataclass(frozen=True, slots=True)
class Retention:
    """How much of one channel family a replay may hand out."""

    max_msgs: int
    max_age: float


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Retention per channel family; ``broadcast`` counts as a room."""

    user: Retention = Retention(50, 7 * 86400.0)
    room: Retention = Retention(1000, 86400.0)
    # (room id glob, retention) in order: the first that matches a room wins.
    rooms: tuple[tuple[str, Retention], ...] = ()

    def of(self, channel: Channel) -> Retention:
        if is_user(channel):
            return self.user
        if self.rooms and is_room(channel):
            room = channel_id(channel)
            for pattern, retention in self.rooms:
                if glob_match((pattern,), room):
                    return retention
        return self.room

    def _all(self) -> list[Retention]:
        return [self.user, self.room, *(r for _, r in self.rooms)]

    @property
    def max_msgs(self) -> int:
        return max(r.max_msgs for r in self._all())

    @property
    def max_age(self) -> float:
        return max(r.max_age for r in self._all())


@dataclass(frozen=True, slots=True)
class Replay:
    """What a replay found: the deliveries, oldest first, and the channels for
    which messages after the position are no longer held (retention, or more
    than the replay limit) — their subscribers must be told."""

    deliveries: list[Delivery]
    lost: frozenset[Channel] = frozenset()


class BrokerUnavailable(Exception):
    """The broker cannot take the request now (disconnected, no ack in time)."""


class MessageTooLarge(BrokerUnavailable):
    """A message over what the broker carries (NATS max_payload, headers
    included), refused before it is sent: no retry changes that (a 413, not a
    503). A BrokerUnavailable still for callers that only tell stored from not."""


@dataclass(slots=True)
class BrokerStats:
    """Plain counters; the gateway exports them as metrics."""

    connected: bool = False
    subscriptions: int = 0
    messages_received: int = 0
    reconnects: int = 0
    slow_consumer_errors: int = 0
    malformed_messages: int = 0
    gap_repairs: int = 0
    gap_repaired_messages: int = 0
    gaps_lost: int = 0
    duplicates_dropped: int = 0
    read_positions_reset: int = 0
