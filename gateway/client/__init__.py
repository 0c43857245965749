"""Python clients of Herald.

- ``HeraldClient`` receives: a WebSocket connection that reconnects and
  resumes by itself, with the commands (``herald.py``).
- ``HttpPublisher`` publishes from a backend through a node's HTTP API
  (``publisher.py``).
"""

from .events import (
    CommandError,
    CommandTimeout,
    Event,
    HeraldError,
    Join,
    Leave,
    Message,
    Reset,
    Stopped,
    Subscribed,
    Unsubscribed,
    Welcome,
)
from .herald import HeraldClient
from .publisher import HttpPublisher, PublishRefused

__all__ = [
    "CommandError",
    "CommandTimeout",
    "Event",
    "HeraldClient",
    "HeraldError",
    "HttpPublisher",
    "Join",
    "Leave",
    "Message",
    "PublishRefused",
    "Reset",
    "Stopped",
    "Subscribed",
    "Unsubscribed",
    "Welcome",
]
