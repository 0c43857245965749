"""Run the standard benchmark scenarios and print how the servers compare.

    python -m ops.bench.run [--quick] [--peers] [--only fanout-ws,idle,idle-sse,...] [--out artifacts/bench]

Every server runs pinned to core 0 (``taskset -c 0``), the load generator and
Herald's nats-server to core 1. Each (scenario, server) pair gets fresh
processes; everything started is killed at the end, also on Ctrl-C, SIGTERM or
an error. See ops/bench/README.md for what the figures mean.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import render, report
from .procs import (
    BenchError,
    CoreSampler,
    CpuAudit,
    Interrupted,
    Processes,
    Sysctls,
    install_signal_handlers,
    raise_nofile,
    tee_lines,
    wait_for_quiet,
)
from .scenarios import GROUPS, SCENARIO_NAMES, Scenario, loadtest_command, standard
from .servers import ROOT, Floor, Herald, Naive, Nchan, Server, child_env, gateway_supports_workers

SERVER_CORES = "0"
GENERATOR_CORES = "1"
BOTH_CORES = "0,1"
LOADTEST_MAIN = ROOT / "ops" / "loadtest" / "__main__.py"
BUSY_PCT = 10.0  # other processes above this (% of one core) make a run's figures suspect


@dataclass
class Outcome:
    """One (scenario, server) run: the load tool's JSON or why there is none."""

    scenario: str
    server: str
    data: dict[str, Any] | None = None
    error: str | None = None
    skipped: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    machine: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "server": self.server,
            "error": self.error,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 1),
            "notes": self.notes,
            "command": self.command,
            "machine": self.machine,
            "result": self.data,
        }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ops.bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: seconds per step, fewer connections")
    p.add_argument(
        "--peers", action="store_true", help="also run nginx + nchan (every scenario but broadcast, stalled, workers)"
    )
    p.add_argument("--only", default="", help=f"comma-separated scenarios (default: all): {', '.join(SCENARIO_NAMES)}")
    p.add_argument(
        "--servers",
        default="",
        help="comma-separated subset of herald,naive,nchan,floor (default: herald,naive; nchan with --peers; "
        "floor only when named: the fan-out floor, in fanout-ws-http and fanout-sse-http)",
    )
    p.add_argument("--rates", default="", help="comma-separated publish rates for every stepped scenario (msgs/s)")
    p.add_argument("--out", default="artifacts/bench", help="results directory (default: artifacts/bench)")
    p.add_argument("--max-p99-ms", type=float, default=100.0, help="a step with a higher p99 is not sustained")
    p.add_argument(
        "--herald-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra HERALD_* setting for the Herald node (repeatable), e.g. HERALD_BACKPRESSURE_MAX_BYTES=262144",
    )
    p.add_argument(
        "--storm-procs",
        type=int,
        choices=range(1, 9),
        metavar="K",
        help="split each connect storm over K generator processes (all on the generator's core; default 1)",
    )
    p.add_argument("--quiet", action="store_true", help="do not echo the load tool's progress lines")
    p.add_argument(
        "--quiet-wait",
        type=float,
        metavar="SECONDS",
        help="before each run, wait up to this long for other processes to leave the CPUs idle "
        "(default 60, with --quick 15; 0: do not wait)",
    )
    return p


def select(args: argparse.Namespace) -> tuple[list[Scenario], set[str], list[str]]:
    """The scenarios and servers to run, and notes about what was left out and why."""
    notes: list[str] = []
    scenarios = standard(args.quick)
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(wanted) - set(SCENARIO_NAMES))
        if unknown:
            raise SystemExit(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(SCENARIO_NAMES)}")
        for name, parts in GROUPS.items():
            missing = [p for p in parts if name in wanted and p not in wanted]
            if missing:
                wanted += missing
                notes.append(f"{name} goes with {', '.join(parts)}: {', '.join(missing)} added")
        scenarios = [s for s in scenarios if s.name in wanted]
    if args.rates:
        try:
            rates = tuple(int(r) for r in args.rates.split(",") if r.strip())
        except ValueError:
            raise SystemExit(f"--rates: not a list of integers: {args.rates!r}") from None
        scenarios = [replace(s, rates=rates) if s.rates and s.conns else s for s in scenarios]
    if args.storm_procs:
        scenarios = [replace(s, procs=args.storm_procs) if s.storm else s for s in scenarios]
    servers = {"herald", "naive"} | ({"nchan"} if args.peers else set())
    if args.servers:
        servers = {s.strip() for s in args.servers.split(",") if s.strip()}
        unknown = sorted(servers - {"herald", "naive", "nchan", "floor"})
        if unknown:
            raise SystemExit(f"unknown server(s): {', '.join(unknown)}")
    if "nchan" in servers:
        why = Nchan.missing()
        if why:
            notes.append(f"nchan skipped: {why}")
            servers.discard("nchan")
    return scenarios, servers, notes


class Bench:
    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args = args
        self.out = out
        self.raw = out / "raw"
        self.logs = out / "logs"
        self.procs = Processes()
        self.outcomes: list[Outcome] = []
        self.herald_env = dict(kv.split("=", 1) for kv in args.herald_env if "=" in kv)

    def make_server(self, name: str, logs: Path, scenario: Scenario | None = None) -> tuple[Server, str | None]:
        """The server and the cores the generator runs on for it."""
        env = {**dict(scenario.herald_env if scenario else ()), **self.herald_env}  # --herald-env wins
        if name == "herald":
            return Herald(self.procs, logs, SERVER_CORES, GENERATOR_CORES, env=env), GENERATOR_CORES
        if name == "naive":
            return Naive(self.procs, logs, SERVER_CORES), GENERATOR_CORES
        if name == "nchan":
            return Nchan(self.procs, logs, SERVER_CORES), GENERATOR_CORES
        if name == "floor":
            return Floor(self.procs, logs, SERVER_CORES), GENERATOR_CORES
        if name.startswith("herald-w"):
            workers = int(name.removeprefix("herald-w"))
            server = Herald(self.procs, logs, BOTH_CORES, BOTH_CORES, workers=workers, env=env, label=name)
            return server, BOTH_CORES
        raise ValueError(name)

    def run(self, scenario: Scenario, server_name: str) -> Outcome:
        outcome = Outcome(scenario.name, server_name)
        logs = self.logs / f"{scenario.name}--{server_name}"
        shutil.rmtree(logs, ignore_errors=True)  # logs are appended to: start clean
        logs.mkdir(parents=True)
        server, gen_cores = self.make_server(server_name, logs, scenario)
        tag = f"{scenario.name}/{server_name}"
        json_path = self.raw / f"{scenario.name}--{server_name}.json"
        self.raw.mkdir(parents=True, exist_ok=True)
        json_path.unlink(missing_ok=True)
        started = time.monotonic()
        print(f"\n== {tag}: {scenario.about}", flush=True)
        tool: subprocess.Popen[bytes] | None = None
        audit = CpuAudit(self.procs)
        cores = CoreSampler(0.1 if scenario.storm else 0.5)  # a storm lasts a second or two
        stamped: list[tuple[float, str]] = []
        try:
            if self.args.quiet_wait > 0:
                before = wait_for_quiet(self.procs, self.args.quiet_wait, BUSY_PCT)
                if before >= BUSY_PCT:
                    outcome.notes.append(f"machine busy before the run: other processes at {before:.0f}% of a core")
            target = server.start()
            cmd = loadtest_command(scenario, target, str(json_path), gen_cores, self.args.max_p99_ms)
            outcome.command = cmd
            log = logs / "loadtest.log"
            audit.start()
            cores.start()
            tool = self.procs.spawn(cmd, log, env=child_env(), cwd=ROOT, pipe_output=True)
            assert tool.stdout is not None
            echo = None if self.args.quiet else (lambda line: print(f"   {tag}: {line}", flush=True))
            pump = tee_lines(tool.stdout, log, echo, stamped)
            budget = scenario.budget() + 60
            try:
                code = tool.wait(budget)
            except subprocess.TimeoutExpired:
                raise BenchError(f"load tool still running after {budget:.0f}s: stopped") from None
            outcome.machine = audit.stop()
            foreign = outcome.machine.get("foreign_cpu_pct", 0.0)
            if foreign >= BUSY_PCT:
                outcome.notes.append(
                    f"other processes used {foreign:.0f}% of a core during the run: figures are suspect"
                )
            pump.join(5)
            if code != 0 and not json_path.exists():
                raise BenchError(f"load tool exited with {code}; see {log}")
            if code != 0:
                outcome.notes.append(f"load tool exited with {code}")
            outcome.data = json.loads(json_path.read_text())
            annotate_cores(outcome.data, stamped, cores, scenario.settle, server_cores(server_name))
            storm = outcome.data.get("storm")
            if isinstance(storm, dict) and len(storm.get("window") or ()) == 2:
                storm["cores_busy_pct"] = cores.busy_pct(*storm["window"])  # the same clock: time.monotonic()
            outcome.notes += self.server_health(server, logs / f"{server_name}.log")
        except BenchError as exc:
            outcome.error = str(exc)
            print(f"   {tag}: FAILED: {exc}", flush=True)
        except (OSError, ValueError) as exc:
            outcome.error = f"{exc.__class__.__name__}: {exc}"
            print(f"   {tag}: FAILED: {outcome.error}", flush=True)
        except BaseException:  # Ctrl-C, SIGTERM: stop quickly, then let it unwind
            self.procs.hurry = True
            raise
        finally:
            cores.stop()
            if tool is not None:
                self.procs.stop(tool, grace=3.0)
            server.stop()
            outcome.seconds = time.monotonic() - started
        return outcome

    def server_health(self, server: Server, log: Path) -> list[str]:
        """Crashes and tracebacks in the server's log are findings, not noise."""
        notes: list[str] = []
        for proc in server.processes():
            if proc.poll() is not None:
                notes.append(
                    f"{server.name}: a server process had exited ({proc.returncode}) before the end of the run"
                )
        try:
            text = log.read_text(errors="replace")
        except OSError:
            return notes
        tracebacks = text.count("Traceback (most recent call last)")
        errors = sum(1 for line in text.splitlines() if " ERROR " in line or " CRITICAL " in line)
        if tracebacks or errors:
            notes.append(f"{server.name}: {tracebacks} traceback(s), {errors} error line(s) in {log}")
        return notes

    def save(self, meta: dict[str, Any]) -> dict[str, Any]:
        summary = report.summarize([o.as_dict() for o in self.outcomes], meta)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (self.out / "summary.md").write_text(render.markdown(summary))
        return summary


def server_cores(server_name: str) -> dict[str, list[int]]:
    def parse(cores: str) -> list[int]:
        return [int(c) for c in cores.split(",")]

    if server_name.startswith("herald-w"):
        return {"server": parse(BOTH_CORES), "generator": parse(BOTH_CORES)}
    return {"server": parse(SERVER_CORES), "generator": parse(GENERATOR_CORES)}


def annotate_cores(
    data: dict[str, Any], stamped: list[tuple[float, str]], sampler: CoreSampler, settle: float, cores: dict[str, Any]
) -> None:
    """Add each step's per-core busy % (``cores_busy_pct``) to the load tool's result.

    A step's publish window ends ``settle`` seconds before the tool prints its
    row, and lasts the step's ``seconds``; rows are the lines after the table
    header whose first field is the step's rate."""
    data["bench_cores"] = cores
    lines = iter(stamped)
    for _, text in lines:
        if text.lstrip().startswith("rate/s"):
            break
    for step in data.get("steps") or []:
        for t, text in lines:
            fields = text.split()
            if len(fields) < 12:
                continue
            try:
                rate = float(fields[0].replace(",", ""))
            except ValueError:
                continue
            if rate == step.get("rate"):
                end = t - settle
                step["cores_busy_pct"] = sampler.busy_pct(end - float(step.get("seconds") or 0), end)
                break
        else:
            return


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quiet_wait is None:
        args.quiet_wait = 15.0 if args.quick else 60.0
    scenarios, servers, notes = select(args)
    out = Path(args.out)
    if not out.is_absolute():
        out = ROOT / out
    install_signal_handlers()
    soft, hard = raise_nofile(65536)
    sysctls = Sysctls()
    sysctls.raise_all()
    meta: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "nofile": [soft, hard],
        "pinning": {"server": SERVER_CORES, "generator": GENERATOR_CORES, "herald nats-server": GENERATOR_CORES},
        "max_p99_ms": args.max_p99_ms,
        "notes": notes + sysctls.notes,
    }
    for note in meta["notes"]:
        print(f"note: {note}")
    if soft < 12000:
        print(f"note: open-files limit is {soft}: the idle scenarios may fail to open all their connections")
    bench = Bench(args, out)
    code = 0
    try:
        if not LOADTEST_MAIN.exists():
            raise BenchError(f"{LOADTEST_MAIN.relative_to(ROOT)} not found: the load tool is missing")
        for scenario in scenarios:
            names = [s for s in scenario.servers if s in servers]
            if scenario.name == "workers":
                names = []
                if "herald" not in servers:
                    continue
                if not gateway_supports_workers():
                    msg = "`python -m gateway serve --help` has no --workers: scenario skipped"
                    print(f"\n== workers: {msg}")
                    bench.outcomes.append(Outcome("workers", "herald", skipped=msg))
                    continue
                names = list(scenario.servers)
            for name in names:
                bench.outcomes.append(bench.run(scenario, name))
                bench.save(meta)  # partial results survive an interrupted run
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"\ninterrupted ({exc.__class__.__name__} {exc}): stopping everything", flush=True)
        meta["notes"].append("run interrupted: partial results")
        code = 130
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        meta["notes"].append(str(exc))
        code = 1
    finally:
        bench.procs.stop_all()
        sysctls.restore()
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    summary = bench.save(meta)
    print()
    print(render.markdown(summary))
    print(f"results: {out / 'summary.md'}, {out / 'summary.json'}, raw load-tool output in {bench.raw}")
    if code == 0 and any(o.error for o in bench.outcomes):
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
