"""ops/prometheus and ops/grafana at fleet scale: a real Prometheus scraping 12 nodes of one cluster, with
clients on every node and a known publish rate. The dashboard shows cluster numbers (not a node's number times
the node count), no panel but the state timeline draws a line per node, and no alert fires or pends.

Needs Debian's prometheus package, as tests/system/test_ops_prometheus.py (whose helpers this reuses).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import aiohttp

from broker.embedded import free_port

from ..helpers import NodeFactory, RunningNode, api_publish, recv_json, token
from .test_ops_prometheus import Prometheus, drain_ws, grafana_substitute, load_dashboard, run_prometheus

NODES = 12
CLIENTS_PER_NODE = 2
RATE = 10.0  # messages/s published to the room every client is in
SHOWN_PER_NODE = 3  # topk(3): the most nodes a panel other than the state timeline may name


async def publish_at(http: aiohttp.ClientSession, nodes: list[RunningNode], rate: float) -> None:
    """One message to room:fleet every 1/rate s, through each node's API in turn."""
    start, n = time.monotonic(), 0
    while True:
        await api_publish(http, nodes[n % len(nodes)], "room:fleet", {"n": n})
        n += 1
        await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))


def value(result: list[dict[str, Any]]) -> float:
    return sum(float(s["value"][1]) for s in result)


async def panel_results(prom: Prometheus) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Every target of every panel, by (panel title, legend), as Grafana would run it now."""
    found = {}
    for p in load_dashboard()["panels"]:
        for t in p.get("targets", []):
            found[p["title"], t["legendFormat"]] = await prom.query(grafana_substitute(t["expr"]))
    return found


async def test_twelve_nodes_show_cluster_numbers_and_raise_no_alert(
    node_factory: NodeFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    started = time.monotonic()
    shared: dict[str, dict[str, Any]] = {
        "subject": {"prefix": f"fleet{free_port()}"},
        "stream": {"name": f"FLEET{free_port()}", "storage": "memory"},
    }
    nodes = [await node_factory(**shared) for _ in range(NODES)]
    tasks: list[asyncio.Task[None]] = []
    clients: list[aiohttp.ClientWebSocketResponse] = []
    try:
        for i in range(NODES * CLIENTS_PER_NODE):
            ws = await http.ws_connect(nodes[i % NODES].ws_url, params={"token": token(f"u{i}"), "room": "fleet"})
            assert (await recv_json(ws))["type"] == "welcome"
            clients.append(ws)
            tasks.append(asyncio.create_task(drain_ws(ws)))
        tasks.append(asyncio.create_task(publish_at(http, nodes, RATE)))
        async with run_prometheus(tmp_path, [n.url.removeprefix("http://") for n in nodes], http) as prom:
            # Rates over the 5 s the substitution gives $__rate_interval need a few scrapes of every node.
            deadline = time.monotonic() + 25
            while time.monotonic() < deadline:
                await asyncio.sleep(1)
                if value(await prom.query('count(count_over_time(up{job="herald"}[8s]) >= 7)')) == NODES:
                    break
            panels = await panel_results(prom)
            # The node variable's query lists every node.
            variables = {v["name"]: v["definition"] for v in load_dashboard()["templating"]["list"][1:]}
            assert await prom.get("/api/v1/label/job/values", **{"match[]": "herald_connections"}) == ["herald"]
            assert variables["node"] == 'label_values(herald_connections{job="$job"}, instance)'
            match = grafana_substitute('herald_connections{job="$job"}')
            listed = await prom.get("/api/v1/label/instance/values", **{"match[]": match})
            assert sorted(listed) == sorted(n.url.removeprefix("http://") for n in nodes)

            # No panel names more than SHOWN_PER_NODE nodes, but the state timeline: one row per node.
            for (title, legend), result in panels.items():
                named = {s["metric"].get("instance") for s in result} - {None}
                limit = NODES if title == "NATS connection and readiness" else SHOWN_PER_NODE
                assert len(named) <= limit, (title, legend, len(named))
                assert result, (title, legend)  # and every one has data
            # Cluster numbers: the clients, their deliveries and the messages published, once each.
            clients_count = NODES * CLIENTS_PER_NODE
            assert value(panels["Open connections", "{{transport}}"]) == clients_count
            assert value(panels["Open connections", "busiest node"]) == CLIENTS_PER_NODE
            delivered = value(panels["Messages / s", "delivered {{transport}}"])
            assert 0.6 * RATE * clients_count < delivered < 1.4 * RATE * clients_count, delivered
            received = value(panels["Messages / s", "received from NATS, busiest node"])
            assert 0.6 * RATE < received < 1.4 * RATE, received  # summed over nodes it was NODES times that
            assert value(panels["Publish API / s by result", "messages stored"]) < 1.4 * RATE
            assert {s["value"][1] for s in panels["NATS connection and readiness", "{{instance}}"]} == {"2"}

            # Nothing is wrong with any node: no alert fires or pends (but a p99 over 500 ms, which a loaded
            # test machine can give 12 nodes in one process: pending, it fires only after 5 minutes).
            alerts = (await prom.get("/api/v1/alerts"))["alerts"]
            machine = {"alertname": "HeraldDeliveryLatencyHigh", "state": "pending"}
            assert [a for a in alerts if {"alertname": a["labels"]["alertname"], "state": a["state"]} != machine] == []
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ws in clients:
            with contextlib.suppress(Exception):
                await ws.close()
    assert time.monotonic() - started < 40
