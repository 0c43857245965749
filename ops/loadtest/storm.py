"""Connect storm (``--storm``): ``--conns`` connects offered at ``--connect-rate``,
each its own user (tokens minted before the first connect), nothing published.

Every connect is timed from the start of its TCP connect to the response
head (101, or the event stream's 200) and to "ready" (Herald: its welcome
frame or ``welcome`` event, when it has admitted the client; a peer: the
head). The figures: connects offered per second, connects admitted per
second (connected / (last ready - first start)), handshake latency, errors
by kind, and the server's CPU per connect over the storm (from the first
scheduled start until every connect has succeeded or failed). Then the
connections are held ``--hold`` seconds and closed.

``--procs K`` splits the storm over K processes (children of this one, on
the same cores): process j offers connections j, j+K, j+2K … at rate / K,
on the same schedule as one process would, so together they offer the
whole rate. They start at one instant given by the parent, and their
timestamps (``time.monotonic``: one clock for every process) are merged.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import report
from .cli import Config
from .clients import Client, failure_label, new_client, open_connection, tokens
from .procstat import ProcGroup, raise_fd_limit, self_cpu
from .publisher import MIN_SLEEP
from .report import log, out
from .stats import Histogram

GENERATOR_BUSY_PCT = 85.0
START_DELAY = 0.2  # seconds between "every part is ready" and the first connect
# After the clients closed: time for the server to finish closing (counting
# out, releasing channels after its unsubscribe delay, 1 s by default).
CLOSE_SETTLE = 1.5
ROOT = Path(__file__).resolve().parents[2]


def part_indices(conns: int, procs: int, part: int) -> range:
    """The connection indices process ``part`` of ``procs`` offers."""
    return range(part, conns, procs)


def child_argv(cfg: Config, part: int, json_path: str) -> list[str]:
    """The command line of storm process ``part`` (after ``python -m ops.loadtest``)."""
    argv = [
        "--storm",
        "--transport",
        cfg.transport,
        "--url",
        cfg.url,
        "--conns",
        str(cfg.conns),
        "--rooms",
        str(cfg.rooms),
        "--connect-rate",
        repr(cfg.connect_rate),
        "--connect-timeout",
        repr(cfg.connect_timeout),
        "--envelope",
        cfg.envelope,
        "--hold",
        repr(cfg.hold),
        "--max-seconds",
        repr(cfg.max_seconds),
        "--procs",
        str(cfg.procs),
        "--child",
        str(part),
        "--json",
        json_path,
    ]
    if cfg.jwt_secret:
        argv += ["--jwt-secret", cfg.jwt_secret]
    return argv


class Part:
    """The connections one process offers, and their timings."""

    def __init__(self, cfg: Config, part: int) -> None:
        self.cfg = cfg
        self.part = part
        self.indices = part_indices(cfg.conns, cfg.procs, part)
        raise_fd_limit(len(self.indices) + 256)
        hist = Histogram()  # nothing is published: no latencies to record
        minted = tokens(cfg.jwt_secret, self.indices)
        self.clients = [new_client(cfg, i, t, hist) for i, t in zip(self.indices, minted, strict=True)]
        self.errors: Counter[str] = Counter()
        self.late: list[float] = []  # how long after its due time each connect started

    async def run(self, go: float, on_done: Callable[[], None]) -> dict[str, Any]:
        """Offer the connects on the schedule that starts at ``go`` (time.monotonic()),
        call ``on_done`` once each has succeeded or failed, hold, close."""
        # The cyclic GC's full passes over thousands of new objects stall the loop for
        # 10-30 ms: that was the whole of the storm's p99. Off until the storm is over.
        gc.collect()
        gc.freeze()
        gc.disable()
        try:
            return await self._storm(go, on_done)
        finally:
            gc.enable()
            gc.unfreeze()

    async def _storm(self, go: float, on_done: Callable[[], None]) -> dict[str, Any]:
        cfg, loop = self.cfg, asyncio.get_running_loop()
        rate, indices, clients = cfg.connect_rate, self.indices, self.clients
        await asyncio.sleep(max(0.0, go - time.monotonic()))
        cpu0 = self_cpu()
        tasks = []
        k, n = 0, len(clients)
        while k < n:
            now = time.monotonic()
            while k < n and go + indices[k] / rate <= now:
                tasks.append(loop.create_task(self._one(clients[k], go + indices[k] / rate)))
                k += 1
            if k < n:
                await asyncio.sleep(max(go + indices[k] / rate - time.monotonic(), MIN_SLEEP))
        await asyncio.gather(*tasks)
        done, cpu1 = time.monotonic(), self_cpu()
        on_done()
        await asyncio.sleep(cfg.hold)
        ready = [c for c in clients if c.ready_at]
        closed = Counter(c.close_how or "?" for c in ready if c.closed_at is not None)
        await _close(clients)
        return {
            "part": self.part,
            "go": go,
            "done": done,
            "attempted": len(tasks),
            "start": [c.started_at for c in clients],
            "head": [c.head_at for c in clients],
            "ready": [c.ready_at for c in clients],
            "late": self.late,
            "errors": dict(self.errors),
            "cpu_s": round(cpu1 - cpu0, 4),
            "closed_during_hold": dict(closed),
        }

    async def _one(self, client: Client, due: float) -> None:
        self.late.append(time.monotonic() - due)
        try:
            await open_connection(client, self.cfg.connect_timeout)
        except Exception as exc:  # noqa: BLE001 - every failure is counted by its label
            self.errors[failure_label(exc, client)] += 1


async def _close(clients: Sequence[Client]) -> None:
    for c in clients:
        c.close()
    await asyncio.sleep(0.3)
    for c in clients:
        if c.transport is not None and not c.transport.is_closing():
            c.transport.abort()


# -- merging the parts --------------------------------------------------------


def quantiles_ms(values: Sequence[float]) -> dict[str, float] | None:
    """p50 / p90 / p99 / max / mean (nearest rank) of durations in seconds, in ms."""
    if not values:
        return None
    ordered = sorted(values)
    n = len(ordered)

    def at(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * n) - 1)] * 1e3, 3)

    return {
        "count": n,
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "max": round(ordered[-1] * 1e3, 3),
        "mean": round(sum(ordered) / n * 1e3, 3),
    }


def merge(parts: Sequence[dict[str, Any]], requested: int, rate: float) -> dict[str, Any]:
    """One storm's figures from its parts' raw timings (latencies pooled, rates over the
    global first start and last ready, errors summed)."""
    starts: list[float] = []
    handshakes: list[float] = []
    heads: list[float] = []
    readies: list[float] = []
    late: list[float] = []
    errors: Counter[str] = Counter()
    closed: Counter[str] = Counter()
    generator = []
    for p in parts:
        for start, head, ready in zip(p["start"], p["head"], p["ready"], strict=True):
            if not start:
                continue
            starts.append(start)
            if head:
                heads.append(head - start)
            if ready:
                readies.append(ready)
                handshakes.append(ready - start)
        late += p["late"]
        errors.update(p["errors"])
        closed.update(p["closed_during_hold"])
        window = p["done"] - p["go"]
        generator.append(round(100 * p["cpu_s"] / window, 1) if window > 0 else None)
    connected = len(readies)
    first = min(starts) if starts else 0.0
    offered_over = max(starts) - first if starts else 0.0
    admitted_over = max(readies) - first if readies else 0.0
    go = min((p["go"] for p in parts), default=0.0)
    done = max((p["done"] for p in parts), default=0.0)
    busiest = max((g for g in generator if g is not None), default=None)
    return {
        "requested": requested,
        "rate_offered_target": rate,
        "attempted": len(starts),
        "connected": connected,
        "failed": sum(errors.values()),
        "errors": dict(errors),
        "offered_per_s": round((len(starts) - 1) / offered_over, 1) if offered_over > 0 else None,
        "admitted_per_s": round(connected / admitted_over, 1) if admitted_over > 0 else None,
        "admitted_seconds": round(admitted_over, 3),
        "handshake_ms": quantiles_ms(handshakes),
        "head_ms": quantiles_ms(heads),
        "start_late_ms": quantiles_ms(late),
        "window": [go, done],
        "seconds": round(done - go, 3),
        "procs": len(parts),
        "generator_cpu_pct": generator,
        "generator_cpu_max": busiest,
        "generator_busy": busiest is not None and busiest >= GENERATOR_BUSY_PCT,
        "closed_during_hold": dict(closed),
    }


# Server (and aux) CPU seconds: over the connects, and from their end until
# the server settled after the clients closed (the hold included).
Cpu = dict[str, float | None]


def add_server(storm: dict[str, Any], cpu: Cpu) -> dict[str, Any]:
    """Server (and aux) CPU over the storm, per connect and as % of a core,
    and per connection over its close."""
    connected, seconds = storm["connected"], storm["seconds"]
    for key in ("server", "aux"):
        used, closing = cpu.get(key), cpu.get(f"{key}_close")
        storm[key] = {
            "cpu_s": None if used is None else round(used, 3),
            "cpu_pct": round(100 * used / seconds, 1) if used is not None and seconds > 0 else None,
            "us_per_connect": round(used / connected * 1e6, 1) if used is not None and connected else None,
            "us_per_close": round(closing / connected * 1e6, 1) if closing is not None and connected else None,
        }
    return storm


# -- one process, or a parent and its children --------------------------------


async def run(cfg: Config) -> dict[str, Any]:
    """The whole storm, as this process's role says (``--child``, ``--procs``)."""
    result: dict[str, Any] = {"config": cfg.public()}
    try:
        async with asyncio.timeout(cfg.max_seconds):
            if cfg.child is not None:
                return await _child(cfg)
            server, aux = ProcGroup(list(cfg.server_pids)), ProcGroup(list(cfg.aux_pids))
            parts, cpu = await (_parent(cfg, server, aux) if cfg.procs > 1 else _single(cfg, server, aux))
    except TimeoutError:
        result["aborted"] = "deadline (--max-seconds)"
        log("deadline reached: stopping")
        return result
    except (RuntimeError, OSError) as exc:  # a storm process that failed
        result["aborted"] = f"error: {exc!r}"
        log(f"stopping on error: {exc!r}")
        return result
    storm = add_server(merge(parts, cfg.conns, cfg.connect_rate), cpu)
    result["storm"] = storm
    result["summary"] = {"mode": "storm", "admitted_per_s": storm["admitted_per_s"], "stopped": "storm done"}
    for line in report.storm_lines(storm):
        out(line)
    return result


def _cpu(group: ProcGroup) -> float | None:
    return group.cpu() if group else None


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


async def _single(cfg: Config, server: ProcGroup, aux: ProcGroup) -> tuple[list[dict[str, Any]], Cpu]:
    log(f"storm: {cfg.conns} {cfg.transport} connects at {cfg.connect_rate:g}/s to {cfg.url}")
    part = Part(cfg, 0)
    go = time.monotonic() + START_DELAY
    cpu: Cpu = {}
    at_done: Cpu = {}

    def done() -> None:
        at_done.update(server=_cpu(server), aux=_cpu(aux))
        cpu["server"], cpu["aux"] = _minus(at_done["server"], cpu["server"]), _minus(at_done["aux"], cpu["aux"])

    async def sample_at_go() -> None:
        await asyncio.sleep(max(0.0, go - time.monotonic()))
        cpu["server"], cpu["aux"] = _cpu(server), _cpu(aux)

    sampler = asyncio.get_running_loop().create_task(sample_at_go())
    record = await part.run(go, done)
    await sampler
    await _closing_cpu(cpu, at_done, server, aux)
    return [record], cpu


async def _closing_cpu(cpu: Cpu, at_done: Cpu, server: ProcGroup, aux: ProcGroup) -> None:
    """Once the clients closed: the CPU since the connects were done, after the settle."""
    await asyncio.sleep(CLOSE_SETTLE)
    cpu["server_close"], cpu["aux_close"] = _minus(_cpu(server), at_done["server"]), _minus(_cpu(aux), at_done["aux"])


async def _child(cfg: Config) -> dict[str, Any]:
    """One part: READY once its clients and tokens exist, then GO <time> from the
    parent on stdin, DONE on stdout once its connects are over; raw timings to --json."""
    assert cfg.child is not None and cfg.json_path
    part = Part(cfg, cfg.child)
    print("READY", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    word, _, when = line.partition(" ")
    if word != "GO":
        raise SystemExit(f"storm part {cfg.child}: expected GO from the parent, got {line!r}")
    record = await part.run(float(when), lambda: print("DONE", flush=True))
    report.write_json(cfg.json_path, record)
    return {"part": record["part"]}


async def _parent(cfg: Config, server: ProcGroup, aux: ProcGroup) -> tuple[list[dict[str, Any]], Cpu]:
    log(f"storm: {cfg.conns} {cfg.transport} connects at {cfg.connect_rate:g}/s over {cfg.procs} processes")
    folder = tempfile.mkdtemp(prefix="herald-storm-")
    paths = [os.path.join(folder, f"part-{j}.json") for j in range(cfg.procs)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    children = []
    try:
        for j, path in enumerate(paths):
            children.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "ops.loadtest",
                    *child_argv(cfg, j, path),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    env=env,
                )
            )
        await _expect(children, b"READY")
        go = time.monotonic() + START_DELAY
        for child in children:
            assert child.stdin is not None
            child.stdin.write(f"GO {go!r}\n".encode())
            await child.stdin.drain()
        await asyncio.sleep(max(0.0, go - time.monotonic()))
        server0, aux0 = _cpu(server), _cpu(aux)
        await _expect(children, b"DONE")
        at_done: Cpu = {"server": _cpu(server), "aux": _cpu(aux)}
        cpu: Cpu = {"server": _minus(at_done["server"], server0), "aux": _minus(at_done["aux"], aux0)}
        codes = [await child.wait() for child in children]
        if any(codes):
            raise RuntimeError(f"storm processes exited with {codes}")
        await _closing_cpu(cpu, at_done, server, aux)
        parts = [json.loads(Path(path).read_text()) for path in paths]
    finally:
        for child in children:
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                await child.wait()
        for path in paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(folder)
    return parts, cpu


async def _expect(children: Sequence[asyncio.subprocess.Process], word: bytes) -> None:
    for j, child in enumerate(children):
        assert child.stdout is not None
        line = (await child.stdout.readline()).strip()
        if line != word:
            raise RuntimeError(f"storm process {j}: expected {word.decode()}, got {line[:80]!r}")
