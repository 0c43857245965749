"""Opening a session on its channels, and resuming from a position.

Live deliveries are held aside while a session joins its channels (and, with a
position, while the stream replays what it missed); they are released after —
only those the replay did not already cover — so the client sees its first
frame first, then each message once, in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .node import Node
from .session import Session

# Replay at most this many messages per resume; a longer gap gets a reset frame.
MAX_REPLAY = 10_000


def hold(session: Session) -> None:
    if session.held is None:
        session.held = []


async def attach(
    node: Node, session: Session, channels: Sequence[str], since: int | None, first: dict[str, Any] | None = None
) -> None:
    """Join a new session's channels, then send ``first`` (the welcome frame),
    then what it missed since ``since`` if given, then the live flow. Sent after
    the joins, ``first`` tells the client its channels are live."""
    hold(session)
    try:
        for channel in channels:
            await node.hub.join(session, channel)
        if first is not None:
            session.send(first)
    except BaseException:
        session.held = None
        raise
    if since is not None:
        await resume(node, session, channels, since)
    else:
        release(node, session)
    session.opened()


def release(node: Node, session: Session, after: int = 0, replayed: Sequence[str] = ()) -> None:
    """Queue the held live deliveries, skipping those of the ``replayed``
    channels at or below ``after`` (the replay sent them already)."""
    held, session.held = session.held or [], None
    wanted = set(replayed)
    for d in held:
        if d.seq == 0 or d.seq > after or d.channel not in wanted:
            session.outbound.push(session.codec.message(d), d.ts, node.hub.droppable(d.channel))


async def resume(node: Node, session: Session, channels: Sequence[str], since: int) -> None:
    hold(session)
    last = since
    try:
        replayed = await node.broker.replay(channels, since, MAX_REPLAY + 1)
        codec = session.codec
        if len(replayed) > MAX_REPLAY:
            # Loss is never silent: the client must refetch its state.
            session.send({"type": "reset", "reason": f"more than {MAX_REPLAY} messages missed"})
            replayed = replayed[-MAX_REPLAY:]
        for d in replayed:
            session.outbound.push(codec.message(d), -1.0)
            last = d.seq
        if replayed:
            node.metrics.replayed.inc(len(replayed))
    finally:
        release(node, session, last, channels)
