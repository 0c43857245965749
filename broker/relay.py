"""Requests addressed to one node, over core NATS request/reply.

Each node listens on a subject of its own (its node id, encoded as one
token); a request with no node listening gets NATS's "no responders" at once,
which is how a node that is gone is told from one that is slow.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.msg import Msg

from .base import BrokerUnavailable, NodeGone
from .kv import key_token
from .link import NatsLink
from .tasks import spawn
from .throttle import Throttle

log = logging.getLogger("herald.relay")
warn = Throttle(log)


class NatsRelay:
    """``broker.roles.Relay``: asks other nodes; answers those addressed to
    this one with ``answer`` (``BrokerEvents.request``), each in its own task."""

    def __init__(self, link: NatsLink, stream: str, node_id: str, answer: Callable[[bytes], Awaitable[bytes]]) -> None:
        self._link = link
        self._prefix = f"_herald.{stream}.node."  # core NATS only: never stored
        self._node_id = node_id
        self._answer = answer
        self.tasks: set[asyncio.Task[None]] = set()  # requests being answered

    def _subject(self, node: str) -> str:
        return self._prefix + key_token(node)

    async def listen(self) -> None:
        """Take the requests addressed to this node (once connected)."""
        await self._link.client().subscribe(self._subject(self._node_id), cb=self._on_request)

    async def _on_request(self, msg: Msg) -> None:
        spawn(self.tasks, self._respond(msg))  # one slow answer must not hold up the others

    async def _respond(self, msg: Msg) -> None:
        try:
            answer = await self._answer(msg.data)
        except Exception:
            log.exception("answering a request from another node failed")
            return  # the asking node times out
        try:
            await msg.respond(answer)
        except nats.errors.Error as exc:
            warn("respond", "could not answer a request from another node: %r", exc)

    async def ask(self, node: str, body: bytes, timeout: float) -> bytes:
        nc = self._link.client()
        try:
            msg = await nc.request(self._subject(node), body, timeout=timeout)
        except nats.errors.NoRespondersError:
            raise NodeGone(f"node {node} is not running") from None
        except nats.errors.TimeoutError:
            raise BrokerUnavailable(f"node {node} did not answer within {timeout:g}s") from None
        except nats.errors.Error as exc:
            raise BrokerUnavailable(f"cannot reach node {node}: {exc!r}") from None
        return msg.data
