"""Everything NATS: subjects, interest-counted subscriptions, the stream, publishing.

The gateway sees the roles of ``broker.roles`` and the values of ``broker.base``.
"""

from .base import (
    BrokerStats,
    BrokerUnavailable,
    Delivery,
    Kind,
    Replay,
    Retention,
    RetentionPolicy,
    TooManyConnections,
)
from .channels import BROADCAST, Channel, InvalidChannel
from .roles import Broker, BrokerEvents, Connections, History, Presence, PubSub, ReadPositions

__all__ = [
    "BROADCAST",
    "Broker",
    "BrokerEvents",
    "BrokerStats",
    "BrokerUnavailable",
    "Channel",
    "Connections",
    "Delivery",
    "History",
    "InvalidChannel",
    "Kind",
    "Presence",
    "PubSub",
    "ReadPositions",
    "Replay",
    "Retention",
    "RetentionPolicy",
    "TooManyConnections",
]
