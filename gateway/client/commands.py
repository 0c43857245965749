"""The commands of docs/protocol.md §6 as coroutines: the fields each sends,
and the typed value each answer comes back as.

``HeraldClient`` provides the transport (``_command``: send with a ``ref``
once connected, await the answer or raise ``CommandError``) and the state the
commands change (the room set, the feed's per-channel positions).
"""

from __future__ import annotations

from typing import Any

from .calls import Answer, Effect
from .events import Message, is_id, message_of
from .feed import Feed
from .rooms import Rooms


class Commands:
    """``subscribe``, ``unsubscribe``, ``publish``, ``presence``, ``read``,
    ``history``, ``refresh`` and ``ping``."""

    _rooms: Rooms
    _feed: Feed
    _token: str | None

    async def _command(self, kind: str, fields: dict[str, Any], effect: Effect | None = None) -> Answer:
        raise NotImplementedError

    async def subscribe(self, room: str, since: str | None = None) -> None:
        """Join ``room`` (and rejoin it on every reconnect); with ``since``,
        the room's stored messages after that id come first."""
        fields: dict[str, Any] = {"room": room}
        if since is not None:
            fields["since"] = str(since)
        channel = f"room:{room}"
        # Not an id: the node refuses it (bad_request), and replays nothing.
        replay = self._feed.rewind(channel, fields["since"]) if "since" in fields and is_id(fields["since"]) else None

        def joined(answer: Answer | None) -> None:
            if replay is not None:  # the answer comes after the replay (or none will: it ended)
                self._feed.rewound(channel, replay)
            # Reconnects join it from now on (an unsubscribe sent since is answered after); also when
            # the ack comes after the timeout: the node holds the room.
            if answer is not None and answer.get("type") != "error":
                self._rooms.joined(room)

        await self._command("subscribe", fields, joined)

    async def unsubscribe(self, room: str) -> None:
        """Leave ``room``; reconnects no longer join it (even if this fails, or
        a ``subscribe`` of it sent before is answered after) — unless the node
        refused it ``rate_limited``: then it did not run, and the room is kept
        (also when that answer comes after the timeout: out of the set until then)."""
        self._rooms.unsubscribing(room)

        def over(answer: Answer | None) -> None:
            # Not run (protocol §11.2): the connection is still in it.
            refused = answer is not None and answer.get("type") == "error" and answer.get("code") == "rate_limited"
            self._rooms.unsubscribed(room, not refused)

        await self._command("unsubscribe", {"room": room}, over)

    async def publish(self, room: str, data: Any, event: str | None = None, ephemeral: bool = False) -> str | None:
        """Publish into ``room``; returns the stored id (None when ``ephemeral``).
        Not re-sent: if the connection drops first it fails with
        ``disconnected``, and may or may not have been published."""
        fields: dict[str, Any] = {"room": room, "data": data}
        if event is not None:
            fields["event"] = event
        if ephemeral:
            fields["ephemeral"] = True
        answer = await self._command("publish", fields)
        return _id_of(answer)

    async def presence(self, room: str) -> list[str]:
        """The users in ``room``, on any node, sorted."""
        answer = await self._command("presence", {"room": room})
        users = answer.get("users")
        return [str(u) for u in users] if isinstance(users, list) else []

    async def read(self, id: str) -> str:
        """Move the user's read position to ``id``; returns the position stored
        (larger if another connection had gone further)."""
        return _id_of(await self._command("read", {"id": str(id)})) or str(id)

    async def history(
        self, room: str | None = None, channel: str | None = None, limit: int = 50, before: str | None = None
    ) -> list[Message]:
        """A page of stored messages, oldest first: of ``room``, or of
        ``channel`` (``"user"``, ``"broadcast"``, ``"room:<id>"``): the newest
        ``limit`` older than ``before`` (an id; None: the newest)."""
        if (room is None) == (channel is None):
            raise ValueError("give room or channel")
        fields: dict[str, Any] = {"room": room} if room is not None else {"channel": channel}
        fields["limit"] = limit
        if before is not None:
            fields["before"] = str(before)
        answer = await self._command("history", fields)
        name = answer.get("channel")
        items = answer.get("messages")
        default = name if isinstance(name, str) else (channel or f"room:{room}")
        found = (message_of(m, default) for m in items if isinstance(m, dict)) if isinstance(items, list) else ()
        return [m for m in found if m is not None]

    async def refresh(self, token: str) -> None:
        """Replace the connection's token before it expires (and use it for
        reconnects); rooms it no longer allows are left — also when the ack
        comes after the timeout: the node took the token all the same."""

        def refreshed(answer: Answer | None) -> None:
            if answer is None or answer.get("type") == "error":
                return
            self._token = token
            channels = answer.get("channels")
            if isinstance(channels, list):
                rooms = (c.removeprefix("room:") for c in channels if isinstance(c, str) and c.startswith("room:"))
                self._rooms.keep_only(rooms)  # not "user" or "broadcast": a room may have those names too

        await self._command("refresh", {"token": token}, refreshed)

    async def ping(self) -> None:
        """A round trip to the node: returns once it answered (so once the
        client is connected, and the node is there)."""
        await self._command("ping", {})


def _id_of(answer: Answer) -> str | None:
    value = answer.get("id")
    return str(value) if isinstance(value, str | int) and not isinstance(value, bool) else None
