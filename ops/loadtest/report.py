"""The readable side of results: one table row per step, a connect line, the
idle and stalled summaries. The JSON file carries the same numbers in full."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

Row = dict[str, Any]


def log(line: str) -> None:
    """Progress and problems: stderr."""
    print(line, file=sys.stderr, flush=True)


def out(line: str) -> None:
    """Results (the table and summaries): stdout."""
    print(line, flush=True)


def write_json(path: str, result: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


_COLUMNS: list[tuple[str, int, Callable[[Row], str]]] = [
    ("rate/s", 8, lambda r: _num(r["rate"])),
    ("pub/s", 8, lambda r: _num(r["published_per_s"])),
    ("expected", 10, lambda r: _num(r["expected"])),
    ("delivered", 10, lambda r: _num(r["delivered"])),
    ("deliv/s", 9, lambda r: _num(r["delivered_per_s"])),
    ("lost", 7, lambda r: _num(r["lost"])),
    ("dup", 5, lambda r: _num(r["duplicated"])),
    ("p50", 7, lambda r: _num(r["latency_ms"]["p50"], 1)),
    ("p90", 7, lambda r: _num(r["latency_ms"]["p90"], 1)),
    ("p99", 7, lambda r: _num(r["latency_ms"]["p99"], 1)),
    ("max ms", 7, lambda r: _num(r["latency_ms"]["max"], 1)),
    ("srv%", 6, lambda r: _num(r["server"]["cpu_pct"])),
    ("µs/msg", 7, lambda r: _num(r["server"]["us_per_delivery"], 1)),
    ("RSS MB", 7, lambda r: _num(r["server"]["rss_mb"])),
    ("aux%", 5, lambda r: _num(r["aux"]["cpu_pct"])),
    ("gen%", 5, lambda r: _num(r["generator_cpu_pct"])),
    ("closed", 6, lambda r: _num(sum(r["closed_by_server"].values()))),
    ("verdict", 0, lambda r: r["verdict"]),
]


def header() -> str:
    return " ".join(f"{name:>{width}}" if width else name for name, width, _ in _COLUMNS)


def row(step: Row) -> str:
    line = " ".join(f"{get(step):>{width}}" if width else get(step) for _, width, get in _COLUMNS)
    notes = []
    if step["closed_by_server"]:
        notes.append("closed by server: " + _counts(step["closed_by_server"]))
    if step["publish_errors"]:
        notes.append("publish errors: " + _counts(step["publish_errors"]))
    notes.extend(step["notes"])
    return line + "".join(f"\n    {note}" for note in notes)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} x{n}" for key, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def connect_line(c: Row) -> str:
    errors = f", errors: {_counts(c['errors'])}" if c["errors"] else ""
    return (
        f"connected {c['connected']}/{c['requested']} in {c['seconds']:.2f}s "
        f"({c['rate_achieved']:,.0f}/s achieved, {c['rate_target']:,.0f}/s asked; "
        f"CPU server {_num(c['server_cpu_pct'])}%, generator {_num(c['generator_cpu_pct'])}%){errors}"
    )


def idle_lines(idle: Row) -> list[str]:
    return [
        f"idle {idle['seconds']:.0f}s with {idle['connections']} connections "
        f"({idle['still_open']} still open at the end)",
        f"  server RSS before connecting {_num(idle['rss_before_mb'], 1)} MB, with connections "
        f"{_num(idle['rss_with_mb'], 1)} MB (peak {_num(idle['rss_peak_mb'], 1)} MB) "
        f"→ {_num(idle['kib_per_connection'], 1)} KiB per connection",
        f"  server CPU while idle {_num(idle['server_cpu_pct'], 1)}% of a core, "
        f"generator {_num(idle['generator_cpu_pct'], 1)}%",
    ]


def stalled_lines(stalled: Row) -> list[str]:
    how = _counts(stalled["how"]) if stalled["how"] else "none"
    return [
        f"stalled connections: {stalled['count']} (excluded from the table), "
        f"disconnected by the server: {stalled['disconnected']} ({how}), still open: {stalled['still_open']}"
    ]


def summary_line(summary: Row) -> str:
    if summary.get("mode") == "storm":
        return f"storm: {_num(summary['admitted_per_s'])} connects admitted per second"
    if summary.get("mode") == "idle":
        return f"idle: {_num(summary['kib_per_connection'], 1)} KiB of server RSS per connection"
    best = summary.get("highest_sustained")
    if best is None:
        return f"no step was sustained ({summary['stopped']})"
    return (
        f"highest sustained rate: {best['rate']:,.0f} msg/s published → "
        f"{best['delivered_per_s']:,.0f} deliveries/s "
        f"(p99 {best['p99_ms']:.1f} ms, server {_num(best['us_per_delivery'], 1)} µs/delivery); "
        f"stopped: {summary['stopped']}"
    )


def _ms(q: Row | None) -> str:
    if not q:
        return "-"
    return f"p50 {q['p50']:,.1f} / p90 {q['p90']:,.1f} / p99 {q['p99']:,.1f} / max {q['max']:,.1f} ms"


def storm_lines(s: Row) -> list[str]:
    server, aux = s.get("server") or {}, s.get("aux") or {}
    gens = ", ".join(_num(g) + "%" for g in s["generator_cpu_pct"])
    lines = [
        f"storm: {s['attempted']:,}/{s['requested']:,} connects offered at {s['rate_offered_target']:,.0f}/s "
        f"({_num(s['offered_per_s'])}/s achieved; start lag p99 "
        f"{_num((s['start_late_ms'] or {}).get('p99'), 1)} ms) by {s['procs']} process(es)",
        f"  connected {s['connected']:,}, failed {s['failed']:,} → admitted {_num(s['admitted_per_s'])}/s "
        f"(over {s['admitted_seconds']:.2f}s from the first start to the last ready)",
        f"  start → ready: {_ms(s['handshake_ms'])}",
        f"  start → response head: {_ms(s['head_ms'])}",
        f"  server CPU {_num(server.get('cpu_pct'))}% of a core → {_num(server.get('us_per_connect'))} µs per connect"
        + (
            f"; aux {_num(aux.get('cpu_pct'))}% ({_num(aux.get('us_per_connect'))} µs per connect)"
            if aux.get("cpu_s") is not None
            else ""
        ),
        f"  closing: server CPU {_num(server.get('us_per_close'))} µs per connection (the hold, the closes, "
        "until the server settled)",
        f"  generator CPU {gens} (per process, % of a core)",
    ]
    if s["generator_busy"]:
        lines.append(f"  generator at {_num(s['generator_cpu_max'])}% of a core: it may be the limit (try --procs)")
    if s["errors"]:
        lines.append("  errors: " + _counts(s["errors"]))
    if s["closed_during_hold"]:
        lines.append("  closed by the server during the hold: " + _counts(s["closed_during_hold"]))
    return lines
