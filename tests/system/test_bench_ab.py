"""`make bench-ab` (ops/bench/ab.py): two checkouts served side by side — a
revision checked out into a worktree (removed after) and a directory — each
answers its publishes, connects and fan-out; and nginx + nchan beside a
Herald the same way (short runs; the figures are the bench's, not a test's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ops.bench.servers import Nchan

REPO = Path(__file__).resolve().parents[2]
# Each load measured once, briefly, after a short warm-up, to a fan-out of 10 receivers per room.
SHORT = ["--rounds", "1", "--seconds", "0.5", "--warmup", "0.3", "--fanout-conns", "100"]


def bench_ab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.bench.ab", *args], cwd=REPO, capture_output=True, text=True, timeout=230
    )


@pytest.mark.timeout(240)
def test_two_checkouts_are_measured_side_by_side() -> None:
    args = ["--rate", "100", "--storm-conns", "40", "--storm-rate", "200"]
    args += ["--fanout-rates", "50", *SHORT]
    run = bench_ab("HEAD", str(REPO), *args)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "publish @100/s: median µs A " in run.stdout
    assert "storm 40 @200/s: median µs A " in run.stdout
    assert "their closes, per connection: median µs A " in run.stdout
    assert "fanout-ws-http @50/s, per delivery: median µs A " in run.stdout
    worktrees = subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True).stdout
    assert "herald-ab-" not in worktrees


@pytest.mark.timeout(240)
def test_nchan_is_measured_beside_a_herald() -> None:
    if why := Nchan.missing():
        pytest.skip(why)
    args = ["--rate", "100", "--storm-conns", "40", "--storm-rate", "200"]
    args += ["--fanout-rates", "50", "--transport", "sse", *SHORT]
    run = bench_ab("nchan", str(REPO), *args)
    assert run.returncode == 0, run.stdout + run.stderr  # a lost message or a failed publish is a problem: 1
    assert "A = nchan" in run.stdout
    assert "publish @100/s: median µs A " in run.stdout
    assert "storm 40 @200/s: median µs A " in run.stdout
    assert "fanout-sse-http @50/s, per delivery: median µs A " in run.stdout


def test_two_peers_are_refused() -> None:
    run = bench_ab("nchan", "nchan")
    assert run.returncode == 2 and "at most one of A and B may be nchan" in run.stderr
