"""The 2-minute soak (ops/soak.py): a real nats-server, restarted under load, and one
Herald node as a subprocess; churn for two minutes, then no drift at the quiescent points.
`make soak` runs the 30-minute one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # about 3 minutes


@pytest.mark.timeout(600)  # 2 minutes of churn, two quiescent checkpoints, start and stop: about 3 minutes
def test_two_minute_soak_has_no_drift(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    run = subprocess.run(
        # Two minutes cannot tell the allocator's swings (up to ~10 % of RSS
        # between checkpoints, seen here) from growth: RSS is held to 25 % here,
        # 5 % in the 30-minute `make soak`; fds, tasks, subscriptions and
        # channels are held exactly in both.
        [sys.executable, "-m", "ops.soak", "--minutes", "2", "--out", str(out), "--rss-limit", "0.25"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=540,
    )
    summary = run.stdout + run.stderr
    assert run.returncode == 0, summary
    assert "SOAK OK" in run.stdout, summary
    assert (out / "soak.csv").stat().st_size > 0
    assert (out / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header, *rows = (out / "soak.csv").read_text().splitlines()
    assert header.startswith("t,phase,rss_kib,fds,")
    assert len(rows) >= 12 + 15, summary  # a sample every 10 s plus 5 at each of the 3 quiescent points
