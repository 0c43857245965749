"""Resume from a position: replay what the stream holds, then switch to live.

While replaying, live deliveries for the session are held aside; afterwards
only those newer than the last replayed sequence are released, so the client
sees each message once, in order.
"""

from __future__ import annotations

from collections.abc import Sequence

from .node import Node
from .session import Session

MAX_REPLAY = 10_000


async def resume(node: Node, session: Session, channels: Sequence[str], since: int) -> None:
    session.held = []
    last = since
    try:
        replayed = await node.broker.replay(channels, since, MAX_REPLAY)
        codec = session.codec
        for d in replayed:
            session.outbound.push(codec.message(d))
            last = d.seq
        if replayed:
            node.metrics.replayed.inc(len(replayed))
            if d.seq > session.last_seq:
                session.last_seq = d.seq
    finally:
        held, session.held = session.held, None
        for d in held:
            if d.seq == 0 or d.seq > last:
                session.outbound.push(session.codec.message(d), d.ts)
