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
]
