"""A rolling upgrade under load, opt-in: ``OLD_HERALD_ROOT`` names a checkout
of an older commit (``git worktree add --detach /tmp/herald-old HEAD~150``).
The cluster (ops/cluster.py) starts, node1 is replaced by the older version,
then — as an operator upgrading one node at a time — node1 is drained and
started again as this checkout, and node2 is drained: 300 clients move
through nginx between versions sharing one JetStream store (stream, KV
buckets, positions), and each ends with every message of its room, once,
in order. (Not HERALD_*: nodes refuse unknown HERALD_ variables.)"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from ops.cluster import alive, herald_command

from ..helpers import ROOT, wait_http_ok
from .test_cluster_failover import RunningCluster, assert_lossless, run_scenario, running_cluster

OLD = os.environ.get("OLD_HERALD_ROOT", "")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not OLD, reason="OLD_HERALD_ROOT: a checkout of an older commit")]


@pytest.fixture
def mixed(tmp_path: Path) -> Iterator[RunningCluster]:
    """The cluster with node1 running the older version."""
    with running_cluster(tmp_path / "cluster", PYTHONPATH=str(ROOT)) as running:
        replace(running, 0, OLD)
        yield running


def replace(c: RunningCluster, i: int, root: str) -> None:
    """node<i+1> drained (SIGTERM), then started again from ``root``'s code."""
    name = f"node{i + 1}"
    pid = c.pid(name)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    env = os.environ | {"HERALD_NATS_URLS": c.ports.nats_urls, "HERALD_STREAM_REPLICAS": "3", "PYTHONPATH": root}
    env |= {"HERALD_HTTP_PORT": str(c.ports.nodes[i]), "HERALD_NODE_ID": name}
    # In its own directory: config/herald.toml is read from there (an older node refuses newer keys).
    with open(c.cluster.logs / f"{name}.log", "ab") as log:
        cmd = [*herald_command(), "serve"]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    (c.cluster.pids / f"{name}.pid").write_text(f"{proc.pid}\n")


async def node_ready(c: RunningCluster, i: int) -> None:
    async with aiohttp.ClientSession() as http:
        await wait_http_ok(http, f"http://127.0.0.1:{c.ports.nodes[i]}/readyz", timeout=30)


async def test_a_rolling_upgrade_loses_nothing(mixed: RunningCluster, many: aiohttp.ClientSession) -> None:
    await node_ready(mixed, 0)

    async def upgrade() -> None:
        replace(mixed, 0, str(ROOT))
        await node_ready(mixed, 0)
        mixed.kill("node2", signal.SIGTERM)

    _, figures = await run_scenario("rolling-upgrade", mixed, many, upgrade, after=6.0)
    assert_lossless(mixed, figures)
    assert figures["reconnected"] >= 150, figures  # node1's and node2's clients moved
    for log in sorted(mixed.cluster.logs.glob("node*.log")):
        assert "Traceback" not in log.read_text(errors="replace"), log.name
