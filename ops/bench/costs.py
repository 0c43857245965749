"""The cost of publishing and of connecting: figures and tables of the
publish-API scenarios (``--conns 0``, single and batched) and of the connect
storms (``--storm``), and their Herald ÷ peer ratios."""

from __future__ import annotations

from .scenarios import BATCH_RATES, PUBLISH_RATES
from .tables import Doc, at, core_busy, fmt, get, num, ratio, section

STORMS = ("connect-storm-ws", "connect-storm-sse", "connect-storm-sse-10k")
PUBLISH_FANOUT = ("fanout-ws-http", 500)  # publish-api's "with fan-out" case: this run, this rate


def publish_figures(result: Doc) -> Doc:
    """Publishing with no receivers (``--conns 0``): per offered rate, server CPU per
    published message, request latency, errors."""
    rows = []
    for step in result.get("steps") or []:
        errors = step.get("publish_errors") or {}
        rows.append(
            {
                "rate": step.get("rate"),
                "published_per_s": step.get("published_per_s"),
                "requests": get(step, "publish", "requests"),
                "batch": get(step, "publish", "batch"),
                "us_per_publish": get(step, "server", "us_per_publish"),
                "aux_us_per_publish": get(step, "aux", "us_per_publish"),
                "server_cpu_pct": get(step, "server", "cpu_pct"),
                "p50_ms": get(step, "publish", "latency_ms", "p50"),
                "p99_ms": get(step, "publish", "latency_ms", "p99"),
                "max_ms": get(step, "publish", "latency_ms", "max"),
                "errors": sum(errors.values()),
                "error_kinds": errors,
                "generator_cpu_pct": step.get("generator_cpu_pct"),
                "verdict": step.get("verdict"),
                "ok": step.get("verdict") == "ok",
            }
        )
    return {
        "kind": "publish",
        "steps": rows,
        "at": {f"{num(r['rate']) or 0:g}": r for r in rows},
        "errors": sum(int(r["errors"] or 0) for r in rows),
        "generator_cpu_max": max((num(r["generator_cpu_pct"]) or 0.0 for r in rows), default=None),
        "stopped": get(result, "summary", "stopped") or result.get("stopped"),
        "aborted": result.get("aborted"),
    }


def storm_figures(result: Doc) -> Doc:
    """A connect storm: admitted/s, handshake latency, server CPU per connect, and
    whether the generator (or its core) may have been the limit."""
    s: Doc = result.get("storm") or {}
    cores: Doc = result.get("bench_cores") or {}
    busy = {"cores_busy_pct": s.get("cores_busy_pct")}
    srv_core = core_busy(busy, cores.get("server") or [])
    gen_core = core_busy(busy, cores.get("generator") or [])
    offered, admitted = num(s.get("offered_per_s")), num(s.get("admitted_per_s"))
    limit = None
    if s.get("generator_busy"):
        limit = f"generator at {fmt(s.get('generator_cpu_max'), 0)}% of a core: it may be the limit"
    elif gen_core is not None and gen_core >= 95 and (srv_core or 0) < 95:
        limit = f"the generator's core was {gen_core:.0f}% busy: it may be the limit"
    return {
        "kind": "storm",
        "requested": s.get("requested"),
        "rate": s.get("rate_offered_target"),
        "attempted": s.get("attempted"),
        "connected": s.get("connected"),
        "failed": s.get("failed"),
        "errors": s.get("errors") or {},
        "offered_per_s": offered,
        "admitted_per_s": admitted,
        "admitted_share": round(admitted / offered, 3) if admitted and offered else None,
        "handshake_ms": s.get("handshake_ms"),
        "head_ms": s.get("head_ms"),
        "start_late_ms": s.get("start_late_ms"),
        "us_per_connect": get(s, "server", "us_per_connect"),
        "aux_us_per_connect": get(s, "aux", "us_per_connect"),
        "us_per_close": get(s, "server", "us_per_close"),
        "server_cpu_pct": get(s, "server", "cpu_pct"),
        "procs": s.get("procs"),
        "generator_cpu_pct": s.get("generator_cpu_pct"),
        "generator_cpu_max": s.get("generator_cpu_max"),
        "server_core_busy_pct": srv_core,
        "generator_core_busy_pct": gen_core,
        "closed_during_hold": s.get("closed_during_hold") or {},
        "limit": limit,
        "aborted": result.get("aborted"),
    }


def cost_ratios(figures: dict[str, dict[str, Doc]]) -> dict[str, Doc]:
    """Herald ÷ nchan (and ÷ naive for the storms)."""
    ratios: dict[str, Doc] = {}
    publish = figures.get("publish-api", {})
    fanout_run, fanout_rate = PUBLISH_FANOUT
    fanout = figures.get(fanout_run, {})
    if "herald" in publish and "nchan" in publish:
        h, n = publish["herald"], publish["nchan"]
        row = {}
        for rate in PUBLISH_RATES:
            row[f"us_per_publish@{rate}"] = ratio(
                get(h, "at", str(rate), "us_per_publish"), get(n, "at", str(rate), "us_per_publish")
            )
            row[f"publish_p99@{rate}"] = ratio(get(h, "at", str(rate), "p99_ms"), get(n, "at", str(rate), "p99_ms"))
        if "herald" in fanout and "nchan" in fanout:
            row[f"us_per_publish_with_fanout@{fanout_rate}"] = ratio(
                get(fanout["herald"], "at", str(fanout_rate), "us_per_publish"),
                get(fanout["nchan"], "at", str(fanout_rate), "us_per_publish"),
            )
        ratios["publish-api"] = {"nchan": row}
    for scenario in STORMS:
        per = figures.get(scenario, {})
        if "herald" not in per:
            continue
        for peer in ("nchan", "naive"):
            if peer in per:
                h, o = per["herald"], per[peer]
                ratios.setdefault(scenario, {})[peer] = {
                    "admitted_per_s": ratio(h["admitted_per_s"], o["admitted_per_s"]),
                    "handshake_p99": ratio(get(h, "handshake_ms", "p99"), get(o, "handshake_ms", "p99")),
                    "us_per_connect": ratio(h["us_per_connect"], o["us_per_connect"]),
                    "us_per_close": ratio(h.get("us_per_close"), o.get("us_per_close")),
                }

    return ratios


def publish_section(figures: dict[str, dict[str, Doc]]) -> list[str]:
    single = figures.get("publish-api", {})
    batch = figures.get("publish-api-batch", {})
    fanout_run, fanout_rate = PUBLISH_FANOUT
    fanout = figures.get(fanout_run, {})
    servers = [s for s in ("herald", "nchan", "naive") if s in single or s in batch]
    if not servers:
        return []
    lo, hi = PUBLISH_RATES[0], PUBLISH_RATES[-1]
    rows = []
    for server in servers:
        fig, bfig, ffig = single.get(server), batch.get(server), fanout.get(server)
        rows.append(
            [
                server,
                at(fig, lo, "us_per_publish"),
                at(fig, hi, "us_per_publish"),
                at(fig, hi, "aux_us_per_publish"),
                at(fig, hi, "published_per_s", 0),
                f"{at(fig, lo, 'p50_ms', 2)} / {at(fig, lo, 'p99_ms', 2)}",
                f"{at(fig, hi, 'p50_ms', 2)} / {at(fig, hi, 'p99_ms', 2)}",
                fmt(get(fig, "errors"), 0),
                *(
                    [at(bfig, rate, "us_per_publish") for rate in BATCH_RATES]
                    if bfig
                    else ["—" if server != "herald" else "-"] * len(BATCH_RATES)
                ),
                at(ffig, fanout_rate, "us_per_publish") if ffig else "-",
                fmt(max((num(get(f, "generator_cpu_max")) or 0.0 for f in (fig, bfig) if f), default=None), 0, "%"),
            ]
        )
    receivers = next((get(f, "connect", "requested") for f in fanout.values() if get(f, "connect", "requested")), None)
    fan = f"{receivers:,} receivers over 10 rooms, {receivers // 10:,} deliveries per message" if receivers else "-"
    batch_size = next((r.get("batch") for f in batch.values() for r in f.get("steps", []) if r.get("batch")), "?")
    return section(
        "HTTP publish API",
        f"No receivers; 10 keep-alive connections, one request in flight on each. µs/pub = µs of server CPU "
        f"per published message (over the step and its settle time); `+nats` = nats-server's CPU per message "
        f"(Herald only; nchan keeps messages itself). p50 / p99 = request round trip. Batch = POST /api/publish "
        f"with a JSON array of {batch_size} messages, µs of server CPU per message (— : nchan has no batch). "
        f"fan-out = the `{fanout_run}` run at {fanout_rate} msgs/s ({fan}): µs of server CPU per publish. "
        "`*` = not sustained or not every publish got 2xx.",
        [
            "server",
            f"µs/pub @{lo}",
            f"µs/pub @{hi}",
            f"+nats @{hi}",
            f"pub/s @{hi}",
            f"p50 / p99 ms @{lo}",
            f"p50 / p99 ms @{hi}",
            "errors",
            *(f"batch µs/msg @{r}" for r in BATCH_RATES),
            f"fan-out µs/pub @{fanout_rate}",
            "gen CPU max",
        ],
        rows,
    )


def storm_section(figures: dict[str, dict[str, Doc]]) -> list[str]:
    rows = []
    for scenario in STORMS:
        for server, fig in figures.get(scenario, {}).items():
            hs, head = fig.get("handshake_ms") or {}, fig.get("head_ms") or {}
            gens = fig.get("generator_cpu_pct") or []
            errors = ", ".join(f"{k} x{n}" for k, n in (fig.get("errors") or {}).items())
            rows.append(
                [
                    scenario,
                    server,
                    f"{fmt(fig.get('requested'), 0)} @ {fmt(fig.get('rate'), 0)}/s",
                    fmt(fig.get("offered_per_s"), 0),
                    fmt(fig.get("admitted_per_s"), 0),
                    f"{fmt(hs.get('p50'))} / {fmt(hs.get('p99'))} / {fmt(hs.get('max'))}",
                    f"{fmt(head.get('p50'))} / {fmt(head.get('p99'))}",
                    fmt(fig.get("us_per_connect"), 0),
                    fmt(fig.get("aux_us_per_connect"), 0),
                    fmt(fig.get("us_per_close"), 0),
                    f"{fmt(fig.get('failed'), 0)}" + (f" ({errors})" if errors else ""),
                    " + ".join(fmt(g, 0, "%") for g in gens) or "-",
                    " / ".join(fmt(fig.get(k), 0, "%") for k in ("server_core_busy_pct", "generator_core_busy_pct")),
                    fmt(fig.get("other_cpu_pct"), 0, "%"),
                    str(fig.get("limit") or fig.get("aborted") or "-"),
                ]
            )
    if not rows:
        return []
    return section(
        "Connect storms",
        "Connects offered at a fixed rate, each its own user (Herald: a JWT each, minted before the storm), "
        "over 10 rooms. admitted/s = connected / (last ready - first start). ready = Herald's welcome frame or "
        "`welcome` event (the client is admitted), for the others the 101 / response head (nchan sends nothing "
        "after it); head = the 101 / response head. µs/conn = server CPU from the first start until every "
        "connect succeeded or failed, per connect; `+nats` = nats-server's per connect (Herald); µs/close = "
        "server CPU from then over the hold and the closes until it settled, per connection. gen CPU = each "
        "generator process, % of a core (≥ 85%: it may be the limit); cores = how busy the server's and the "
        "generator's cores were during the storm.",
        [
            "scenario",
            "server",
            "offered",
            "offered/s",
            "admitted/s",
            "ready p50 / p99 / max ms",
            "head p50 / p99 ms",
            "µs/conn",
            "+nats µs/conn",
            "µs/close",
            "failed",
            "gen CPU",
            "cores srv / gen",
            "other CPU",
            "limit",
        ],
        rows,
    )
