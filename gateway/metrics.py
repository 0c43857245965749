"""Prometheus metrics (names are part of the contract, DESIGN §6).

Each node has its own registry, label children are bound once, and nothing is
labelled per connection or per user.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker import BrokerStats

TRANSPORTS = ("ws", "sse")
# The _created series double the exposition size and nobody graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class TransportMetrics:
    """The children of one transport, bound once."""

    __slots__ = ("connections", "delivered", "latency", "opened", "slow_consumer")

    def __init__(self, m: Metrics, transport: str) -> None:
        self.connections = m.connections.labels(transport)
        self.opened = m.opened.labels(transport)
        self.delivered = m.delivered.labels(transport)
        self.slow_consumer = m.slow_consumer.labels(transport)
        self.latency = m.latency


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.connections = Gauge("herald_connections", "Open client connections", ["transport"], registry=r)
        self.opened = Counter("herald_connections_opened", "Client connections opened", ["transport"], registry=r)
        self.closed = Counter(
            "herald_connections_closed", "Client connections closed, by reason", ["transport", "reason"], registry=r
        )
        self.delivered = Counter(
            "herald_messages_delivered", "Messages written to client sockets", ["transport"], registry=r
        )
        self.latency = Histogram(
            "herald_delivery_latency_seconds",
            "Stream timestamp to socket write",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.slow_consumer = Counter(
            "herald_slow_consumer_disconnects", "Connections closed for falling behind", ["transport"], registry=r
        )
        self.dropped = Counter("herald_messages_dropped", "Messages not delivered, by reason", ["reason"], registry=r)
        self.replayed = Counter("herald_replayed_messages", "Messages delivered from the stream on resume", registry=r)
        self.auth_failures = Counter("herald_auth_failures", "Refused tokens, by reason", ["reason"], registry=r)
        self.published = Counter(
            "herald_api_publishes", "Publishes through the HTTP API, by result", ["result"], registry=r
        )
        self.queue_bytes = Gauge("herald_outbound_queue_bytes", "Bytes waiting in outbound queues", registry=r)
        self.transport = {t: TransportMetrics(self, t) for t in TRANSPORTS}
        self.dropped_queue_full = self.dropped.labels("queue_full")
        # Pre-create the children so series exist (at 0) from the first scrape.
        for t in TRANSPORTS:
            self.closed.labels(t, "client_closed")
        self.published.labels("ok")

    def watch_queue_bytes(self, total: Callable[[], float]) -> None:
        self.queue_bytes.set_function(total)

    def watch_broker(self, stats: Callable[[], BrokerStats]) -> None:
        self.registry.register(_BrokerCollector(stats))


class _BrokerCollector(Collector):
    """Exports the broker's plain counters at scrape time."""

    def __init__(self, stats: Callable[[], BrokerStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        yield GaugeMetricFamily("herald_nats_connected", "1 while connected to NATS", value=1 if s.connected else 0)
        yield GaugeMetricFamily(
            "herald_channels_subscribed", "NATS subscriptions held (one per wanted channel)", value=s.subscriptions
        )
        yield CounterMetricFamily("herald_messages_received", "Messages received from NATS", value=s.messages_received)
        yield CounterMetricFamily("herald_nats_reconnects", "Reconnections to NATS", value=s.reconnects)
        yield CounterMetricFamily(
            "herald_nats_slow_consumer",
            "Messages NATS dropped because this node fell behind",
            value=s.slow_consumer_errors,
        )
        yield CounterMetricFamily(
            "herald_nats_malformed_messages", "Live messages that could not be decoded", value=s.malformed_messages
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())
