"""The local fan-out index: channel → sessions on this node.

``deliver`` is the broker's callback. It encodes a delivery once per transport
and queues the same bytes to every local recipient; it never awaits.
"""

from __future__ import annotations

from collections.abc import Callable

from broker import Broker, Delivery
from broker.channels import client_name, glob_match

from .frames import Codec
from .outbound import Outbound
from .session import Session


class Hub:
    def __init__(self, drop_oldest_rooms: tuple[str, ...] = (), drop_oldest_all: bool = False) -> None:
        self.broker: Broker | None = None
        self._index: dict[str, set[Session]] = {}
        self._drop_oldest_rooms = drop_oldest_rooms
        self._drop_oldest_all = drop_oldest_all
        self._droppable: dict[str, bool] = {}
        self.on_reset: Callable[[int], None] | None = None
        # Room channel → user → this node's connections of that user in it.
        self._members: dict[str, dict[str, int]] = {}

    def droppable(self, channel: str) -> bool:
        """Whether a full queue may drop this channel's messages (drop-oldest)."""
        cached = self._droppable.get(channel)
        if cached is None:
            cached = self._drop_oldest_all or (
                channel.startswith("room:") and glob_match(self._drop_oldest_rooms, channel[5:])
            )
            if len(self._droppable) > 100_000:
                self._droppable.clear()
            self._droppable[channel] = cached
        return cached

    def deliver(self, d: Delivery) -> None:
        sessions = self._index.get(d.channel)
        if not sessions:
            return
        # Recipients by transport: one encoding each, queued in one call.
        by_codec: dict[Codec, list[Outbound]] = {}
        seq = d.seq
        for session in sessions:
            if session.held is not None:
                session.hold(d)
                continue
            floors = session.floors
            if floors is not None and seq and seq <= floors.get(d.channel, 0):
                continue  # a gap repair re-sent what this session's replay gave it
            queues = by_codec.get(session.codec)
            if queues is None:
                queues = by_codec[session.codec] = []
            queues.append(session.outbound)
        droppable = self.droppable(d.channel)
        for codec, queues in by_codec.items():
            queues[0].flusher.fan_out(queues, codec.message(d), d.ts, droppable)

    def lost(self, channel: str) -> None:
        """The broker could not recover messages of ``channel``: tell its sessions."""
        sessions = self._index.get(channel)
        if not sessions:
            return
        frame = {"type": "reset", "channel": client_name(channel), "reason": "messages were lost in transit"}
        for session in sessions:
            session.send(frame)
        if self.on_reset is not None:
            self.on_reset(len(sessions))

    async def join(self, session: Session, channel: str) -> None:
        if channel in session.channels:
            return
        assert self.broker is not None
        session.channels.add(channel)
        self._index.setdefault(channel, set()).add(session)
        if channel.startswith("room:"):
            self._count_member(channel, session.user, +1)
        try:
            await self.broker.want(channel)
        except BaseException:
            self._drop(session, channel)
            raise

    async def leave(self, session: Session, channel: str) -> None:
        if channel not in session.channels:
            return
        self._drop(session, channel)
        assert self.broker is not None
        await self.broker.unwant(channel)

    async def leave_all(self, session: Session) -> None:
        for channel in list(session.channels):
            await self.leave(session, channel)

    def _drop(self, session: Session, channel: str) -> None:
        session.channels.discard(channel)
        sessions = self._index.get(channel)
        if sessions is not None and session in sessions:
            sessions.discard(session)
            if not sessions:
                del self._index[channel]
            if channel.startswith("room:"):
                self._count_member(channel, session.user, -1)

    def _count_member(self, channel: str, user: str, delta: int) -> None:
        """Presence is per user: only the first connection in and the last out count."""
        assert self.broker is not None
        counts = self._members.setdefault(channel, {})
        n = counts.get(user, 0) + delta
        if n > 0:
            counts[user] = n
            if n == 1 and delta > 0:
                self.broker.mark_present(channel, user, True)
            return
        counts.pop(user, None)
        if not counts:
            del self._members[channel]
        self.broker.mark_present(channel, user, False)

    def local_rooms(self) -> dict[str, int]:
        """Room id → users with a connection in it on this node."""
        return {channel[5:]: len(users) for channel, users in self._members.items()}

    @property
    def channel_count(self) -> int:
        return len(self._index)
