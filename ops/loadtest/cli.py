"""Command line → a validated, frozen Config. Defaults fit Herald on 127.0.0.1:8080."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any

from . import payload
from .target import UnsafeTarget, expand, loopback_url

DEFAULT_URLS = {
    "ws": "ws://127.0.0.1:8080/ws?token={token}&room={room}",
    "sse": "http://127.0.0.1:8080/sse?token={token}&room={room}",
}
# Bounds that keep any run finite whatever is typed.
MAX_CONNS = 60_000
MAX_RATE = 1_000_000.0
MAX_SECONDS = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Config:
    transport: str
    url: str
    jwt_secret: str | None
    conns: int
    rooms: int
    connect_rate: float
    connect_timeout: float
    envelope: str
    publish_nats: str | None
    subject: str
    publish_url: str | None
    publish_headers: tuple[tuple[str, str], ...]
    publish_body: str
    publish_batch: int
    payload_bytes: int
    rates: tuple[float, ...]
    step_seconds: float
    warmup: float
    settle: float
    max_p99_ms: float
    measure_up_to: float
    stall_fraction: float
    stall_rcvbuf: int
    idle: float | None
    server_pids: tuple[int, ...]
    aux_pids: tuple[int, ...]
    json_path: str | None
    max_seconds: float
    storm: bool = False
    hold: float = 1.0
    procs: int = 1
    child: int | None = None  # internal: this process is part ``child`` of ``procs`` (storm)

    def stalls(self, index: int) -> bool:
        """Every round(1/F)-th connection stalls."""
        if self.stall_fraction <= 0:
            return False
        every = max(1, round(1 / self.stall_fraction))
        return index % every == every - 1

    def public(self) -> dict[str, Any]:
        """For the JSON report: everything but secrets."""
        out = asdict(self)
        out["jwt_secret"] = "***" if self.jwt_secret else None
        out["publish_headers"] = [name for name, _ in self.publish_headers]
        return out


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not rates or any(not 0 < r <= MAX_RATE for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be in (0, {MAX_RATE:.0f}]")
    return rates


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not the empty ones (None, [])."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default == []:
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ops.loadtest",
        description="Push-gateway load generator: many WS/SSE receivers, paced publishing, stepped rates. "
        "Loopback targets only.",
        formatter_class=_Formatter,
    )
    a = p.add_argument
    a("--transport", choices=("ws", "sse"), default="ws")
    a("--url", help="connection URL template with {room}, {token}, {i} (default: Herald's /ws or /sse on :8080)")
    a("--jwt-secret", help="mint an HS256 token per connection (user u{i}, all rooms) with this secret")
    a("--conns", type=int, default=1000, help="connections (0: publish only, to measure the publish path)")
    a("--rooms", type=int, default=10, help="rooms r0..r{K-1}; connection i joins room i %% K")
    a("--connect-rate", type=float, default=1000.0, help="new connections per second")
    a("--connect-timeout", type=float, default=10.0, help="seconds for one connection to become ready")
    a("--envelope", choices=("herald", "raw"), default="herald", help="where the payload sits in a message")
    a("--publish", metavar="NATS_URL", help="core NATS publishing (default nats://127.0.0.1:4222)")
    a("--subject", default="herald.room.{room}", help="NATS subject template")
    a("--publish-url", help="HTTP POST publishing instead of NATS, URL template with {room}")
    a("--publish-header", action="append", type=_header, default=[], help="'Name: value' (repeatable)")
    a("--publish-body", choices=("raw", "herald"), default="raw", help='herald: {"channel":"room:…","data":…}')
    a("--publish-batch", type=int, default=1, help="messages per request (JSON array; --publish-body herald)")
    a("--payload-bytes", type=int, default=100, help="size of each payload")
    a("--rates", type=_rates, default="100,200,500,1000,2000", help="published msgs/s per step")
    a("--step-seconds", type=float, default=10.0)
    a("--warmup", type=float, default=2.0, help="seconds between connecting and the first step")
    a("--settle", type=float, default=2.0, help="seconds after each step to collect stragglers")
    a("--max-p99-ms", type=float, default=100.0, help="stop stepping past this p99 latency")
    a(
        "--measure-up-to",
        type=float,
        default=0.0,
        metavar="RATE",
        help="steps at or below this rate run even after one fell behind (their figures are wanted)",
    )
    a("--stall-fraction", type=float, default=0.0, help="fraction of connections that stop reading")
    a("--stall-rcvbuf", type=int, default=4096, help="SO_RCVBUF of stalling connections")
    a("--idle", type=float, metavar="SECONDS", help="publish nothing: hold connections and sample server RSS")
    a("--server-pid", type=int, action="append", default=[], help="server process to measure (repeatable, summed)")
    a("--aux-pid", type=int, action="append", default=[], help="helper process to measure, e.g. nats-server")
    a(
        "--storm",
        action="store_true",
        help="connect only: --conns connects offered at --connect-rate, handshake times, then close",
    )
    a("--hold", type=float, default=1.0, help="--storm: seconds to hold the connections before closing them")
    a("--procs", type=int, default=1, help="--storm: split the offered connects over this many processes")
    a("--child", type=int, help=argparse.SUPPRESS)
    a("--json", dest="json_path", metavar="PATH", help="write all results here")
    a("--max-seconds", type=float, default=600.0, help="hard deadline for the whole run")
    return p


def config(argv: list[str] | None = None) -> Config:
    p = parser()
    args = p.parse_args(argv)
    problems = []
    if not 0 <= args.conns <= MAX_CONNS:
        problems.append(f"--conns must be 0..{MAX_CONNS}")
    if args.conns == 0 and (args.idle is not None or args.storm or args.stall_fraction):
        problems.append("--conns 0 (publish only) goes with neither --idle, --storm nor --stall-fraction")
    if args.storm and args.conns == 0:
        problems.append("--storm needs --conns")
    if args.storm and args.idle is not None:
        problems.append("choose one of --storm and --idle")
    if not 1 <= args.procs <= 16:
        problems.append("--procs must be 1..16")
    if args.procs > 1 and not args.storm:
        problems.append("--procs only splits a --storm")
    if args.child is not None and not 0 <= args.child < args.procs:
        problems.append("--child must be in 0..procs-1")
    if args.hold < 0:
        problems.append("--hold must not be negative")
    if not 1 <= args.publish_batch <= 1000:
        problems.append("--publish-batch must be 1..1000")
    if args.publish_batch > 1 and not (args.publish_url and args.publish_body == "herald"):
        problems.append("--publish-batch needs --publish-url and --publish-body herald (a JSON array of messages)")
    if not 1 <= args.rooms <= 100_000:
        problems.append("--rooms must be 1..100000")
    if args.connect_rate <= 0 or args.connect_timeout <= 0:
        problems.append("--connect-rate and --connect-timeout must be positive")
    if not 0 <= args.stall_fraction < 1:
        problems.append("--stall-fraction must be in [0, 1)")
    if not payload.MIN_BYTES <= args.payload_bytes <= 1_000_000:
        problems.append(f"--payload-bytes must be {payload.MIN_BYTES}..1000000")
    if not 0 < args.max_seconds <= MAX_SECONDS:
        problems.append(f"--max-seconds must be in (0, {MAX_SECONDS:.0f}]")
    if args.step_seconds <= 0 or args.warmup < 0 or args.settle < 0:
        problems.append("--step-seconds must be positive, --warmup and --settle not negative")
    if args.idle is not None and not 0 < args.idle <= MAX_SECONDS:
        problems.append("--idle must be positive")
    if args.publish and args.publish_url:
        problems.append("choose one of --publish (NATS) and --publish-url (HTTP)")
    url = args.url or DEFAULT_URLS[args.transport]
    nats_url = None if args.publish_url else (args.publish or "nats://127.0.0.1:4222")
    try:
        loopback_url(expand(url), ("ws", "http") if args.transport == "ws" else ("http",))
        if nats_url:
            loopback_url(nats_url, ("nats",))
        if args.publish_url:
            loopback_url(expand(args.publish_url), ("http",))
    except UnsafeTarget as exc:
        problems.append(str(exc))
    if problems:
        p.error("; ".join(problems))
    return Config(
        transport=args.transport,
        url=url,
        jwt_secret=args.jwt_secret,
        conns=args.conns,
        rooms=args.rooms,
        connect_rate=args.connect_rate,
        connect_timeout=args.connect_timeout,
        envelope=args.envelope,
        publish_nats=nats_url,
        subject=args.subject,
        publish_url=args.publish_url,
        publish_headers=tuple(args.publish_header),
        publish_body=args.publish_body,
        publish_batch=args.publish_batch,
        payload_bytes=args.payload_bytes,
        rates=args.rates,
        step_seconds=args.step_seconds,
        warmup=args.warmup,
        settle=args.settle,
        max_p99_ms=args.max_p99_ms,
        measure_up_to=args.measure_up_to,
        stall_fraction=args.stall_fraction,
        stall_rcvbuf=args.stall_rcvbuf,
        idle=args.idle,
        server_pids=tuple(args.server_pid),
        aux_pids=tuple(args.aux_pid),
        json_path=args.json_path,
        max_seconds=args.max_seconds,
        storm=args.storm,
        hold=args.hold,
        procs=args.procs,
        child=args.child,
    )
