"""ops/prometheus and ops/grafana: the config, rules and rule unit tests pass promtool (the dashboard is well
formed: tests/unit/test_ops_prometheus.py), and a real Prometheus scraping a real node under load has data for
every dashboard query and every recording rule (and every metric the rules and dashboard name is one the node
exports).

Needs Debian's prometheus package (promtool and prometheus on PATH): ``make ops-deps``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.embedded import free_port

from ..helpers import (
    PUBLISH_HEADERS,
    RunningNode,
    SseClient,
    api_publish,
    recv_json,
    scrape,
    token,
    wait_for,
    wait_http_ok,
)

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "ops" / "prometheus"
RULE_FILES = [PROM_DIR / "rules" / "herald-recording.yml", PROM_DIR / "rules" / "herald-alerts.yml"]
# The webhook dispatchers' alerts: their metrics are not a node's, so the live test leaves them out.
HOOKS_ALERTS = PROM_DIR / "rules" / "herald-hooks-alerts.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "herald.json"
ALERTS = {
    "HeraldNodeDown",
    "HeraldNatsDisconnected",
    "HeraldNatsUnreachable",
    "HeraldNodeNotReady",
    "HeraldDeliveryLatencyHigh",
    "HeraldSlowConsumerDisconnectsHigh",
    "HeraldOutboundQueueBytesHigh",
    "HeraldAuthFailureSpike",
    "HeraldReplayOrGapRepairSpike",
    "HeraldAcceptQueueFilling",
    "HeraldClockSkewed",
}
# What Grafana would put in for its own variables when the queries run.
GRAFANA_VARS = {"${node}": ".*", "$node": ".*", "$job": "herald", "$__rate_interval": "5s", "$__interval": "5s"}
METRIC_RE = re.compile(r"(?<![:\w])herald_\w+")


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"{name} is not installed: run make ops-deps (Debian's prometheus package)")
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [tool("promtool"), *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def panel_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel."""
    return [(p["title"], t.get("expr", "")) for p in dashboard["panels"] for t in p.get("targets", [])]


def grafana_substitute(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def test_promtool_checks_rules_and_config() -> None:
    promtool("check", "rules", *(str(p.relative_to(PROM_DIR)) for p in [*RULE_FILES, HOOKS_ALERTS]))
    out = promtool("check", "config", "prometheus.yml")
    assert "3 rule files found" in out.stdout + out.stderr


def test_promtool_rule_unit_tests_pass_and_cover_every_alert() -> None:
    promtool("test", "rules", "tests/herald-rules-test.yml")
    tests = (PROM_DIR / "tests" / "herald-rules-test.yml").read_text()
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", RULE_FILES[1].read_text(), re.MULTILINE))
    assert alerts == ALERTS
    alerts |= set(re.findall(r"^\s+- alert: (\w+)$", HOOKS_ALERTS.read_text(), re.MULTILINE))
    assert {"HeraldWebhooksDeadLettered", "HeraldWebhooksStalling"} <= alerts
    for alert in alerts:
        # each has an evaluation with exp_alerts: [] (must not fire) and one listing what fires
        assert re.search(rf"alertname: {alert}\n\s+exp_alerts: \[\]", tests), f"{alert}: no case where it stays quiet"
        assert re.search(rf"alertname: {alert}\n\s+exp_alerts:\n\s+- exp_labels:", tests), f"{alert}: never fires"


# --- a real Prometheus scraping a real node --------------------------------------------------------


class Prometheus:
    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url

    async def get(self, path: str, **params: Any) -> Any:
        async with self.http.get(self.url + path, params=params, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            body = await resp.json()
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        async with self.http.post(
            self.url + "/api/v1/query", data={"query": expr}, timeout=aiohttp.ClientTimeout(total=10)
        ) as resp:
            body = await resp.json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def run_prometheus(tmp: Path, target: str | list[str], http: aiohttp.ClientSession) -> AsyncIterator[Prometheus]:
    """Debian's prometheus scraping ``target`` (or each of a list) every second with the Herald rules loaded;
    killed on exit."""
    targets = ", ".join(f"'{t}'" for t in ([target] if isinstance(target, str) else target))
    rule_files = "\n".join(f"  - {p}" for p in RULE_FILES)
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n{rule_files}\n"
        "scrape_configs:\n  - job_name: herald\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: [{targets}]\n"
    )
    port = free_port()
    log = tmp / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            await wait_http_ok(http, url + "/-/ready", proc, what="prometheus")
        except AssertionError:
            raise AssertionError(f"prometheus did not start:\n{log.read_text()}") from None
        yield Prometheus(http, url)
    finally:
        proc.kill()
        proc.wait()


async def drain_ws(ws: aiohttp.ClientWebSocketResponse) -> None:
    while not ws.closed:
        await ws.receive()


async def drain_sse(sse: SseClient) -> None:
    with contextlib.suppress(EOFError):
        while True:
            await sse.next(timeout=60)


async def publish_forever(http: aiohttp.ClientSession, node: RunningNode, counter: list[int]) -> None:
    while True:
        await api_publish(http, node, "room:ops", {"n": counter[0], "pad": "x" * 200})
        counter[0] += 1
        await asyncio.sleep(0.02)


async def make_trouble(http: aiohttp.ClientSession, node: RunningNode) -> None:
    """What only shows in labelled counters once it happens: refused tokens, publish API errors, a limit."""
    async with http.ws_connect(node.ws_url, params={"token": "not-a-token", "room": "ops"}) as ws:
        await ws.receive(timeout=5)  # closed 4001 at once
    async with http.get(node.url + "/sse", params={"token": token("x", ttl=-10), "room": "ops"}) as resp:
        assert resp.status == 401
    async with http.post(
        node.url + "/api/publish", json={"channel": "room:ops", "data": 1}, headers={"Authorization": "Bearer wrong"}
    ) as resp:
        assert resp.status == 401
    big = {"channel": "room:ops", "data": "x" * (node.settings.http.max_body + 1)}
    async with http.post(node.url + "/api/publish", json=big, headers=PUBLISH_HEADERS) as resp:
        assert resp.status == 413


async def test_prometheus_has_data_for_every_panel_and_recording_rule(
    node: RunningNode, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    started = time.monotonic()
    target = node.url.removeprefix("http://")
    dashboard = load_dashboard()
    tasks: list[asyncio.Task[None]] = []
    sse_clients: list[SseClient] = []
    ws_clients: list[aiohttp.ClientWebSocketResponse] = []
    try:
        async with run_prometheus(tmp_path, target, http) as prom:
            # A few clients in one room on each transport, a steady publisher, and a bit of trouble.
            for i in range(3):
                ws = await http.ws_connect(node.ws_url, params={"token": token(f"w{i}"), "room": "ops"})
                assert (await recv_json(ws))["type"] == "welcome"
                ws_clients.append(ws)
                tasks.append(asyncio.create_task(drain_ws(ws)))
            for i in range(2):
                sse = SseClient(await http.get(node.url + "/sse", params={"token": token(f"s{i}"), "room": "ops"}))
                assert sse.status == 200
                sse_clients.append(sse)
                tasks.append(asyncio.create_task(drain_sse(sse)))
            published = [0]
            tasks.append(asyncio.create_task(publish_forever(http, node, published)))
            await make_trouble(http, node)
            # One client leaves and resumes from the first message: a replay.
            await wait_for(lambda: published[0] >= 5)
            first = await api_publish(http, node, "room:ops", "resume from here")
            await asyncio.sleep(0.3)
            ws = await http.ws_connect(node.ws_url, params={"token": token("r"), "room": "ops", "since": first})
            assert (await recv_json(ws))["type"] == "welcome"
            ws_clients.append(ws)
            tasks.append(asyncio.create_task(drain_ws(ws)))

            rules = await prom.get("/api/v1/rules")
            recording = [r for g in rules["groups"] for r in g["rules"] if r["type"] == "recording"]
            alerting = [r for g in rules["groups"] for r in g["rules"] if r["type"] == "alerting"]
            assert len(recording) >= 10 and {r["name"] for r in alerting} == ALERTS
            queries = {f"panel {title!r}: {expr}": grafana_substitute(expr) for title, expr in panel_exprs(dashboard)}
            queries |= {f"recording rule {r['name']}": r["name"] for r in recording}
            queries['up{job="herald"}'] = 'up{job="herald"} == 1'

            async def empties() -> dict[str, str]:
                missing = {}
                for what, expr in queries.items():
                    result = await prom.query(expr)
                    values = [float(s["value"][1]) for s in result]
                    if not values:
                        missing[what] = "no series"
                    elif all(math.isnan(v) for v in values):
                        missing[what] = "only NaN"
                return missing

            missing: dict[str, str] = {}
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                missing = await empties()
                if not missing:
                    break
                await asyncio.sleep(0.5)
            assert not missing, json.dumps(missing, indent=2)

            # The node variable's query finds the node.
            nodes = await prom.get("/api/v1/label/instance/values", **{"match[]": "herald_connections"})
            assert target in nodes
            # Every rule evaluates without error against real data, and alerts carry what the runbook needs.
            rules = await prom.get("/api/v1/rules")
            for r in (r for g in rules["groups"] for r in g["rules"]):
                assert r["health"] == "ok", r
                if r["type"] == "alerting":
                    assert r["labels"]["severity"] in ("critical", "warning", "info"), r["name"]
                    assert {"summary", "description", "runbook"} <= set(r["annotations"]), r["name"]
                    assert r["state"] != "firing", r  # nothing is wrong with this node
            # Every metric named in the rules and the dashboard (queries, annotations, descriptions) is exported.
            samples = {key.partition("{")[0] for key in await scrape(http, node.url)}
            exported = samples | {re.sub(r"_(bucket|count|sum)$", "", name) for name in samples}
            texts = [r["query"] for g in rules["groups"] for r in g["rules"]]
            texts += [a for g in rules["groups"] for r in g["rules"] for a in r.get("annotations", {}).values()]
            texts += [expr for _, expr in panel_exprs(dashboard)]
            texts += [p.get("description", "") for p in dashboard["panels"]]
            named = {m for text in texts for m in METRIC_RE.findall(text)}
            assert named - exported == set()
            assert published[0] > 20
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ws in ws_clients:
            await ws.close()
        for sse in sse_clients:
            sse.response.close()
    assert time.monotonic() - started < 30
