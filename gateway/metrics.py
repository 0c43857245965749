"""Prometheus metrics (names are part of the contract, README: Metrics).

Each node has its own registry, label children are bound once, and nothing is
labelled per connection or per user. The two series touched once per delivery —
delivered messages and delivery latency — are plain counters in this process
(no locks: the event loop is the only writer), exported at scrape time.
"""

from __future__ import annotations

import socket
import struct
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from broker import BrokerStats

from .disconnect import CLOSE_REASONS
from .process_metrics import ProcessMetrics

# Every label value the code uses, so each series exists (at 0) from the first
# scrape: rate() and increase() then see a node's first event of each kind.
# tests/unit/test_metrics.py checks that the code uses no value missing here.
AUTH_FAILURE_REASONS = (
    "missing",
    "not_configured",
    "too_large",
    "malformed",
    "bad_claims",
    "expired",
    "not_yet_valid",
    "bad_audience",
    "bad_issuer",
    "bad_algorithm",
    "bad_signature",
    "conflicting",
    "other_user",
)
# The ``error`` of every stream refusal (docs/protocol.md 8, "HTTP status of a refused stream").
REFUSALS = (
    "bad_request",
    "forbidden_origin",
    "draining",
    "node_full",
    "bad_token",
    "unavailable",
    "too_many_subscriptions",
    "forbidden",
    "too_many_connections",
    "internal",
)
LIMITS = (
    "node_connections",
    "connections_per_user",
    "origin",
    "subscriptions",
    "api_rate",
    "body_size",
    "frame_size",
    "publish_rate",
    "command_rate",
)
COMMAND_RESULTS = (
    "ok",
    "bad_frame",
    "bad_request",
    "unknown_command",
    "too_many_subscriptions",
    "bad_token",
    "forbidden",
    "forbidden_origin",
    "not_found",
    "timeout",
    "too_large",
    "rate_limited",
    "unavailable",
)
# Of a request to POST /api/publish (one per request, whatever the size of its batch).
API_RESULTS = (
    "ok",
    "disabled",
    "unauthorized",
    "rate_limited",
    "too_large",
    "bad_request",
    "timeout",
    "unavailable",
    "internal",  # a 500: a bug in the node, logged
)
# What the connect hook (gateway/connect_hook.py) came to: the app's answer
# (admitted, refused), an answer reused (cached), or no usable one.
CONNECT_HOOK_RESULTS = ("admitted", "cached", "refused", "timeout", "unreachable", "error_status", "bad_answer")
# The _created series double the exposition size and nobody graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class LatencyHistogram:
    """A Prometheus-style histogram for one writer: ``counts[i]`` holds values
    <= ``bounds[i]`` (the last slot is +Inf), not cumulative until exported."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_many(self, value: float, times: int) -> None:
        self.counts[bisect_left(self.bounds, value)] += times
        self.sum += value * times


class TransportMetrics:
    """What one transport counts; label children bound once."""

    __slots__ = ("connections", "delivered", "latency", "opened", "slow_consumer")

    def __init__(self, m: Metrics, transport: str) -> None:
        self.connections = m.connections.labels(transport)
        self.opened = m.opened.labels(transport)
        self.slow_consumer = m.slow_consumer.labels(transport)
        self.latency = m.latency
        self.delivered = 0  # messages written to sockets; exported as herald_messages_delivered_total


class Metrics:
    """The node's metrics (its own registry); label children bound once."""

    def __init__(self, transports: tuple[str, ...] = ()) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.connections = Gauge("herald_connections", "Open client connections", ["transport"], registry=r)
        self.opened = Counter("herald_connections_opened", "Client connections opened", ["transport"], registry=r)
        self.closed = Counter(
            "herald_connections_closed", "Client connections closed, by reason", ["transport", "reason"], registry=r
        )
        self.refused = Counter(
            "herald_connections_refused",
            "Streams refused at open (never a connection), by the refusal's error code",
            ["transport", "reason"],
            registry=r,
        )
        self.latency = LatencyHistogram()
        self.slow_consumer = Counter(
            "herald_slow_consumer_disconnects", "Connections closed for falling behind", ["transport"], registry=r
        )
        self.dropped = Counter("herald_messages_dropped", "Messages not delivered, by reason", ["reason"], registry=r)
        self.replayed = Counter("herald_replayed_messages", "Messages delivered from the stream on resume", registry=r)
        self.resets = Counter(
            "herald_resets",
            "Reset frames sent: messages a client missed are no longer held (history) or were lost live (gap)",
            ["reason"],
            registry=r,
        )
        self.limit_rejections = Counter(
            "herald_limit_rejections", "Requests refused by a configured limit, by limit", ["limit"], registry=r
        )
        self.read_marks = Counter("herald_read_marks", "Read positions stored (read command)", registry=r)
        self.auth_failures = Counter("herald_auth_failures", "Refused tokens, by reason", ["reason"], registry=r)
        self.published = Counter(
            "herald_api_publishes",
            "Requests to POST /api/publish (a batch is one), by result: ok or the error code",
            ["result"],
            registry=r,
        )
        self.published_messages = Counter(
            "herald_api_published_messages",
            "Messages stored through POST /api/publish (a batch of n is n)",
            registry=r,
        )
        self.commands = Counter(
            "herald_api_commands",
            "Client commands over POST /api/command, by result (ok or the error code) and whether another node ran it",
            ["result", "forwarded"],
            registry=r,
        )
        self.queue_bytes = Gauge(
            "herald_outbound_queue_bytes",
            "Bytes held for clients: in outbound queues (now), plus what their sockets' transports held"
            " at each connection's last heartbeat (ws) or keep-alive (sse) tick",
            registry=r,
        )
        self.clock_offset = Gauge(
            "herald_clock_offset_seconds",
            "This node's wall clock minus nats-server's (which stamps messages), as last read"
            " (within 30 s, and after a step of this node's clock)",
            registry=r,
        )
        self.ready = Gauge(
            "herald_ready",
            "1 while the node serves (/readyz answers 200); 0 while it is draining, or NATS or its stream is not ready",
            registry=r,
        )
        # By Transport.name: one per transport the node serves (transports/registry.py).
        self.transport: dict[str, TransportMetrics] = {}
        r.register(_DeliveryCollector(self))
        self.dropped_queue_full = self.dropped.labels("queue_full")
        self._closed: dict[tuple[str, str], Counter] = {}  # by (transport, reason): one labels() per close is ~1 µs
        # Pre-create the children so series exist (at 0) from the first scrape.
        for t in transports:
            self.add_transport(t)
        for result in API_RESULTS:
            self.published.labels(result)
        self.published_ok = self.published.labels("ok")
        for result in COMMAND_RESULTS:
            for forwarded in ("false", "true"):
                self.commands.labels(result, forwarded)
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason)
        for limit in LIMITS:
            self.limit_rejections.labels(limit)
        # CPU, memory and open files of the node's process (Linux /proc).
        r.register(ProcessMetrics())
        self.resets_history = self.resets.labels("history")
        self.resets_gap = self.resets.labels("gap")
        self.connect_hook_seconds = Histogram(
            "herald_connect_hook_seconds", "Connect hook request time", buckets=LATENCY_BUCKETS, registry=r
        )
        self.connect_hook = Counter("herald_connect_hook", "Connect hook outcomes, by result", ["result"], registry=r)
        for result in CONNECT_HOOK_RESULTS:
            self.connect_hook.labels(result)

    def add_transport(self, name: str) -> TransportMetrics:
        metrics = self.transport[name] = TransportMetrics(self, name)
        for reason in CLOSE_REASONS:
            self._closed[name, reason] = self.closed.labels(name, reason)
        for error in REFUSALS:
            self.refused.labels(name, error)
        return metrics

    def count_closed(self, transport: str, reason: str) -> None:
        child = self._closed.get((transport, reason))
        if child is None:
            child = self._closed[transport, reason] = self.closed.labels(transport, reason)
        child.inc()

    def watch_queue_bytes(self, total: Callable[[], float]) -> None:
        """herald_outbound_queue_bytes, read at scrape time from a running total (outbound.HeldBytes)."""
        self.queue_bytes.set_function(total)

    def watch_ready(self, ready: Callable[[], bool]) -> None:
        """herald_ready, read at scrape time from what /readyz answers."""
        self.ready.set_function(lambda: 1.0 if ready() else 0.0)

    def watch_broker(self, stats: Callable[[], BrokerStats]) -> None:
        self.registry.register(_BrokerCollector(stats))

    def watch_accept_queue(self, sockets: Callable[[], Iterable[Listener]]) -> None:
        """Export the accept queue of the node's listening ``sockets``."""
        self.registry.register(_AcceptQueueCollector(sockets))


class Listener(Protocol):
    """A listening socket (asyncio hands out socket-like objects)."""

    def getsockopt(self, level: int, option: int, size: int) -> bytes: ...


# Linux's struct tcp_info: for a listening socket, tcpi_unacked (at byte 24)
# holds its accept queue's length and tcpi_sacked its capacity.
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_QUEUE_AT = 24


def accept_queue(listener: Listener) -> tuple[int, int] | None:
    """(connections waiting to be accepted, the queue's capacity), or None
    where the system does not say (not Linux)."""
    if _TCP_INFO is None:
        return None
    try:
        info = listener.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 104)
    except OSError:
        return None
    waiting, capacity = struct.unpack_from("=II", info, _QUEUE_AT)
    return waiting, capacity


class _AcceptQueueCollector(Collector):
    """Connections the kernel has accepted that the node has not taken yet.
    When connects come faster than the node admits them (a reconnect storm)
    the queue fills; once full, the kernel drops SYNs and clients wait for
    their retransmit (1 s, then 3 s…): from outside, a slow network."""

    def __init__(self, sockets: Callable[[], Iterable[Listener]]) -> None:
        self._sockets = sockets

    def collect(self) -> Iterator[Metric]:
        queues = [q for q in map(accept_queue, self._sockets()) if q is not None]
        if not queues:
            return
        yield GaugeMetricFamily(
            "herald_accept_queue", "Connections waiting for the node to accept them", value=sum(q[0] for q in queues)
        )
        yield GaugeMetricFamily(
            "herald_accept_queue_limit",
            "Capacity of the accept queue (http.backlog, capped by net.core.somaxconn)",
            value=sum(q[1] for q in queues),
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _DeliveryCollector(Collector):
    """Exports the per-delivery counters kept outside prometheus-client."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        delivered = CounterMetricFamily(
            "herald_messages_delivered", "Messages written to client sockets", labels=["transport"]
        )
        for name, t in m.transport.items():
            delivered.add_metric([name], t.delivered)
        yield delivered
        h = m.latency
        cumulative, buckets = 0, []
        for bound, count in zip((*h.bounds, float("inf")), h.counts, strict=True):
            cumulative += count
            buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
        yield HistogramMetricFamily(
            "herald_delivery_latency_seconds", "Stream timestamp to socket write", buckets=buckets, sum_value=h.sum
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())


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
        yield CounterMetricFamily(
            "herald_gap_repairs", "Gaps in a channel's live flow fetched back from the stream", value=s.gap_repairs
        )
        yield CounterMetricFamily(
            "herald_gap_repaired_messages", "Messages recovered by gap repair", value=s.gap_repaired_messages
        )
        yield CounterMetricFamily(
            "herald_gaps_lost", "Channel gaps that could not be repaired (subscribers got a reset)", value=s.gaps_lost
        )
        yield CounterMetricFamily(
            "herald_duplicates_dropped", "Live messages dropped as already delivered", value=s.duplicates_dropped
        )
        yield CounterMetricFamily(
            "herald_read_positions_reset",
            "Stored read positions set aside: written for another incarnation of the stream, or past its end",
            value=s.read_positions_reset,
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())
