"""Resume from a position: replay what the stream holds, then switch to live.

The transport calls ``hold`` before it joins the channels, so no live delivery
can slip past the replay; ``resume`` then replays the stored messages after the
position and releases the held live ones that the replay did not already
cover — each message once, in order.
"""

from __future__ import annotations

from collections.abc import Sequence

from .node import Node
from .session import Session

# Replay at most this many messages per resume; a longer gap gets a reset frame.
MAX_REPLAY = 10_000


def hold(session: Session) -> None:
    if session.held is None:
        session.held = []


async def attach(node: Node, session: Session, channels: Sequence[str], since: int | None) -> None:
    """Join a new session's channels — replaying from ``since`` first, if given —
    and mark it open."""
    if since is not None:
        hold(session)  # before joining, so no live delivery overtakes the replay
    for channel in channels:
        await node.hub.join(session, channel)
    if since is not None:
        await resume(node, session, channels, since)
    session.opened()


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
        held, session.held = session.held or [], None
        wanted = set(channels)
        for d in held:
            if d.seq == 0 or d.seq > last or d.channel not in wanted:
                session.outbound.push(session.codec.message(d), d.ts, node.hub.droppable(d.channel))
