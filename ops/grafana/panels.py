"""The panels of the Herald Grafana dashboard, row by row, and the PromQL helpers they are written with
(``ops/grafana/build.py`` lays them out and renders ``herald.json``).

Views stay readable at any node count: totals over the nodes (by transport, reason...), and per node only the
busiest and quietest or the top 3; the NATS state timeline alone has a row per node
(tests/unit/test_ops_prometheus.py holds every panel to that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# One Herald cluster (scrape job) at a time: two in one Prometheus are never added up.
NODE = 'job="$job", instance=~"$node"'
RATE = "$__rate_interval"


@dataclass
class Target:
    expr: str
    legend: str = ""
    format: str = "time_series"


@dataclass
class Panel:
    title: str
    description: str
    targets: list[Target]
    kind: str = "timeseries"
    unit: str = "short"
    width: int = 12
    height: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    title: str
    panels: list[Panel]


def rate(metric: str, by: str = "", window: str = RATE, func: str = "rate") -> str:
    """``sum by (by) (func(metric{instance=~"$node"}[window]))``; a selector already in ``metric`` is kept."""
    selector = metric.replace("}", f",{NODE}}}") if "}" in metric else f"{metric}{{{NODE}}}"
    grouping = f" by ({by}) " if by else ""
    return f"sum{grouping}({func}({selector}[{window}]))"


def top(expr: str, k: int = 3) -> str:
    """The ``k`` highest series of ``expr``: a per-node view that stays readable however many nodes there are."""
    return f"topk({k}, {expr})"


def quantile(q: float, by: str = "") -> str:
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, {rate('herald_delivery_latency_seconds_bucket', labels)})"


def timeseries_options() -> dict[str, Any]:
    return {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }


# herald_nats_connected + herald_ready of a node: 0 NATS lost, 1 connected but not ready, 2 serving.
NATS_STATE = {
    "mappings": [
        {
            "type": "value",
            "options": {
                "0": {"index": 0, "text": "NATS lost", "color": "red"},
                "1": {"index": 1, "text": "not ready", "color": "orange"},
                "2": {"index": 2, "text": "serving", "color": "green"},
            },
        }
    ],
    "color": {"mode": "thresholds"},
    "thresholds": {
        "mode": "absolute",
        "steps": [{"color": "red", "value": None}, {"color": "orange", "value": 1}, {"color": "green", "value": 2}],
    },
    "min": 0,
    "max": 2,
}
CONNECTIONS = f"sum by (instance) (herald_connections{{{NODE}}})"

ROWS = [
    Row(
        "Connections",
        [
            Panel(
                "Open connections",
                "herald_connections: WebSocket and SSE clients connected, all nodes together by transport, and "
                "those of the busiest and the quietest node (far apart: the load balancer does not spread them).",
                [
                    Target(f"sum by (transport) (herald_connections{{{NODE}}})", "{{transport}}"),
                    Target(f"max({CONNECTIONS})", "busiest node"),
                    Target(f"min({CONNECTIONS})", "quietest node"),
                ],
                width=6,
            ),
            Panel(
                "Connects / s by transport",
                "herald_connections_opened_total: new client connections.",
                [Target(rate("herald_connections_opened_total", "transport"), "{{transport}}")],
                unit="ops",
                width=6,
            ),
            Panel(
                "Disconnects and refusals / s by reason",
                "herald_connections_closed_total: closes by reason (client_closed, slow_consumer, token_expired, "
                "heartbeat_timeout, shutdown, replaced, ...); herald_connections_refused_total: streams refused at "
                "open, by error code (bad_token, too_many_connections, draining, ...).",
                [
                    Target(rate("herald_connections_closed_total", "reason"), "{{reason}}"),
                    Target(rate("herald_connections_refused_total", "reason"), "refused {{reason}}"),
                ],
                unit="ops",
                width=6,
            ),
            Panel(
                "Accept queue, longest 3 nodes",
                "herald_accept_queue: connects the kernel holds until the node takes them. Near "
                "herald_accept_queue_limit (the largest node's shown), connects come faster than the node admits "
                "them; when full, new ones wait for a SYN retransmit (1 s, 3 s...).",
                [
                    Target(top(f"sum by (instance) (herald_accept_queue{{{NODE}}})"), "{{instance}}"),
                    Target(f"max(herald_accept_queue_limit{{{NODE}}})", "limit"),
                ],
                width=6,
            ),
        ],
    ),
    Row(
        "Delivery",
        [
            Panel(
                "Messages / s",
                "Delivered: messages written to client sockets, all nodes (herald_messages_delivered_total, replays "
                "included). Received: messages in from NATS by the node that receives most "
                "(herald_messages_received_total): a node receives a message once whatever its fan-out, if any of "
                "its clients wants the channel, so a sum over nodes would count a broadcast once per node.",
                [
                    Target(rate("herald_messages_delivered_total", "transport"), "delivered {{transport}}"),
                    Target(
                        f"max({rate('herald_messages_received_total', 'instance')})", "received from NATS, busiest node"
                    ),
                ],
                unit="ops",
                width=8,
            ),
            Panel(
                "Delivery latency p50 / p99",
                "herald_delivery_latency_seconds: stream timestamp to socket write, live messages only; all nodes, "
                "and the p99 of the 3 slowest.",
                [
                    Target(quantile(0.5), "p50"),
                    Target(quantile(0.99), "p99"),
                    Target(top(quantile(0.99, "instance")), "p99 {{instance}}"),
                ],
                unit="s",
                width=8,
            ),
            Panel(
                "Delivery latency distribution",
                "Deliveries per herald_delivery_latency_seconds bucket in each interval.",
                [
                    Target(
                        rate("herald_delivery_latency_seconds_bucket", "le", "$__interval", "increase"),
                        "{{le}}",
                        "heatmap",
                    )
                ],
                kind="heatmap",
                unit="s",
                width=8,
                options={
                    "calculate": False,
                    "yAxis": {"unit": "s", "axisPlacement": "left"},
                    "rowsFrame": {"layout": "auto"},
                    "color": {"mode": "scheme", "scheme": "Oranges", "exponent": 0.5, "steps": 64},
                    "cellGap": 1,
                    "tooltip": {"show": True, "yHistogram": False},
                    "legend": {"show": True},
                },
            ),
        ],
    ),
    Row(
        "Backpressure",
        [
            Panel(
                "Outbound queue bytes, fullest 3 nodes",
                "herald_outbound_queue_bytes: bytes waiting to be written to clients, on the 3 nodes holding most.",
                [Target(top(f"sum by (instance) (herald_outbound_queue_bytes{{{NODE}}})"), "{{instance}}")],
                unit="bytes",
                width=8,
            ),
            Panel(
                "Slow-consumer disconnects / s",
                "herald_slow_consumer_disconnects_total: connections closed (4008) for falling behind, all nodes by "
                "transport, and the 3 nodes closing most.",
                [
                    Target(rate("herald_slow_consumer_disconnects_total", "transport"), "{{transport}}"),
                    Target(top(rate("herald_slow_consumer_disconnects_total", "instance")), "{{instance}}"),
                ],
                unit="ops",
                width=8,
            ),
            Panel(
                "Messages dropped / s by reason",
                "herald_messages_dropped_total: messages not delivered (queue_full: the client's queue was full).",
                [Target(rate("herald_messages_dropped_total", "reason"), "{{reason}}")],
                unit="ops",
                width=8,
            ),
        ],
    ),
    Row(
        "NATS",
        [
            Panel(
                "NATS connection and readiness",
                "A row per node: herald_nats_connected (connected to NATS) plus herald_ready (serves: /readyz answers "
                "200). NATS lost; not ready: connected but draining, or its JetStream stream is not ready, so every "
                "stream and publish is refused; serving.",
                [
                    Target(
                        f"sum by (instance) (herald_nats_connected{{{NODE}}})"
                        f" + sum by (instance) (herald_ready{{{NODE}}})",
                        "{{instance}}",
                    )
                ],
                kind="state-timeline",
                width=8,
                height=10,
                options={"showValue": "auto", "mergeValues": True, "rowHeight": 0.8, "alignValue": "center"},
                defaults=NATS_STATE,
            ),
            Panel(
                "NATS reconnects and slow-consumer drops",
                "herald_nats_reconnects_total (reconnections, all nodes) and herald_nats_slow_consumer_total "
                "(messages NATS dropped because the node fell behind, the 3 nodes dropping most), per interval.",
                [
                    Target(rate("herald_nats_reconnects_total", func="increase"), "reconnects"),
                    Target(
                        top(rate("herald_nats_slow_consumer_total", "instance", func="increase")),
                        "slow-consumer drops {{instance}}",
                    ),
                ],
                width=8,
            ),
            Panel(
                "NATS subscriptions, most and fewest",
                "herald_channels_subscribed: NATS subscriptions held, one per channel some client on the node wants; "
                "the node holding most and the one holding fewest (nodes share channels: no sum).",
                [
                    Target(f"max(herald_channels_subscribed{{{NODE}}})", "most"),
                    Target(f"min(herald_channels_subscribed{{{NODE}}})", "fewest"),
                ],
                width=8,
            ),
        ],
    ),
    Row(
        "Replay and gap repair",
        [
            Panel(
                "Replayed and gap-repaired messages / s",
                "herald_replayed_messages_total: sent from the stream on resume. herald_gap_repaired_messages_total: "
                "missed live messages fetched back from the stream. herald_gaps_lost_total: gaps that could not be "
                "repaired (clients got a reset).",
                [
                    Target(rate("herald_replayed_messages_total"), "replayed"),
                    Target(rate("herald_gap_repaired_messages_total"), "gap-repaired"),
                    Target(rate("herald_gaps_lost_total"), "gaps lost"),
                ],
                unit="ops",
                width=12,
            ),
            Panel(
                "Resets / s by reason",
                "herald_resets_total: reset frames sent, history (missed messages no longer held) or gap (lost live).",
                [Target(rate("herald_resets_total", "reason"), "{{reason}}")],
                unit="ops",
                width=12,
            ),
        ],
    ),
    Row(
        "Publish API and auth",
        [
            Panel(
                "Publish API / s by result",
                "herald_api_publishes_total: requests to POST /api/publish, by result: ok or the error code (a "
                "batch is one request, stored or refused). herald_api_published_messages_total: the messages they "
                "stored (a batch of 100 is 100).",
                [
                    Target(rate("herald_api_publishes_total", "result"), "requests {{result}}"),
                    Target(rate("herald_api_published_messages_total"), "messages stored"),
                ],
                unit="ops",
                width=8,
            ),
            Panel(
                "Publish API errors / s",
                "herald_api_publishes_total with a result other than ok: requests refused (a batch is one), by "
                "error code: unauthorized, rate_limited, too_large, bad_request, timeout (the body did not arrive "
                "in time), unavailable, disabled, internal (a 500: a bug in the node, logged).",
                [Target(rate('herald_api_publishes_total{result!="ok"}', "result"), "{{result}}")],
                unit="ops",
                width=8,
            ),
            Panel(
                "Auth failures / s by reason",
                "herald_auth_failures_total: refused tokens by reason (expired, bad_signature, malformed, "
                "missing, ...).",
                [Target(rate("herald_auth_failures_total", "reason"), "{{reason}}")],
                unit="ops",
                width=8,
            ),
            Panel(
                "Limit rejections / s by limit",
                "herald_limit_rejections_total: requests refused by a configured limit.",
                [Target(rate("herald_limit_rejections_total", "limit"), "{{limit}}")],
                unit="ops",
                width=24,
            ),
        ],
    ),
]
