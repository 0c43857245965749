"""Joining sessions to channels and leaving them."""

from __future__ import annotations

from broker import BrokerUnavailable, Channel, Presence, PubSub
from broker.channels import channel_id, is_room

from .hub import Hub
from .session import Session


class Subscriptions:
    """Owns what joining a channel means: the session's channel set, the hub's
    index, the broker's reference-counted interest, and room presence (per
    user: only a user's first connection in and last one out count)."""

    def __init__(self, hub: Hub, pubsub: PubSub, presence: Presence) -> None:
        self._hub = hub
        self._pubsub = pubsub
        self._presence = presence
        # Room channel → user → this node's connections of that user in it.
        self._members: dict[Channel, dict[str, int]] = {}

    async def join(self, session: Session, channel: Channel, live: bool = True) -> None:
        """Deliver ``channel`` to ``session``; returns once the broker has the
        interest (what is published after reaches the session), or with
        ``live`` False once it is asked for (``live()`` waits for it)."""
        if channel in session.channels:
            return
        session.channels.add(channel)
        self._hub.add(session, channel)
        if is_room(channel):
            self._count_member(channel, session.user, +1)
        try:
            await self._pubsub.want(channel)
        except BaseException:
            self._drop(session, channel)
            raise
        if live:
            try:
                await self._pubsub.live()
            except BrokerUnavailable:
                # Answered as not joined (unavailable): not held either, or its
                # messages would come once NATS is back, to a client that left it.
                await self.leave(session, channel)
                raise

    async def live(self, position: int | None = None) -> None:
        """Returns once every channel joined so far is live on the broker
        (``position``: the stream's last sequence, read after the joins)."""
        await self._pubsub.live(position)

    async def leave(self, session: Session, channel: Channel) -> None:
        if channel not in session.channels:
            return
        self._drop(session, channel)
        await self._pubsub.unwant(channel)

    async def leave_all(self, session: Session) -> None:
        for channel in list(session.channels):
            await self.leave(session, channel)

    def _drop(self, session: Session, channel: Channel) -> None:
        session.channels.discard(channel)
        if self._hub.remove(session, channel) and is_room(channel):
            self._count_member(channel, session.user, -1)

    def _count_member(self, channel: Channel, user: str, delta: int) -> None:
        counts = self._members.setdefault(channel, {})
        n = counts.get(user, 0) + delta
        if n > 0:
            counts[user] = n
            if n == 1 and delta > 0:
                self._presence.mark(channel, user, True)
            return
        counts.pop(user, None)
        if not counts:
            del self._members[channel]
        self._presence.mark(channel, user, False)

    def local_rooms(self) -> dict[str, int]:
        """Room id → users with a connection in it on this node."""
        return {channel_id(channel): len(users) for channel, users in self._members.items()}
