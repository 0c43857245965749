"""`make bench-floor` (ops/bench/floor.py): its minimal servers answer what
they are sent, on a real nats-server, so the floors it prints are of servers
that did the work (a short run; the figures are the bench's, not a test's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_the_floor_servers_answer_every_publish_and_connect() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "ops.bench.floor", "--seconds", "0.5", "--conns", "40"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(run.stdout[run.stdout.index("{\n") :])
    for mode in ("http", "publish"):
        steps = results[mode]
        assert [s["rate"] for s in steps] == [500, 2000]
        # CPU is read in clock ticks (10 ms): a half-second step may read 0.
        assert all(s["sent"] > 0 and not s["errors"] and s["us_per_publish"] >= 0 for s in steps), steps
    for mode in ("handshake", "connect"):
        assert results[mode]["connected"] == 40, results[mode]
