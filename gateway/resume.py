"""Opening a session on its channels, resuming from a position, the inbox.

Live deliveries are held aside while a session joins its channels and the
stream replays what it missed; they are released after — only those the replay
did not already cover — so the client sees its first frame first, then each
message once, in order. A replay is paced to the client: it queues a slice,
waits for the socket to take it, and so stays within the backpressure limits.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from broker import Delivery, Replay
from broker.channels import client_name, user_channel

from .node import Node
from .session import Session


def hold(session: Session) -> None:
    if session.held is None:
        session.held = []


async def attach(
    node: Node,
    session: Session,
    channels: Sequence[str],
    since: int | None,
    first: dict[str, Any] | None = None,
    joined: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Join a new session's channels, then call ``joined`` (SSE: the response
    starts only now), send ``first`` (the welcome frame, completed with
    ``unread``), then what it missed since ``since`` — or, without a position,
    its user's unread messages — then the live flow. Either tells the client
    its channels are live: what is published after it reaches the client."""
    hold(session)
    try:
        await _join(node, session, channels)
        replay, unread = await _opening_replay(node, session, channels, since)
        if joined is not None:
            await joined()
        if first is not None:
            if unread is not None:
                first["unread"] = unread
            session.send(first)
    except BaseException:
        session.held = None
        raise
    await _send(node, session, replay)
    session.opened()


async def _join(node: Node, session: Session, channels: Sequence[str]) -> None:
    for channel in channels:
        await node.hub.join(session, channel)


async def _opening_replay(
    node: Node, session: Session, channels: Sequence[str], since: int | None
) -> tuple[Replay | None, int | None]:
    """What a new session is sent before the live flow, and its unread count."""
    history = node.settings.history
    broker = node.broker
    if not history.inbox:
        replay = None if since is None else await broker.replay(channels, since, history.replay_max)
        return replay, None
    user = user_channel(session.user)
    read = await broker.read_position(session.user)
    if since is None:
        replay = await broker.replay((user,), read, history.replay_max)
        if not replay.deliveries:
            # Nothing unread is held: whatever expired unread did so by the
            # inbox's own limits, and a reset on every connect of every idle
            # user would only be noise.
            return None, 0
        return replay, len(replay.deliveries)
    replay = await broker.replay(channels, since, history.replay_max)
    if read >= since:
        unread = sum(1 for d in replay.deliveries if d.channel == user and d.seq > read)
    else:
        unread = len((await broker.replay((user,), read, history.user_max)).deliveries)
    return replay, unread


async def resume(node: Node, session: Session, channels: Sequence[str], since: int) -> None:
    """Join ``channels`` on an open session and replay them after ``since``,
    then go on live. Live deliveries are held from before the join: one that
    arrives while joining is then sent once, in order, not before the replay."""
    hold(session)
    try:
        await _join(node, session, channels)
        replay = await node.broker.replay(channels, since, node.settings.history.replay_max)
    except BaseException:
        release(node, session)
        raise
    await _send(node, session, replay)


async def _send(node: Node, session: Session, replay: Replay | None) -> None:
    """Resets first, then the replayed messages, paced; then the held live ones."""
    try:
        if replay is not None:
            await _send_replay(node, session, replay)
        await _release_paced(node, session)
    finally:
        release(node, session)


async def _send_replay(node: Node, session: Session, replay: Replay) -> None:
    for channel in sorted(replay.lost):
        # Loss is never silent: the client must refetch this channel's state.
        session.send({"type": "reset", "channel": client_name(channel), "reason": "messages missed are no longer held"})
        node.metrics.resets_history.inc()
    deliveries = replay.deliveries
    if not deliveries:
        return
    floors = session.floors if session.floors is not None else {}
    session.floors = floors
    max_bytes, max_messages = _pace(session)
    codec, outbound = session.codec, session.outbound
    sent = 0
    for d in deliveries:
        if outbound.bytes > max_bytes or len(outbound) > max_messages:
            await outbound.room(max_bytes, max_messages)
        if not session.active:
            break
        outbound.push(codec.message(d), -1.0)
        floors[d.channel] = d.seq
        sent += 1
    node.metrics.replayed.inc(sent)


def _pace(session: Session) -> tuple[int, int]:
    """How much a replay queues before it waits for the socket: a quarter of
    the queue, so live messages still fit meanwhile."""
    limits = session.outbound.limits
    return limits.max_bytes // 4, max(1, limits.max_messages // 4)


async def _release_paced(node: Node, session: Session) -> None:
    """Queue the held live deliveries at the socket's pace; what arrives
    meanwhile is held too, and goes next. Ends, with the session live, once
    nothing is held (the client reads faster than its channels get messages)."""
    max_bytes, max_messages = _pace(session)
    outbound = session.outbound
    while session.held and session.active:
        held, session.held = session.held, []
        for d in held:
            if outbound.bytes > max_bytes or len(outbound) > max_messages:
                await outbound.room(max_bytes, max_messages)
            _queue_live(node, session, d)


def release(node: Node, session: Session) -> None:
    """Queue the held live deliveries now (unpaced: the session is ending, or
    ``_release_paced`` left nothing)."""
    held, session.held = session.held or [], None
    for d in held:
        _queue_live(node, session, d)


def _queue_live(node: Node, session: Session, d: Delivery) -> None:
    """Queue a held live delivery, unless a replay sent it already."""
    if d.seq and session.floors and d.seq <= session.floors.get(d.channel, 0):
        return
    session.outbound.push(session.codec.message(d), d.ts, node.hub.droppable(d.channel))
