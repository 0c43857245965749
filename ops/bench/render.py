"""The bench's summary (``report.summarize``) as Markdown: the tables of
``summary.md``."""

from __future__ import annotations

from .costs import publish_section, storm_section
from .report import IDLE, P99_FLOOR_MS, STALL_TOLERANCE
from .tables import Doc, at, fmt, get, section


def _rate_rows(figures: dict[str, dict[str, Doc]]) -> list[list[str]]:
    rows = []
    for scenario, per in figures.items():
        for server, fig in per.items():
            if "steps" not in fig or fig.get("kind") or scenario in ("stalled", "workers"):
                continue
            half = fig.get("half_saturation") or {}
            rows.append(
                [
                    scenario,
                    server,
                    at(fig, 200),
                    at(fig, 500),
                    at(fig, 500, "kernel_us_per_delivery"),
                    at(fig, 200, "us_per_delivery_with_aux"),
                    at(fig, 500, "p99_ms"),
                    fmt(fig.get("saturation_rate"), 0),
                    fmt(fig.get("max_delivered_per_s"), 0),
                    f"{fmt(half.get('p50_ms'))} / {fmt(half.get('p99_ms'))} @ {fmt(half.get('rate'), 0)}",
                    f"{fig.get('lost', 0)} / {fig.get('duplicated', 0)}",
                    fmt(fig.get("generator_cpu_max"), 0, "%"),
                    fmt(fig.get("other_cpu_pct"), 0, "%"),
                    str(fig.get("limit") or fig.get("aborted") or "-"),
                ]
            )
    return rows


def markdown(summary: Doc) -> str:
    meta = summary.get("meta", {})
    figures: dict[str, dict[str, Doc]] = summary.get("figures", {})
    out = [
        "# Herald benchmark" + (" (quick: smoke test, not figures to quote)" if meta.get("quick") else ""),
        "",
        f"{meta.get('started', '?')} on {meta.get('host', '?')}, {meta.get('cpus', '?')} CPUs, "
        f"Python {meta.get('python', '?')}. Servers pinned to core {get(meta, 'pinning', 'server')}, "
        f"generator (and Herald's nats-server) to core {get(meta, 'pinning', 'generator')}. "
        f"A step is sustained when ≥ 95% of expected deliveries arrive and p99 ≤ {meta.get('max_p99_ms', 100):g} ms.",
        "",
    ]
    out += _throughput_section(figures)
    out += publish_section(figures)
    out += storm_section(figures)
    out += _idle_section(figures)
    out += _ratio_section(summary.get("ratios", {}))
    out += _stalled_section(summary.get("stalled", {}))
    out += _workers_section(summary.get("workers"))
    out += _notes_section(meta, summary.get("runs", []))
    return "\n".join(out)


def _throughput_section(figures: dict[str, dict[str, Doc]]) -> list[str]:
    rows = _rate_rows(figures)
    if not rows:
        return []
    return section(
        "Throughput and cost",
        "µs/deliv = µs of server CPU (from /proc) per delivered message at that publish rate "
        "(`*` = that step was not sustained); kernel = the part of it spent in the kernel (stime: "
        "the sockets' system calls and the network stack's work on their way); "
        "`+nats` adds nats-server's CPU (Herald only); "
        "p99 = publish → receive latency. `-http`: Herald publishes through POST /api/publish "
        "as nchan does through /pub (the others: Herald through NATS). "
        "sat = highest sustained publish rate (msgs/s); deliv/s = deliveries/s there. "
        "other CPU = what processes outside the bench used meanwhile (% of a core): above ~10% "
        "the figures are suspect.",
        [
            "scenario",
            "server",
            "µs/deliv @200",
            "µs/deliv @500",
            "kernel @500",
            "+nats @200",
            "p99 ms @500",
            "sat msgs/s",
            "deliv/s",
            "p50 / p99 ms @ half sat",
            "lost / dup",
            "gen CPU max",
            "other CPU",
            "stopped by",
        ],
        rows,
    )


def _idle_section(figures: dict[str, dict[str, Doc]]) -> list[str]:
    idle_rows = [(scenario, server, fig) for scenario in IDLE for server, fig in figures.get(scenario, {}).items()]
    if not idle_rows:
        return []
    return section(
        "Idle connections",
        "idle = WebSocket connections, idle-sse = SSE streams; KiB / conn = (RSS with - RSS before) / conns.",
        [
            "scenario",
            "server",
            "conns",
            "RSS before MB",
            "RSS with MB",
            "KiB / conn",
            "server CPU idle",
            "other CPU",
        ],
        [
            [
                scenario,
                server,
                f"{fig.get('connections')} ({fig.get('still_open')} open at end)",
                fmt(fig.get("rss_before_mb")),
                fmt(fig.get("rss_with_mb")),
                fmt(fig.get("kib_per_conn")),
                fmt(fig.get("server_cpu_pct"), 1, "%"),
                fmt(fig.get("other_cpu_pct"), 0, "%"),
            ]
            for scenario, server, fig in idle_rows
        ],
    )


def _ratio_section(ratios: dict[str, Doc]) -> list[str]:
    if not ratios:
        return []
    ratio_rows = []
    for scenario, per in ratios.items():
        for peer, row in per.items():
            for figure, value in row.items():
                if value is None:
                    continue
                ratio_rows.append([scenario, figure, f"Herald ÷ {peer}", fmt(value, 2)])
    return section(
        "Ratios",
        "Lower is better for µs, p99 and KiB; higher is better for deliveries/s.",
        ["scenario", "figure", "ratio", "value"],
        ratio_rows,
    )


def _stalled_section(stalled: dict[str, Doc]) -> list[str]:
    if not stalled:
        return []
    rows = []
    for server, s in stalled.items():
        for r in s["rates"]:
            rows.append(
                [
                    server,
                    fmt(r["rate"], 0),
                    fmt(r["throughput_ratio"], 2),
                    f"{fmt(r['p99_ms'])} vs {fmt(r['clean_p99_ms'])}",
                    f"{fmt(r['rss_peak_mb'])} vs {fmt(r['clean_rss_peak_mb'])}",
                    "ok" if r["ok"] else f"NO ({', '.join(r['failed'])})",
                ]
            )
        sc = s.get("stalled_clients") or {}
        how = ", ".join(f"{k} x{n}" for k, n in (sc.get("how") or {}).items())
        rows.append(
            [
                server,
                "all",
                f"sat {fmt(s['saturation_rate'], 0)} vs {fmt(s['clean_saturation_rate'], 0)}",
                "",
                "",
                f"stalled clients: {sc.get('count', '?')}, cut off by server: {sc.get('disconnected', '?')} "
                f"({how or 'none'}); other clients closed by server: {s.get('others_closed_by_server')}",
            ]
        )
    return section(
        "Stalled clients (1% stop reading) vs the clean fanout-ws run",
        f"Others' deliveries/s must stay ≥ {1 - STALL_TOLERANCE:.0%} of the clean run and p99 within "
        f"{STALL_TOLERANCE:.0%} (or {P99_FLOOR_MS:g} ms); RSS is the node's peak.",
        ["server", "rate", "deliv/s ÷ clean", "p99 ms", "RSS peak MB", "verdict"],
        rows,
    )


def _workers_section(workers: Doc | None) -> list[str]:
    if not workers:
        return []
    verdict = "met" if workers["meets_target"] else "not met"
    if workers.get("inconclusive"):
        verdict = "inconclusive: both sustained every rate"
    return [
        "## serve --workers 2 vs 1",
        "",
        f"max sustained deliveries/s: {fmt(workers['w2_max_delivered_per_s'], 0)} vs "
        f"{fmt(workers['w1_max_delivered_per_s'], 0)} → {fmt(workers['ratio'], 2)}x "
        f"(target ≥ {workers['target']}x: {verdict}); "
        f"generator CPU up to {fmt(workers['generator_cpu_max'], 0)}%. Note: {workers['note']}.",
        "",
    ]


def _notes_section(meta: Doc, runs: list[Doc]) -> list[str]:
    problems = [r for r in runs if r.get("error") or r.get("skipped") or r.get("notes")]
    notes = list(meta.get("notes") or [])
    if not problems and not notes:
        return []
    out = ["## Notes", "", *(f"- {n}" for n in notes)]
    for r in problems:
        what = r.get("error") or r.get("skipped") or ""
        extra = "; ".join(r.get("notes") or [])
        text = "; ".join(x for x in (what.splitlines()[0] if what else "", extra) if x)
        out.append(f"- {r['scenario']}/{r['server']}: {text}")
    out.append("")
    return out
