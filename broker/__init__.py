"""Everything NATS: subjects, interest-counted subscriptions, the stream, publishing."""

from .base import Broker, BrokerStats, BrokerUnavailable, Delivery, DeliveryCallback
from .channels import InvalidChannel

__all__ = [
    "Broker",
    "BrokerStats",
    "BrokerUnavailable",
    "Delivery",
    "DeliveryCallback",
    "InvalidChannel",
]
