"""Everything NATS: subjects, interest-counted subscriptions, the stream, publishing.

The gateway sees the roles of ``broker.roles`` and the values of ``broker.base``.
"""

from .base import (
    BrokerStats,
    BrokerUnavailable,
    Delivery,
    Kick,
    Kind,
    MessageTooLarge,
    NodeGone,
    Publishable,
    Published,
    Replay,
    Retention,
    RetentionPolicy,
    TooManyConnections,
)
from .channels import BROADCAST, Channel, InvalidChannel
from .roles import Broker, BrokerEvents, Connections, History, Presence, PubSub, ReadPositions, Relay

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
    "Kick",
    "Kind",
    "MessageTooLarge",
    "NodeGone",
    "Presence",
    "PubSub",
    "Publishable",
    "Published",
    "ReadPositions",
    "Relay",
    "Replay",
    "Retention",
    "RetentionPolicy",
    "TooManyConnections",
]
