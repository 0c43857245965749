"""The cluster's static NATS configs are what ops/cluster.py renders from the
template (the binaries accepting them, and the cluster itself:
tests/system/test_ops_cluster.py)."""

from __future__ import annotations

from pathlib import Path

from ops.cluster import NAMES, render_nats

ROOT = Path(__file__).resolve().parents[2]


def test_the_static_nats_configs_are_the_templates_default_rendering() -> None:
    for i, name in enumerate(NAMES):
        assert (ROOT / "config" / "nats" / f"{name}.conf").read_text() == render_nats(i), (
            f"config/nats/{name}.conf differs from config/nats/node.conf.in: render it again"
        )
