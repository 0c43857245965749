"""ops/grafana: the dashboard is well formed and what ``python -m
ops.grafana.build`` renders (promtool, and a real Prometheus scraping a real
node: tests/system/test_ops_prometheus.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ops.grafana import build

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops" / "grafana" / "herald.json"


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def test_dashboard_is_well_formed_and_up_to_date() -> None:
    assert DASHBOARD.read_text() == build.render(), "herald.json is stale: run python -m ops.grafana.build"
    d = load_dashboard()
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert "__inputs" not in d
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), ids
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    node = variables["node"]
    assert node["type"] == "query" and node["multi"] and node["includeAll"]
    assert node["definition"] == 'label_values(herald_connections{job="$job"}, instance)'
    assert node["datasource"]["uid"] == "${datasource}"
    panels = [p for p in d["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    for p in panels:
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert 'instance=~"$node"' in t["expr"], (p["title"], t["expr"])


def gives_a_series_per_node(expr: str) -> bool:
    """Whether ``expr`` answers with one series per node (grouped by instance, or not aggregated at all) rather
    than a number of series that does not grow with the fleet (topk/bottomk bound it)."""
    if re.match(r"\s*(topk|bottomk)\(", expr):
        return False
    outer = re.match(r"\s*(?:histogram_quantile\([\d.]+, )?(?:sum|max|min|avg|count) ?(?:by \(([^)]*)\) )?\(", expr)
    if outer is None:
        return True  # not aggregated
    return "instance" in re.split(r",\s*", outer[1] or "")


def test_no_panel_draws_a_line_per_node_but_a_state_timeline() -> None:
    """At 12 nodes a line per node and transport was 24 lines in one panel: per-node views are topk or
    busiest/quietest; only a state timeline (a row per node, read across) draws every node, once."""
    assert gives_a_series_per_node('herald_outbound_queue_bytes{instance=~"$node"}')
    assert gives_a_series_per_node('sum by (instance, transport) (herald_connections{instance=~"$node"})')
    assert not gives_a_series_per_node('topk(5, sum by (instance) (herald_connections{instance=~"$node"}))')
    assert not gives_a_series_per_node('sum by (transport) (herald_connections{instance=~"$node"})')
    assert not gives_a_series_per_node('max(sum by (instance) (herald_connections{instance=~"$node"}))')
    assert gives_a_series_per_node("histogram_quantile(0.99, sum by (instance, le) (rate(x_bucket[5m])))")
    for p in (p for p in load_dashboard()["panels"] if p["type"] != "row"):
        per_node = [t["expr"] for t in p["targets"] if gives_a_series_per_node(t["expr"])]
        allowed = 1 if p["type"] == "state-timeline" else 0
        assert len(per_node) <= allowed, (p["title"], per_node)


def test_every_query_is_scoped_to_the_chosen_job() -> None:
    """Two Herald clusters in one Prometheus (jobs herald and herald-staging, say): a panel summing over every job
    would add them up. One job at a time, from a variable; the node list is that job's."""
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    job = variables["job"]
    assert job["definition"] == "label_values(herald_connections, job)"
    assert not job["multi"] and not job["includeAll"]
    assert variables["node"]["definition"] == 'label_values(herald_connections{job="$job"}, instance)'
    names = [v["name"] for v in load_dashboard()["templating"]["list"]]
    assert names.index("job") < names.index("node")  # the node query uses $job
    for p in (p for p in load_dashboard()["panels"] if p["type"] != "row"):
        for t in p["targets"]:
            assert t["expr"].count('job="$job"') == t["expr"].count('instance=~"$node"') >= 1, (p["title"], t["expr"])
