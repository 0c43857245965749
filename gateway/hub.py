"""The local fan-out index: channel → sessions on this node.

``deliver`` and ``lost`` are the broker's events. A delivery is encoded once
per transport and the same bytes are queued to every local recipient; it
never awaits.
"""

from __future__ import annotations

from collections.abc import Callable

from broker import Channel, Delivery
from broker.channels import channel_id, client_name, glob_match, is_room

from .frames import Codec
from .outbound import Outbound
from .session import Session


class Hub:
    """Owns the index of which local sessions want each channel."""

    def __init__(
        self,
        drop_oldest_rooms: tuple[str, ...] = (),
        drop_oldest_all: bool = False,
        on_reset: Callable[[int], None] | None = None,
    ) -> None:
        self._index: dict[Channel, set[Session]] = {}
        self._drop_oldest_rooms = drop_oldest_rooms
        self._drop_oldest_all = drop_oldest_all
        self._droppable: dict[Channel, bool] = {}
        self._on_reset = on_reset

    def droppable(self, channel: Channel) -> bool:
        """Whether a full queue may drop this channel's messages (drop-oldest)."""
        cached = self._droppable.get(channel)
        if cached is None:
            cached = self._drop_oldest_all or (
                is_room(channel) and glob_match(self._drop_oldest_rooms, channel_id(channel))
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
        for session in sessions:
            if session.gated and not session.pass_live(d):
                continue  # held while a replay runs, or sent by one already
            queues = by_codec.get(session.codec)
            if queues is None:
                queues = by_codec[session.codec] = []
            queues.append(session.outbound)
        droppable = self.droppable(d.channel)
        for codec, queues in by_codec.items():
            queues[0].flusher.fan_out(queues, codec.message(d), d.ts, droppable)

    def lost(self, channel: Channel) -> None:
        """The broker could not recover messages of ``channel``: tell its sessions."""
        sessions = self._index.get(channel)
        if not sessions:
            return
        frame = {"type": "reset", "channel": client_name(channel), "reason": "messages were lost in transit"}
        for session in sessions:
            session.send_in_flow(frame)
        if self._on_reset is not None:
            self._on_reset(len(sessions))

    def add(self, session: Session, channel: Channel) -> None:
        self._index.setdefault(channel, set()).add(session)

    def remove(self, session: Session, channel: Channel) -> bool:
        """Take ``session`` out of ``channel``'s recipients; False if it was not in."""
        sessions = self._index.get(channel)
        if sessions is None or session not in sessions:
            return False
        sessions.discard(session)
        if not sessions:
            del self._index[channel]
        return True

    @property
    def channel_count(self) -> int:
        return len(self._index)
