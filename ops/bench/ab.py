"""Two versions of Herald, or nginx + nchan beside one, measured side by side (``make bench-ab``).

    python -m ops.bench.ab A B [--only publish,storm,fanout] [--rounds 5] [--transport ws|sse]

A and B are git revisions (checked out into temporary worktrees) or
directories holding a checkout, or ``nchan``: nginx + nchan set beside a
Herald (``make bench-ab AB='nchan HEAD'``), which gives the ratio to nchan
with both under the same drift. Both servers run at the same time, pinned to
core 0, each Herald with its own nats-server on core 1, and get the same load at
the same moment: HTTP publishes at ``--rate`` (server CPU per publish),
connect storms of ``--storm-conns`` at ``--storm-rate`` each (node CPU per
connect, and per connection over the closes after), and a fan-out to
``--fanout-conns`` (1,000) WebSocket (``--transport sse``: SSE) receivers
published to over HTTP at each of ``--fanout-rates`` (server CPU per
delivery), each load after ``--warmup`` seconds (2) of the same. This VM's speed
drifts by ±20 % between runs a minute apart, which hides any change smaller
than that when runs are compared one after another; side by side, both
nodes see the same drift, and each round's B ÷ A is steady to ~2 %
(publish, fan-out) or ~5 % (storm). Reported: each round's figures, and the
ratio's median and range. The node second in the pair measures ~1-2 %
higher: swap A and B to see it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ops.loadtest.procstat import live_cpu_seconds
from ops.loadtest.publisher import HttpPublisher

from .procs import Processes, install_signal_handlers, pinned
from .servers import ROOT, Herald, Nchan, Target

# What A or B may name instead of a version of Herald.
PEER = "nchan"


@contextmanager
def checkouts(versions: list[str]) -> Iterator[list[Path | None]]:
    """A directory per version: itself if it is one, else a worktree of the
    revision; None for the peer."""
    made: list[Path] = []
    trees: list[Path | None] = []
    try:
        for version in versions:
            if version == PEER:
                trees.append(None)
                continue
            if Path(version, "gateway").is_dir():
                trees.append(Path(version).resolve())
                continue
            tree = Path(tempfile.mkdtemp(prefix="herald-ab-")) / "tree"
            git = ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), version]
            subprocess.run(git, check=True)
            made.append(tree)
            trees.append(tree)
        yield trees
    finally:
        for tree in made:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)


def http_publisher(target: Target) -> HttpPublisher:
    """A publisher to ``target`` over 10 rooms, as the load tool publishes to it."""
    publish = target.http()
    rooms = [f"r{k}" for k in range(10)]
    return HttpPublisher(rooms, 100, publish.url, dict(publish.headers), publish.body == "herald")


async def publish_rounds(
    targets: list[Target], rate: float, seconds: float, rounds: int, warmup: float, problems: list[str]
) -> list[list[float]]:
    """Each round: every server published to at ``rate`` at once; µs of its CPU per publish."""
    publishers = []
    for target in targets:
        publisher = http_publisher(target)
        await publisher.start()
        publishers.append(publisher)
    try:
        await asyncio.gather(*(p.run(min(rate, 200), warmup) for p in publishers))
        figures: list[list[float]] = []
        for _ in range(rounds):
            before = [live_cpu_seconds(t.server_pids[0]) for t in targets]
            sent = await asyncio.gather(*(p.run(rate, seconds) for p in publishers))
            await asyncio.gather(*(p.drain(5) for p in publishers))
            after = [live_cpu_seconds(t.server_pids[0]) for t in targets]
            figures.append([1e6 * (a - b) / max(n, 1) for a, b, n in zip(after, before, sent, strict=True)])
            print("publish: " + "  ".join(f"{f:.0f}" for f in figures[-1]) + " µs", flush=True)
        for publisher in publishers:
            if publisher.errors:
                problems.append(f"publish errors: {dict(publisher.errors)}")
    finally:
        for publisher in publishers:
            await publisher.close()
    return figures


def loadtests(
    targets: list[Target], logs: Path, name: str, args: Callable[[Target], list[str]], transport: str = "ws"
) -> list[dict[str, Any]]:
    """One load tool per server at once (on core 1), with ``args(server)`` and
    the server's pid; their JSON results, in the servers' order."""
    procs = []
    for index, target in enumerate(targets):
        out = logs / f"{name}-{index}.json"
        url = target.ws_url if transport == "ws" else target.sse_url
        cmd = [sys.executable, "-m", "ops.loadtest", "--transport", transport, "--url", url]
        cmd += ["--envelope", target.envelope, *(["--jwt-secret", target.jwt_secret] if target.jwt_secret else [])]
        cmd += [*args(target), "--server-pid", str(target.server_pids[0])]
        with (logs / f"{name}-{index}.log").open("wb") as log:
            proc = subprocess.Popen(pinned("1", [*cmd, "--json", str(out)]), stdout=log, stderr=log, cwd=ROOT)
        procs.append((proc, out))
    results = []
    for proc, out in procs:
        proc.wait(timeout=300)
        results.append(json.loads(out.read_text()))
    return results


def storm_rounds(
    targets: list[Target], conns: int, rate: float, rounds: int, logs: Path, problems: list[str]
) -> tuple[list[list[float]], list[list[float]]]:
    """Each round: a storm against every node at once; µs of node CPU per
    connect, and per connection over the closes that follow."""
    args = ["--storm", "--conns", str(conns), "--connect-rate", f"{rate:g}", "--hold", "1", "--connect-timeout", "30"]
    connects: list[list[float]] = []
    closes: list[list[float]] = []
    for round_ in range(rounds):
        row, closing = [], []
        for result in loadtests(targets, logs, f"storm-{round_}", lambda _: args):
            storm = result["storm"]
            if storm["failed"]:
                problems.append(f"storm: {storm['failed']} connects failed (logs: {logs})")
            row.append(float(storm["server"]["us_per_connect"]))
            closing.append(float(storm["server"]["us_per_close"]))
        connects.append(row)
        closes.append(closing)
        print(
            "storm: " + "  ".join(f"{f:.0f}" for f in row) + " µs; closes " + "  ".join(f"{f:.0f}" for f in closing),
            flush=True,
        )
    return connects, closes


def fanout_rounds(
    targets: list[Target],
    rates: list[float],
    seconds: float,
    rounds: int,
    logs: Path,
    problems: list[str],
    transport: str = "ws",
    conns: int = 1000,
    warmup: float = 2.0,
) -> dict[float, list[list[float]]]:
    """Each round: ``conns`` receivers (``transport``) over 10 rooms on every
    server at once, published to over HTTP at each of ``rates``; µs of its
    CPU per delivery, by rate."""
    steps = ["--conns", str(conns), "--rooms", "10", "--connect-rate", "1000", "--payload-bytes", "100"]
    steps += ["--rates", ",".join(f"{r:g}" for r in rates), "--step-seconds", f"{seconds:g}"]
    steps += ["--warmup", f"{warmup:g}", "--settle", "1"]
    figures: dict[float, list[list[float]]] = {rate: [] for rate in rates}
    for round_ in range(rounds):
        rows: dict[float, list[float]] = {rate: [] for rate in rates}
        results = loadtests(targets, logs, f"fanout-{round_}", lambda t: [*steps, *t.http_publish_args], transport)
        for result in results:
            for step in result["steps"]:
                if step["lost"] or step["duplicated"]:
                    problems.append(f"fanout: {step['lost']} lost, {step['duplicated']} duplicated (logs: {logs})")
                if step["rate"] in rows:
                    rows[step["rate"]].append(float(step["server"]["us_per_delivery"]))
        for rate, row in rows.items():
            if len(row) == len(targets):
                figures[rate].append(row)
                print(f"fanout @{rate:g}/s: " + "  ".join(f"{f:.1f}" for f in row) + " µs", flush=True)
    return figures


def summary(name: str, labels: list[str], figures: list[list[float]]) -> str:
    ratios = [b / a for a, b in figures if a > 0]
    medians = [statistics.median(column) for column in zip(*figures, strict=True)]
    sides = ", ".join(f"{label} {m:.{1 if m < 100 else 0}f}" for label, m in zip(labels, medians, strict=True))
    if not ratios:  # A used no measurable CPU (a tiny run: /proc counts in 10 ms ticks)
        return f"{name}: median µs {sides}; B/A -"
    spread = f"{min(ratios):.3f}-{max(ratios):.3f}"
    return f"{name}: median µs {sides}; B/A median {statistics.median(ratios):.3f} (rounds {spread})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.bench.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("a", help=f"git revision or checkout directory, or {PEER}")
    p.add_argument("b", help=f"git revision or checkout directory, or {PEER}")
    p.add_argument("--only", default="publish,storm,fanout", help="publish, storm, fanout (comma-separated)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=6.0, help="each publish round")
    p.add_argument("--rate", type=float, default=500.0, help="publishes/s to each node")
    p.add_argument("--storm-conns", type=int, default=3000)
    p.add_argument("--storm-rate", type=float, default=600.0, help="connects/s offered to each node")
    p.add_argument("--fanout-rates", default="200,500", help="publishes/s over HTTP to the fan-out, each node")
    p.add_argument("--fanout-conns", type=int, default=1000, help="the fan-out's receivers, each node")
    p.add_argument("--transport", choices=("ws", "sse"), default="ws", help="the fan-out's receivers")
    p.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of load before the publishes and fan-out measured"
    )
    args = p.parse_args(argv)
    if args.a == args.b == PEER:
        p.error(f"at most one of A and B may be {PEER}")
    if PEER in (args.a, args.b) and (why := Nchan.missing()):
        p.error(why)
    only = set(args.only.split(","))
    install_signal_handlers()
    procs = Processes()
    logs = Path(tempfile.mkdtemp(prefix="herald-ab-logs-"))
    lines: list[str] = []
    problems: list[str] = []  # errors and failed connects: the figures are not comparable
    with checkouts([args.a, args.b]) as trees:
        nodes = [
            Nchan(procs, logs)
            if tree is None
            else Herald(procs, logs, env={"HERALD_LIMITS_API_RATE": "1000000"}, label=f"node-{label}", root=tree)
            for label, tree in zip("AB", trees, strict=True)
        ]
        try:
            targets = [node.start() for node in nodes]
            if "publish" in only:
                figures = asyncio.run(
                    publish_rounds(targets, args.rate, args.seconds, args.rounds, args.warmup, problems)
                )
                lines.append(summary(f"publish @{args.rate:g}/s", ["A", "B"], figures))
            if "storm" in only:
                figures, closes = storm_rounds(targets, args.storm_conns, args.storm_rate, args.rounds, logs, problems)
                lines.append(summary(f"storm {args.storm_conns} @{args.storm_rate:g}/s", ["A", "B"], figures))
                lines.append(summary("their closes, per connection", ["A", "B"], closes))
            if "fanout" in only:
                rates = [float(r) for r in args.fanout_rates.split(",")]
                by_rate = fanout_rounds(
                    targets,
                    rates,
                    args.seconds,
                    args.rounds,
                    logs,
                    problems,
                    args.transport,
                    args.fanout_conns,
                    args.warmup,
                )
                for rate, figures in by_rate.items():
                    if figures:
                        name = f"fanout-{args.transport}-http @{rate:g}/s, per delivery"
                        lines.append(summary(name, ["A", "B"], figures))
        finally:
            for node in nodes:
                node.stop()
            procs.stop_all()
    print(f"A = {args.a}, B = {args.b} (logs: {logs})")
    print("\n".join(lines + problems))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
