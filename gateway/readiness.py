"""Whether the node serves: what ``GET /readyz`` answers and the gauge
``herald_ready`` exports, from one function."""

from __future__ import annotations

from dataclasses import dataclass

from broker import Broker

from .sessions import Sessions


@dataclass(frozen=True, slots=True)
class NotReady:
    """Why the node does not serve: /readyz answers 503 with this error."""

    error: str
    message: str


DRAINING = NotReady("draining", "node is draining")
NATS_UNAVAILABLE = NotReady("nats_unavailable", "not connected to NATS or the stream is not ready")


def not_ready(sessions: Sessions, broker: Broker) -> NotReady | None:
    """Why the node refuses new streams and publishes, or None while it serves."""
    if sessions.draining:
        return DRAINING
    if not broker.ready:
        return NATS_UNAVAILABLE
    return None
