"""The transports a node serves. A new one is a module of its own and one
line here: its route, its metrics label and its line in ``/api/stats``
follow from this list."""

from __future__ import annotations

from . import sse, websocket
from .kind import TransportKind

KINDS: tuple[TransportKind, ...] = (websocket.KIND, sse.KIND)
NAMES = tuple(kind.name for kind in KINDS)
