"""Builds the Herald Grafana dashboard, ``ops/grafana/herald.json``.

    python -m ops.grafana.build            # (re)write herald.json
    python -m ops.grafana.build --check    # exit 1 if herald.json is not what this script writes

Edit this file and panels.py (the panels), not the JSON: panel ids and positions are assigned here, so they
stay unique and tidy.
Every query filters ``job="$job", instance=~"$node"`` and runs on the ``${datasource}`` variable (no ``__inputs``:
import the file as it is and pick the Prometheus data source from the drop-down).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .panels import DATASOURCE, ROWS, Panel, timeseries_options

OUT = Path(__file__).with_name("herald.json")
WIDTH = 24  # Grafana's grid is 24 columns wide


def panel_json(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    targets = [
        {
            "refId": chr(ord("A") + i),
            "datasource": DATASOURCE,
            "editorMode": "code",
            "expr": t.expr,
            "legendFormat": t.legend or "__auto",
            "format": t.format,
            "range": True,
        }
        for i, t in enumerate(panel.targets)
    ]
    defaults: dict[str, Any] = {"unit": panel.unit, **panel.defaults}
    if panel.kind == "timeseries":
        defaults.setdefault("custom", {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never"})
    return {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": panel.options or timeseries_options(),
    }


def query_variable(name: str, label: str, query: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "regex": "",
        "hide": 0,
        "options": [],
        "refresh": 2,
        "sort": 1,
        **fields,
    }


def templating() -> dict[str, Any]:
    return {
        "list": [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "regex": "",
                "current": {},
                "hide": 0,
                "includeAll": False,
                "multi": False,
                "options": [],
                "refresh": 1,
            },
            # The scrape job: one Herald cluster (its first, when there are several).
            query_variable(
                "job", "Job", "label_values(herald_connections, job)", current={}, includeAll=False, multi=False
            ),
            query_variable(
                "node",
                "Node",
                'label_values(herald_connections{job="$job"}, instance)',
                current={"selected": True, "text": ["All"], "value": ["$__all"]},
                includeAll=True,
                allValue=".*",
                multi=True,
            ),
        ]
    }


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row in ROWS:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": WIDTH, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y, x, tallest = pid + 1, y + 1, 0, 0
        for panel in row.panels:
            if x + panel.width > WIDTH:
                x, y, tallest = 0, y + tallest, 0
            panels.append(panel_json(panel, pid, x, y))
            pid, x, tallest = pid + 1, x + panel.width, max(tallest, panel.height)
        y += tallest
    return {
        "id": None,
        "uid": "herald",
        "title": "Herald",
        "description": "Herald realtime push gateway: connections, delivery, backpressure, NATS, replay, API and auth.",
        "tags": ["herald"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "links": [],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": templating(),
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.grafana.build", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if herald.json differs from what would be written")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to write (default {OUT})")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run python -m ops.grafana.build", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
