"""ops/grafana: the dashboard is well formed and what ``python -m
ops.grafana.build`` renders (promtool, and a real Prometheus scraping a real
node: tests/system/test_ops_prometheus.py)."""

from __future__ import annotations

import json
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
    assert node["definition"] == "label_values(herald_connections, instance)"
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
