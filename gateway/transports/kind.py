"""What the registry knows of a transport: its name, its route, and how a
node serves it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from ..head import FrontHead, Head
from ..http import Reply
from ..node import Node
from .link import Opener


class Endpoint(Protocol):
    """A transport's streams, opened through aiohttp (``handle``) or the
    front door (``answer``, with ``max_body``; see front.py)."""

    max_body: int

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one client stream (it outlives the handler)."""

    def refusal(self, head: Head, length: int) -> Reply | None:
        """None: a stream's request is judged whole, in ``answer`` (it has no body)."""

    async def answer(self, head: FrontHead, body: bytes) -> Reply | None:
        """The same from the front door: a refusal, or None (the socket is the stream's)."""

    def body_timed_out(self, seconds: float) -> Reply:
        """The front door's 408 for a body that did not arrive (a stream's request has none)."""

    async def wait_closed(self) -> None:
        """After the node closed its sessions: until their sockets are done (bounded)."""


@dataclass(frozen=True, slots=True)
class TransportKind:
    name: str  # Transport.name: the metrics label and the key in /api/stats
    path: str  # the GET route of its streams
    serve: Callable[[Node, Opener], Endpoint]
