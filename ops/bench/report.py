"""From the load tool's JSON files to the figures and the ratios.

Input: one outcome per (scenario, server) as ``run.Outcome.as_dict()`` — the
load tool's ``--json`` document under ``result``. Output: ``summarize`` builds
one JSON-able dict (``render.markdown`` makes its tables).
"""

from __future__ import annotations

from collections.abc import Iterable

from .costs import cost_ratios, publish_figures, storm_figures
from .tables import Doc
from .tables import core_busy as _core_busy
from .tables import get as _get
from .tables import num as _num
from .tables import ratio as _ratio

HEADLINE_RATES = (200, 500)
STALL_TOLERANCE = 0.10  # the issue: within 10 % of the clean run
P99_FLOOR_MS = 1.0  # p99 differences below this are timer noise, not harm
WORKERS_TARGET = 1.7
GENERATOR_BUSY_PCT = 85.0
COMPARED = ("fanout-ws", "fanout-sse", "broadcast", "fanout-ws-http", "fanout-sse-http")
IDLE = ("idle", "idle-sse")  # memory per connection: WebSocket, SSE


def _step_row(step: Doc) -> Doc:
    seconds = _num(step.get("seconds")) or 0.0
    delivered = _num(step.get("delivered")) or 0.0
    us = _num(_get(step, "server", "us_per_delivery"))
    aux_pct = _num(_get(step, "aux", "cpu_pct"))
    us_with_aux = None
    if us is not None and aux_pct is not None and delivered:
        # aux CPU is measured over the publish window only: close enough for a side figure.
        us_with_aux = round(us + aux_pct / 100 * seconds / delivered * 1e6, 2)
    return {
        "rate": step.get("rate"),
        "published_per_s": step.get("published_per_s"),
        "expected": step.get("expected"),
        "delivered": step.get("delivered"),
        "delivered_per_s": step.get("delivered_per_s"),
        "lost": step.get("lost"),
        "duplicated": step.get("duplicated"),
        "p50_ms": _get(step, "latency_ms", "p50"),
        "p99_ms": _get(step, "latency_ms", "p99"),
        "max_ms": _get(step, "latency_ms", "max"),
        "server_cpu_pct": _get(step, "server", "cpu_pct"),
        "us_per_delivery": us,
        "kernel_us_per_delivery": _get(step, "server", "kernel_us_per_delivery"),
        "us_per_delivery_with_aux": us_with_aux,
        "server_rss_mb": _get(step, "server", "rss_mb"),
        "server_rss_peak_mb": _get(step, "server", "rss_peak_mb"),
        "aux_cpu_pct": aux_pct,
        "generator_cpu_pct": step.get("generator_cpu_pct"),
        "closed_by_server": sum((step.get("closed_by_server") or {}).values()),
        "stalled_closed": step.get("stalled_closed") or {},
        "publish_errors": sum((step.get("publish_errors") or {}).values()),
        "us_per_publish": _get(step, "server", "us_per_publish"),
        "aux_us_per_publish": _get(step, "aux", "us_per_publish"),
        "publish_p50_ms": _get(step, "publish", "latency_ms", "p50"),
        "publish_p99_ms": _get(step, "publish", "latency_ms", "p99"),
        "cores_busy_pct": step.get("cores_busy_pct"),
        "verdict": step.get("verdict"),
        "ok": step.get("verdict") == "ok",
    }


def _limit(rows: list[Doc], cores: Doc) -> str | None:
    """What stopped the stepping, with a guess at whose limit it was: process CPU
    from the load tool, and how busy the pinned cores were (softirq included)."""
    failed: Doc | None = next((r for r in rows if not r["ok"]), None)
    if failed is None:
        return "all rates sustained (raise the rates to find the limit)" if rows else None
    why = f"{failed['verdict']} at {failed['rate']:g}/s"
    gen = _num(failed["generator_cpu_pct"]) or 0.0
    srv = _num(failed["server_cpu_pct"]) or 0.0
    srv_core = _core_busy(failed, cores.get("server") or [])
    gen_core = _core_busy(failed, cores.get("generator") or [])
    shared = cores.get("server") == cores.get("generator")
    core_text = ""
    if srv_core is not None and gen_core is not None:
        core_text = (
            f"; cores {srv_core:.0f}% busy" if shared else f"; cores: server {srv_core:.0f}%, gen {gen_core:.0f}%"
        )
    text = f" (process CPU: server {srv:.0f}%, generator {gen:.0f}%{core_text})"
    if not shared and gen_core is not None and gen_core >= 95 and (srv_core or 0) < 95:
        return why + text + ": the generator's core was full, it may be the limit"
    if gen >= GENERATOR_BUSY_PCT and gen >= srv:
        return why + text + ": the generator may be the limit"
    return why + text


def rate_figures(result: Doc) -> Doc:
    rows = [_step_row(s) for s in result.get("steps") or []]
    sustained: list[Doc] = []
    for row in rows:  # the consecutive ok steps from the first one, as the load tool counts them
        if not row["ok"]:
            break
        sustained.append(row)
    best = sustained[-1] if sustained else None
    at: Doc = {}
    for rate in HEADLINE_RATES:
        match: Doc | None = next((r for r in rows if _num(r["rate"]) == rate), None)
        if match is not None:
            at[str(rate)] = {
                "us_per_delivery": match["us_per_delivery"],
                "kernel_us_per_delivery": match["kernel_us_per_delivery"],
                "us_per_delivery_with_aux": match["us_per_delivery_with_aux"],
                "p50_ms": match["p50_ms"],
                "p99_ms": match["p99_ms"],
                "server_cpu_pct": match["server_cpu_pct"],
                "us_per_publish": match["us_per_publish"],
                "publish_p99_ms": match["publish_p99_ms"],
                "lost": match["lost"],
                "publish_errors": match["publish_errors"],
                "ok": match["ok"],
            }
    half = None
    if best is not None:
        below = [r for r in sustained if (_num(r["rate"]) or 0) <= (_num(best["rate"]) or 0) / 2]
        half_row = below[-1] if below else sustained[0]
        half = {"rate": half_row["rate"], "p50_ms": half_row["p50_ms"], "p99_ms": half_row["p99_ms"]}
    return {
        "steps": rows,
        "saturation_rate": best["rate"] if best else None,
        "max_delivered_per_s": best["delivered_per_s"] if best else None,
        "at": at,
        "half_saturation": half,
        "lost": sum(int(r["lost"] or 0) for r in rows),
        "duplicated": sum(int(r["duplicated"] or 0) for r in rows),
        "closed_by_server": sum(int(r["closed_by_server"] or 0) for r in rows),
        "generator_cpu_max": max((_num(r["generator_cpu_pct"]) or 0.0 for r in rows), default=None),
        "server_rss_peak_mb": max((_num(r["server_rss_peak_mb"]) or 0.0 for r in rows), default=None),
        "limit": _limit(rows, result.get("bench_cores") or {}),
        "stopped": _get(result, "summary", "stopped") or result.get("stopped"),
        "connect": result.get("connect"),
        "stalled": result.get("stalled"),
        "aborted": result.get("aborted"),
    }


def idle_figures(result: Doc) -> Doc:
    idle = result.get("idle") or {}
    return {
        "connections": idle.get("connections"),
        "still_open": idle.get("still_open"),
        "rss_before_mb": idle.get("rss_before_mb"),
        "rss_with_mb": idle.get("rss_with_mb"),
        "kib_per_conn": idle.get("kib_per_connection"),
        "server_cpu_pct": idle.get("server_cpu_pct"),
        "connect": result.get("connect"),
        "aborted": result.get("aborted"),
    }


def _kind(result: Doc) -> str:
    if result.get("idle") is not None:
        return "idle"
    if result.get("storm") is not None or _get(result, "config", "storm"):
        return "storm"
    if _get(result, "config", "conns") == 0:
        return "publish"
    return "rate"


def _stalled_vs_clean(stalled: Doc, clean: Doc) -> Doc:
    """Per common rate the clean run sustained: others' throughput and p99 with 1% stalled."""
    clean_rows = {r["rate"]: r for r in clean["steps"] if r["ok"]}
    rows = []
    for row in stalled["steps"]:
        base = clean_rows.get(row["rate"])
        if base is None:
            continue
        thr = _ratio(row["delivered_per_s"], base["delivered_per_s"])
        p99, p99_base = _num(row["p99_ms"]), _num(base["p99_ms"])
        p99_ok = (
            p99 is not None
            and p99_base is not None
            and p99 <= max(p99_base * (1 + STALL_TOLERANCE), p99_base + P99_FLOOR_MS)
        )
        failed = [
            why
            for why, bad in (
                ("throughput", thr is None or thr < 1 - STALL_TOLERANCE),
                ("p99", not p99_ok),
                (f"step: {row['verdict']}", not row["ok"]),
            )
            if bad
        ]
        rows.append(
            {
                "rate": row["rate"],
                "throughput_ratio": thr,
                "p99_ms": p99,
                "clean_p99_ms": p99_base,
                "p99_ratio": _ratio(p99, p99_base),
                "ok": not failed,
                "failed": failed,
                "rss_peak_mb": row["server_rss_peak_mb"],
                "clean_rss_peak_mb": base["server_rss_peak_mb"],
            }
        )
    return {
        "rates": rows,
        "ok": bool(rows) and all(r["ok"] for r in rows),
        "saturation_rate": stalled["saturation_rate"],
        "clean_saturation_rate": clean["saturation_rate"],
        "rss_peak_mb": stalled["server_rss_peak_mb"],
        "clean_rss_peak_mb": clean["server_rss_peak_mb"],
        "stalled_clients": stalled.get("stalled"),
        "others_closed_by_server": stalled.get("closed_by_server"),
    }


def summarize(outcomes: Iterable[Doc], meta: Doc) -> Doc:
    runs: list[Doc] = []
    figures: dict[str, dict[str, Doc]] = {}
    for o in outcomes:
        entry = {k: o.get(k) for k in ("scenario", "server", "error", "skipped", "seconds", "notes", "machine")}
        runs.append(entry)
        result = o.get("result")
        if not isinstance(result, dict):
            continue
        kind = _kind(result)
        make = {"idle": idle_figures, "storm": storm_figures, "publish": publish_figures}.get(kind, rate_figures)
        fig = make(result)
        fig["other_cpu_pct"] = _get(o, "machine", "foreign_cpu_pct")
        figures.setdefault(str(o["scenario"]), {})[str(o["server"])] = fig

    ratios: dict[str, Doc] = {}
    for scenario in COMPARED:
        per = figures.get(scenario, {})
        herald = per.get("herald")
        if herald is None:
            continue
        for peer in ("nchan", "naive", "floor"):
            other = per.get(peer)
            if other is None:
                continue
            row: Doc = {}
            for rate in HEADLINE_RATES:
                row[f"us_per_delivery@{rate}"] = _ratio(
                    _get(herald, "at", str(rate), "us_per_delivery"), _get(other, "at", str(rate), "us_per_delivery")
                )
            for rate in HEADLINE_RATES:
                row[f"p99@{rate}"] = _ratio(
                    _get(herald, "at", str(rate), "p99_ms"), _get(other, "at", str(rate), "p99_ms")
                )
            row["max_delivered_per_s"] = _ratio(herald["max_delivered_per_s"], other["max_delivered_per_s"])
            row["p99@half_saturation"] = _ratio(
                _get(herald, "half_saturation", "p99_ms"), _get(other, "half_saturation", "p99_ms")
            )
            ratios.setdefault(scenario, {})[peer] = row
    ratios.update(cost_ratios(figures))
    for scenario in IDLE:
        idle = figures.get(scenario, {})
        if "herald" not in idle:
            continue
        for peer in ("nchan", "naive"):
            if peer in idle:
                ratios.setdefault(scenario, {})[peer] = {
                    "kib_per_conn": _ratio(idle["herald"]["kib_per_conn"], idle[peer]["kib_per_conn"])
                }

    stalled: dict[str, Doc] = {}
    for server, fig in figures.get("stalled", {}).items():
        clean = figures.get("fanout-ws", {}).get(server)
        if clean is not None and "steps" in fig:
            stalled[server] = _stalled_vs_clean(fig, clean)

    workers: Doc | None = None
    w = figures.get("workers", {})
    if "herald-w1" in w and "herald-w2" in w:
        ratio = _ratio(w["herald-w2"]["max_delivered_per_s"], w["herald-w1"]["max_delivered_per_s"])
        workers = {
            "w1_max_delivered_per_s": w["herald-w1"]["max_delivered_per_s"],
            "w2_max_delivered_per_s": w["herald-w2"]["max_delivered_per_s"],
            "ratio": ratio,
            "target": WORKERS_TARGET,
            "meets_target": ratio is not None and ratio >= WORKERS_TARGET,
            "inconclusive": all(str(v["limit"]).startswith("all rates sustained") for v in w.values()),
            "generator_cpu_max": max(
                _num(w["herald-w1"]["generator_cpu_max"]) or 0.0, _num(w["herald-w2"]["generator_cpu_max"]) or 0.0
            ),
            "limits": {k: v["limit"] for k, v in w.items()},
            "note": "the generator and nats-server share cores 0,1 with the workers: "
            "a ratio below the target here does not show the node is the limit",
        }
    return {
        "meta": meta,
        "runs": runs,
        "figures": figures,
        "ratios": ratios,
        "stalled": stalled,
        "workers": workers,
    }
