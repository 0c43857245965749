"""Requests addressed to one node, or to every node, over core NATS.

Each node listens on a subject of its own (its node id, encoded as one
token); a request with no node listening gets NATS's "no responders" at once,
which is how a node that is gone is told from one that is slow. Every node
also listens on one subject for requests to all of them: the asker counts
the answers against the nodes presence knows to be alive.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.msg import Msg

from .base import BrokerUnavailable, NodeGone
from .inbox import no_responders
from .kv import key_token
from .link import NatsLink
from .lookup import ask
from .tasks import spawn
from .throttle import Throttle

log = logging.getLogger("herald.relay")
# nats-server's default max_payload (until connected), and what an answer
# leaves for the reply's framing (an answer carries no headers).
DEFAULT_MAX_PAYLOAD = 1 << 20
ANSWER_HEADROOM = 256
warn = Throttle(log)


class NatsRelay:
    """``broker.roles.Relay``: asks other nodes; answers those addressed to
    this one with ``answer`` (``BrokerEvents.request``), each in its own task."""

    def __init__(
        self,
        link: NatsLink,
        stream: str,
        node_id: str,
        answer: Callable[[bytes], Awaitable[bytes]],
        alive: Callable[[], Awaitable[set[str]]],
    ) -> None:
        self._link = link
        self._prefix = f"_herald.{stream}.node."  # core NATS only: never stored
        self._all = f"_herald.{stream}.nodes"
        self._node_id = node_id
        self._answer = answer
        self._alive = alive  # the live node instances (presence)
        self._inbox = link.replies
        self.tasks: set[asyncio.Task[None]] = set()  # requests being answered

    @property
    def max_answer(self) -> int:
        """NATS's max_payload, less room for the reply's framing."""
        try:
            return self._link.client().max_payload - ANSWER_HEADROOM
        except BrokerUnavailable:
            return DEFAULT_MAX_PAYLOAD - ANSWER_HEADROOM

    def _subject(self, node: str) -> str:
        return self._prefix + key_token(node)

    async def listen(self) -> None:
        """Take the requests addressed to this node (once connected)."""
        nc = self._link.client()
        await nc.subscribe(self._subject(self._node_id), cb=self._on_request)
        await nc.subscribe(self._all, cb=self._on_request)

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
        """The node's answer. NodeGone at once when no node listens on its
        subject (NATS's "no responders"); BrokerUnavailable when it does not
        answer within ``timeout``."""
        data, headers = await ask(self._inbox, self._subject(node), body, timeout, asked=f"node {node}")
        if no_responders(headers):
            raise NodeGone(f"node {node} is not running")
        return data

    async def ask_all(self, body: bytes, timeout: float) -> tuple[list[bytes], bool]:
        """Every live node's answer (this one's too), and whether all of them
        answered within ``timeout`` (False: the answers that came in time)."""
        try:
            expected = len(await self._alive())
        except (TimeoutError, nats.errors.Error) as exc:
            raise BrokerUnavailable(f"cannot tell which nodes are alive: {exc!r}") from None
        answers: list[bytes] = []
        everyone = asyncio.get_running_loop().create_future()

        def take(data: bytes, headers: dict[str, str] | None) -> None:
            if headers and "Status" in headers:  # no responders: no node listens
                return
            answers.append(data)
            if len(answers) >= expected and not everyone.done():
                everyone.set_result(None)

        reply = ""
        try:
            nc, reply = await self._inbox.open(take, everyone)
            await nc.publish(self._all, body, reply=reply)
            async with asyncio.timeout(timeout):
                await everyone
        except TimeoutError:
            pass
        except nats.errors.Error as exc:
            raise BrokerUnavailable(f"cannot reach the nodes: {exc!r}") from None
        finally:
            self._inbox.close(reply)
        return list(answers), len(answers) >= expected
