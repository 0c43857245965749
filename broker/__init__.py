"""Everything NATS: subjects, interest-counted subscriptions, the stream, publishing."""

from .base import (
    Broker,
    BrokerStats,
    BrokerUnavailable,
    Delivery,
    DeliveryCallback,
    History,
    LossCallback,
    Replay,
    Retention,
    TooManyConnections,
)
from .channels import InvalidChannel

__all__ = [
    "Broker",
    "BrokerStats",
    "BrokerUnavailable",
    "Delivery",
    "DeliveryCallback",
    "History",
    "InvalidChannel",
    "LossCallback",
    "Replay",
    "Retention",
    "TooManyConnections",
]
