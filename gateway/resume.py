"""Opening a session on its channels, resuming from a position, the inbox.

Live deliveries are held aside (by the session) while it joins its channels
and the stream replays what it missed; they are queued after — only those the
replay did not already cover — so the client sees its first frame first, then
each message once, in order. A replay is paced to the client: it queues a
slice, waits for the socket to take it, and so stays within the backpressure
limits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from broker import Channel, Delivery, History, ReadPositions, Replay
from broker.channels import client_name, user_channel

from .metrics import Metrics
from .session import Session
from .settings import HistorySettings
from .subscriptions import Subscriptions


class Resumer:
    """Owns what a session is sent before (or while joining) the live flow:
    the replay from a position, or the user's unread messages."""

    def __init__(
        self,
        subscriptions: Subscriptions,
        history: History,
        reads: ReadPositions,
        droppable: Callable[[Channel], bool],
        settings: HistorySettings,
        metrics: Metrics,
    ) -> None:
        self._subscriptions = subscriptions
        self._history = history
        self._reads = reads
        self._droppable = droppable
        self._settings = settings
        self._metrics = metrics

    async def attach(
        self,
        session: Session,
        channels: Sequence[Channel],
        since: int | None,
        first: dict[str, Any] | None = None,
        joined: Callable[[], None] | None = None,
    ) -> None:
        """Join a new session's channels, then call ``joined`` (SSE: the response
        head goes out only now), send ``first`` (the welcome frame, completed with
        ``unread`` and ``position``), then what it missed since ``since`` — or, without a position,
        its user's unread messages — then the live flow. Either tells the client
        its channels are live: what is published after it reaches the client."""
        async with session.replaying:  # a subscribe with since (over HTTP, SSE) waits for this one
            await self._attach(session, channels, since, first, joined)

    async def _attach(
        self,
        session: Session,
        channels: Sequence[Channel],
        since: int | None,
        first: dict[str, Any] | None,
        joined: Callable[[], None] | None,
    ) -> None:
        session.start_holding()
        try:
            await self._join(session, channels)
            # Read after the SUBs went out on the same connection: whatever is
            # stored after it comes live (or its loss is seen: live() starts
            # the gap checks of channels new here at it). A message stored
            # before may come live too: before the position, it is extra. A
            # burst of connects shares one read begun after each one's SUBs.
            position = await self._history.position()
            replay, unread = await self._opening_replay(session, channels, since)
            await self._subscriptions.live(position)  # known by now: the position's answer came after the SUBs
            if joined is not None:
                joined()
            if first is not None:
                if unread is not None:
                    first["unread"] = unread
                first["position"] = str(position)
                session.welcome(first)
        except BaseException:
            session.stop_holding()
            raise
        await self._send(session, replay, position if since is None else None)
        session.opened()

    async def resume(self, session: Session, channels: Sequence[Channel], since: int) -> None:
        """Join ``channels`` on an open session and replay them after ``since``,
        then go on live. Live deliveries are held from before the join: one that
        arrives while joining is then sent once, in order, not before the replay."""
        async with session.replaying:
            await self._resume(session, channels, since)

    async def _resume(self, session: Session, channels: Sequence[Channel], since: int) -> None:
        session.start_holding()
        try:
            await self._join(session, channels)
            replay = await self._history.replay(channels, since, self._settings.replay_max)
            await self._subscriptions.live()
        except BaseException:
            self._queue_held(session)
            raise
        await self._send(session, replay)

    async def _join(self, session: Session, channels: Sequence[Channel]) -> None:
        """Join ``channels``; live once ``Subscriptions.live`` returns (the
        requests made meanwhile mostly show it without a round trip of its own)."""
        for channel in channels:
            await self._subscriptions.join(session, channel, live=False)

    async def _opening_replay(
        self, session: Session, channels: Sequence[Channel], since: int | None
    ) -> tuple[Replay | None, int | None]:
        """What a new session is sent before the live flow, and its unread count."""
        settings = self._settings
        history = self._history
        if not settings.inbox:
            replay = None if since is None else await history.replay(channels, since, settings.replay_max)
            return replay, None
        user = user_channel(session.user)
        if since is None:
            # The user's channel first: when nothing was sent to the user, the
            # read position (a request of its own) need not be asked.
            last = await history.last(user)
            if not last:
                return None, 0
            read = await self._reads.position(session.user)
            replay = await history.replay((user,), read, settings.replay_max, (last,))
            if not replay.deliveries:
                # Nothing unread is held: whatever expired unread did so by the
                # inbox's own limits, and a reset on every connect of every idle
                # user would only be noise.
                return None, 0
            return replay, await self._unread(user, read, replay)
        read = await self._reads.position(session.user)
        replay = await history.replay(channels, since, settings.replay_max)
        return replay, await self._unread(user, read, replay if read >= since else None)

    async def _unread(self, user: Channel, read: int, replay: Replay | None) -> int:
        """The user's held messages after ``read``: counted in ``replay`` if it
        holds them all (replayed from ``read`` or before, none cut), else read."""
        if replay is not None and user not in replay.lost:
            return sum(1 for d in replay.deliveries if d.channel == user and d.seq > read)
        return len((await self._history.replay((user,), read, self._settings.user_max)).deliveries)

    async def _send(self, session: Session, replay: Replay | None, position: int | None = None) -> None:
        """Resets first, then the replayed messages, paced; then (a new
        connection's) ``position`` as where to resume from, unless a replayed
        message is past it; then the held live ones."""
        try:
            if replay is not None:
                await self._send_replay(session, replay)
            if position is not None and (
                replay is None or not replay.deliveries or replay.deliveries[-1].seq < position
            ):
                session.resume_point(position)
            await self._queue_held_paced(session)
        finally:
            self._queue_held(session)

    async def _send_replay(self, session: Session, replay: Replay) -> None:
        for channel in sorted(replay.lost):
            # Loss is never silent: the client must refetch this channel's state.
            session.send(
                {"type": "reset", "channel": client_name(channel), "reason": "messages missed are no longer held"}
            )
            self._metrics.resets_history.inc()
        deliveries = replay.deliveries
        if not deliveries:
            return
        pace = _pace(session)
        sent = 0
        for d in deliveries:
            frame = await _room_for(session, d, pace)
            if not session.active:
                break
            if d.channel not in session.channels:
                continue  # left while its replay ran (an unsubscribe over HTTP)
            session.queue_replayed(d, frame)
            sent += 1
        self._metrics.replayed.inc(sent)

    async def _queue_held_paced(self, session: Session) -> None:
        """Queue the held live deliveries at the socket's pace; what arrives
        meanwhile is held too, and goes next. Ends, with the session live, once
        nothing is held (the client reads faster than its channels get messages)."""
        pace = _pace(session)
        droppable = self._droppable
        while session.held and session.active:
            for d in session.take_held():
                if isinstance(d, bytes):  # a reset: no pace for a control frame
                    session.queue_held(d, False)
                    continue
                frame = await _room_for(session, d, pace)
                session.queue_held(d, droppable(d.channel), frame)

    def _queue_held(self, session: Session) -> None:
        """Stop holding and queue what is held now (unpaced: the session is
        ending, or ``_queue_held_paced`` left nothing)."""
        droppable = self._droppable
        for d in session.stop_holding():
            session.queue_held(d, not isinstance(d, bytes) and droppable(d.channel))


async def _room_for(session: Session, d: Delivery, pace: tuple[int, int]) -> bytes | None:
    """Wait until the queue has room for ``d`` at the replay's pace; its frame
    if it had to be made to tell. A frame larger than the queue's limit waits
    for the queue to empty: it goes out on its own (outbound.push)."""
    outbound = session.outbound
    max_bytes, max_messages = pace
    frame = None
    if len(d.payload) + outbound.bytes >= outbound.limits.max_bytes // 2:  # may not fit beside the queue
        frame = session.codec.message(d)
        if len(frame) + outbound.bytes > outbound.limits.max_bytes:
            await outbound.room(0, 0)
            return frame
    if outbound.bytes > max_bytes or len(outbound) > max_messages:
        await outbound.room(max_bytes, max_messages)
    return frame


def _pace(session: Session) -> tuple[int, int]:
    """How much a replay queues before it waits for the socket: a quarter of
    the queue, so live messages still fit meanwhile."""
    limits = session.outbound.limits
    return limits.max_bytes // 4, max(1, limits.max_messages // 4)
