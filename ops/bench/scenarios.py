"""The standard scenarios and the load-tool command line for each."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

from .servers import Target

FULL_RATES = (100, 200, 500, 1000, 2000)
QUICK_RATES = (100, 200, 500)
MAX_P99_MS = 100.0
PAYLOAD_BYTES = 100
PUBLISH_RATES = (500, 2000)  # publish-api: offered HTTP publishes/s, no receivers
BATCH_RATES = (2000, 10000)  # publish-api-batch: messages/s, in requests of BATCH messages
BATCH = 100
HEADLINE_MAX = 500  # the highest rate of the headline figures (µs per delivery and p99 at 200 and 500)
# Herald rate-limits POST /api/publish per key (limits.api_rate, 1,000/s by default): lifted where
# the publish API is what is measured or what publishes.
UNLIMITED_API = (("HERALD_LIMITS_API_RATE", "1000000"),)
# Selecting one of these also selects the others of its group (the parts of one figure).
GROUPS = {
    "stalled": ("fanout-ws",),
    "publish-api": ("publish-api-batch", "fanout-ws-http"),
    "connect-storm-sse": ("connect-storm-sse-10k",),
}


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
    publish: str = "native"  # native: what the server's row in the table says; http: Herald too via /api/publish
    batch: int = 1  # messages per publish request (Herald's JSON array)
    storm: bool = False  # connect only: conns offered at connect_rate, handshake times
    hold: float = 2.0  # storm: seconds the connections are held before closing
    procs: int = 1  # storm: generator processes the connects are split over
    connect_timeout: float = 10.0  # storm: 30 s, so that a slow admission is measured, not cut off
    herald_env: tuple[tuple[str, str], ...] = ()  # HERALD_* for this scenario's node
    measure_up_to: int = 0  # steps up to this rate run even after one failed (their figures are the headline)

    @property
    def idle(self) -> bool:
        return self.idle_seconds > 0

    def budget(self) -> float:
        """Seconds the load tool may take: connecting, every step, the idle wait, closing."""
        steps = len(self.rates) * (self.step_seconds + self.warmup + self.settle)
        connecting = self.conns / max(self.connect_rate, 1) * (1 if self.storm else 2)
        storm = self.hold + self.connect_timeout + 5 if self.storm else 0
        return connecting + steps + self.idle_seconds + storm + 60


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
        *new_scenarios(quick, fanout),
        replace(
            fanout,
            name="workers",
            servers=("herald-w1", "herald-w2"),
            rates=(*rates, 3000, 5000) if not quick else rates,
            about="fanout-ws against serve --workers 1 and --workers 2, all on cores 0,1 (generator too)",
        ),
    ]


def new_scenarios(quick: bool, fanout: Scenario) -> list[Scenario]:
    """Issue 20: the publish API, connect storms, fan-out published over HTTP."""
    step, warmup, settle = (3.0, 1.0, 1.0) if quick else (10.0, 1.0, 1.0)
    storm, storm_rate = (1000, 2000) if quick else (5000, 5000)
    slow, slow_rate = (2000, 1000) if quick else (10_000, 2000)
    publish = Scenario(
        "publish-api",
        "ws",
        0,
        10,
        PUBLISH_RATES,
        servers=("herald", "nchan"),
        step_seconds=step,
        warmup=warmup,
        settle=settle,
        publish="http",
        herald_env=UNLIMITED_API,
        measure_up_to=max(PUBLISH_RATES),
        about="HTTP publishes at a fixed rate, no receivers (Herald: POST /api/publish; nchan: POST /pub/<room>), "
        "10 keep-alive connections: server CPU per publish",
    )
    storm_ws = Scenario(
        "connect-storm-ws",
        "ws",
        storm,
        10,
        connect_rate=storm_rate,
        storm=True,
        connect_timeout=30.0,
        about=f"{storm:,} WebSocket connects offered at {storm_rate:,}/s, each its own user, over 10 rooms: "
        "admitted/s, handshake latency, server CPU per connect",
    )
    return [
        publish,
        replace(
            publish,
            name="publish-api-batch",
            rates=BATCH_RATES,
            batch=BATCH,
            measure_up_to=max(BATCH_RATES),
            servers=("herald",),
            about=f"POST /api/publish with batches of {BATCH} messages (a JSON array), no receivers: "
            "server CPU per message",
        ),
        replace(
            fanout,
            name="fanout-ws-http",
            servers=("herald", "nchan", "floor"),
            publish="http",
            herald_env=UNLIMITED_API,
            measure_up_to=HEADLINE_MAX,
            about=fanout.about + "; Herald publishes through POST /api/publish",
        ),
        replace(
            fanout,
            name="fanout-sse-http",
            transport="sse",
            servers=("herald", "nchan", "floor"),
            publish="http",
            herald_env=UNLIMITED_API,
            measure_up_to=HEADLINE_MAX,
            about=fanout.about.replace("WebSocket", "SSE") + "; Herald publishes through POST /api/publish",
        ),
        storm_ws,
        replace(
            storm_ws,
            name="connect-storm-sse",
            transport="sse",
            about=storm_ws.about.replace("WebSocket", "SSE"),
        ),
        replace(
            storm_ws,
            name="connect-storm-sse-10k",
            transport="sse",
            conns=slow,
            connect_rate=slow_rate,
            about=f"{slow:,} SSE connects offered at {slow_rate:,}/s, each its own user, over 10 rooms",
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
        "--json",
        json_path,
        "--max-seconds",
        str(int(scenario.budget())),
    ]
    if target.jwt_secret:
        cmd += ["--jwt-secret", target.jwt_secret]
    if not scenario.storm:
        cmd += target.http_publish_args if scenario.publish == "http" else target.publish_args
        cmd += ["--payload-bytes", str(PAYLOAD_BYTES)]
    if scenario.batch > 1:
        cmd += ["--publish-batch", str(scenario.batch)]
    if scenario.storm:
        cmd += ["--storm", "--hold", f"{scenario.hold:g}", "--procs", str(scenario.procs)]
        cmd += ["--connect-timeout", f"{scenario.connect_timeout:g}"]
    elif scenario.idle:
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
    if scenario.measure_up_to and not scenario.storm and not scenario.idle:
        cmd += ["--measure-up-to", str(scenario.measure_up_to)]
    if scenario.stall_fraction:
        cmd += ["--stall-fraction", f"{scenario.stall_fraction:g}"]
    for pid in target.server_pids:
        cmd += ["--server-pid", str(pid)]
    for pid in target.aux_pids:
        cmd += ["--aux-pid", str(pid)]
    return ["taskset", "-c", cores, *cmd] if cores else cmd
