"""What a session needs from the connection that carries it."""

from __future__ import annotations

from typing import Protocol

from ..disconnect import Disconnect
from ..frames import Codec
from ..outbound import Wire


class Transport(Wire, Protocol):
    """One client connection as its session sees it: raw writes (``Wire``),
    how frames are encoded for it, and how to end it.

    ``name`` labels metrics and stats; ``duplex`` says whether the client
    sends commands on the connection itself (a WebSocket) or over
    ``POST /api/command`` (an event stream)."""

    name: str
    duplex: bool
    codec: Codec

    def close(self, reason: Disconnect) -> None:
        """End the connection with ``reason`` once what is queued is written;
        never blocks, idempotent."""
