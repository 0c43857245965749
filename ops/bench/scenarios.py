"""The standard scenarios and the load-tool command line for each."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

from .servers import Target

FULL_RATES = (100, 200, 500, 1000, 2000)
QUICK_RATES = (100, 200, 500)
MAX_P99_MS = 100.0
PAYLOAD_BYTES = 100


@dataclass(frozen=True)
class Scenario:
    name: str
    transport: str  # ws | sse
    conns: int
    rooms: int
    rates: tuple[int, ...] = ()
    stall_fraction: float = 0.0
    idle_seconds: float = 0.0
    servers: tuple[str, ...] = ("herald", "naive", "nchan")
    step_seconds: float = 10.0
    warmup: float = 2.0
    settle: float = 2.0
    connect_rate: int = 1000
    about: str = ""

    @property
    def idle(self) -> bool:
        return self.idle_seconds > 0

    def budget(self) -> float:
        """Seconds the load tool may take: connecting, every step, the idle wait, closing."""
        steps = len(self.rates) * (self.step_seconds + self.warmup + self.settle)
        return self.conns / max(self.connect_rate, 1) * 2 + steps + self.idle_seconds + 60


def standard(quick: bool) -> list[Scenario]:
    """The scenarios of `make bench`, in run order. ``quick``: seconds per step, fewer conns."""
    step, warmup, settle = (3.0, 1.0, 1.0) if quick else (10.0, 2.0, 2.0)
    fan, bcast, idle = (200, 400, 1000) if quick else (1000, 2000, 10000)
    rates: tuple[int, ...] = QUICK_RATES if quick else FULL_RATES
    brates: tuple[int, ...] = (20, 50, 100) if quick else (20, 50, 100, 200, 500, 1000)
    idle_s = 3.0 if quick else 15.0
    fanout = Scenario(
        "fanout-ws",
        "ws",
        fan,
        10,
        rates,
        about=f"{fan} WebSocket conns over 10 rooms; publish rate stepped up until deliveries fall behind "
        f"or p99 > {MAX_P99_MS:g} ms",
        step_seconds=step,
        warmup=warmup,
        settle=settle,
    )
    idle_ws = Scenario(
        "idle",
        "ws",
        idle,
        10,
        idle_seconds=idle_s,
        connect_rate=1000 if quick else 500,
        about=f"{idle} idle WebSocket conns: (RSS with - RSS without) / conns",
    )
    return [
        fanout,
        replace(fanout, name="fanout-sse", transport="sse", about=fanout.about.replace("WebSocket", "SSE")),
        Scenario(
            "broadcast",
            "ws",
            bcast,
            1,
            brates,
            servers=("herald", "naive"),
            about=f"{bcast} WebSocket conns in one room",
            step_seconds=step,
            warmup=warmup,
            settle=settle,
        ),
        idle_ws,
        replace(
            idle_ws,
            name="idle-sse",
            transport="sse",
            about=f"{idle} idle SSE streams: (RSS with - RSS without) / conns",
        ),
        replace(
            fanout,
            name="stalled",
            stall_fraction=0.01,
            servers=("herald", "naive"),
            about="fanout-ws with 1% of clients that stop reading; compared with the clean fanout-ws run",
        ),
        replace(
            fanout,
            name="workers",
            servers=("herald-w1", "herald-w2"),
            rates=(*rates, 3000, 5000) if not quick else rates,
            about="fanout-ws against serve --workers 1 and --workers 2, all on cores 0,1 (generator too)",
        ),
    ]


SCENARIO_NAMES = tuple(s.name for s in standard(quick=True))


def loadtest_command(
    scenario: Scenario, target: Target, json_path: str, cores: str | None, max_p99_ms: float = MAX_P99_MS
) -> list[str]:
    """``python -m ops.loadtest …`` for one scenario against one target."""
    url = target.ws_url if scenario.transport == "ws" else target.sse_url
    cmd = [
        sys.executable,
        "-m",
        "ops.loadtest",
        "--transport",
        scenario.transport,
        "--url",
        url,
        "--conns",
        str(scenario.conns),
        "--rooms",
        str(scenario.rooms),
        "--connect-rate",
        str(scenario.connect_rate),
        "--envelope",
        target.envelope,
        *target.publish_args,
        "--payload-bytes",
        str(PAYLOAD_BYTES),
        "--json",
        json_path,
        "--max-seconds",
        str(int(scenario.budget())),
    ]
    if target.jwt_secret:
        cmd += ["--jwt-secret", target.jwt_secret]
    if scenario.idle:
        cmd += ["--idle", f"{scenario.idle_seconds:g}"]
    else:
        cmd += [
            "--rates",
            ",".join(str(r) for r in scenario.rates),
            "--step-seconds",
            f"{scenario.step_seconds:g}",
            "--warmup",
            f"{scenario.warmup:g}",
            "--settle",
            f"{scenario.settle:g}",
            "--max-p99-ms",
            f"{max_p99_ms:g}",
        ]
    if scenario.stall_fraction:
        cmd += ["--stall-fraction", f"{scenario.stall_fraction:g}"]
    for pid in target.server_pids:
        cmd += ["--server-pid", str(pid)]
    for pid in target.aux_pids:
        cmd += ["--aux-pid", str(pid)]
    return ["taskset", "-c", cores, *cmd] if cores else cmd
