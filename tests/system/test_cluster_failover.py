"""Failures in a real cluster (ops/cluster.py: 3 nats-servers with an R3
stream, 3 Herald nodes, nginx in front): 300 clients, WebSocket and SSE mixed,
in 10 rooms, a publisher at a steady rate through NATS. A gateway node is
SIGKILLed, one is drained with SIGTERM, a nats-server is SIGKILLed, all of NATS
goes away: every client ends with every acked message of its room, once, in
order. The NATS faults end no stream: there, a share of the clients drops its
connection during and after the fault, so that resuming is tested there too.
Figures go to artifacts/cluster/<test>.json."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.embedded import nats_server_binary
from broker.publisher import NatsPublisher
from ops.cluster import HOST, NAMES, Cluster, Ports, ours, wait_http, wait_meta

from ..browser import ARTIFACTS
from ..failover import SteadyPublisher, Subscriber, check_delivery, p99_latency
from ..helpers import ADMIN_KEY, PUBLISH_HEADERS, PUBLISH_KEY, ROOT, SECRET, free_base, scrape, wait_for

# A cluster of 7 processes, shared by the tests, and 300 clients per test (make test runs them one at
# a time: tests/conftest.py).
pytestmark = pytest.mark.slow

CLIENTS = int(os.environ.get("HERALD_FAILOVER_CLIENTS", "300"))
ROOMS = 10
RATE = 40.0  # messages/s over all rooms
# Flow.drop: a seventh of the clients at a time (odd: WS and SSE alternate; prime to ROOMS: every room).
DROP_EVERY = 7


@dataclass
class RunningCluster:
    cluster: Cluster
    ports: Ports
    # Each log's size when this test got the cluster: a failure shows this test's lines only.
    marks: dict[str, int] = field(default_factory=dict)

    def log_lines(self, name: str) -> list[str]:
        """The lines of log ``name`` (in the cluster's logs/) written since the test began."""
        with (self.cluster.logs / name).open("rb") as f:
            f.seek(self.marks.get(name, 0))
            return f.read().decode(errors="replace").splitlines()

    @property
    def lb(self) -> str:
        return f"http://{HOST}:{self.ports.lb}"

    def pid(self, name: str) -> int:
        return dict(self.cluster.recorded())[name]

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        os.kill(self.pid(name), sig)

    def restart_nats(self, i: int) -> subprocess.Popen[bytes]:
        """nats-server ``n<i+1>`` again, on its config and store."""
        name = f"nats{i + 1}"
        env = os.environ | {"NATS_STORE_DIR": str(self.cluster.dir / "data" / NAMES[i])}
        conf = self.cluster.conf / f"{NAMES[i]}.conf"
        return self.cluster.spawn(name, [nats_server_binary(), "-c", str(conf)], env)

    def heal(self, timeout: float = 30) -> None:
        """Every process running and every node ready again, as after the cluster's start: each
        test kills or drains some. A node still draining is waited for, then started again."""
        restarted = False
        for i, port in enumerate(self.ports.monitor):
            if not ours(name := f"nats{i + 1}", self.pid(name)):
                proc = self.restart_nats(i)
                wait_http(f"http://{HOST}:{port}/healthz", proc, self.cluster.logs / f"{name}.log", timeout)
                restarted = True
        if restarted:
            wait_meta(self.ports, timeout)
        env = self.cluster.node_env(self.ports)
        for i, port in enumerate(self.ports.nodes):
            name, deadline = f"node{i + 1}", time.monotonic() + timeout
            while ours(name, self.pid(name)) and not _ready(f"http://{HOST}:{port}/readyz"):
                if time.monotonic() > deadline:
                    pytest.fail(f"{name} neither ready nor gone within {timeout:g}s", pytrace=False)
                time.sleep(0.1)
            if not ours(name, self.pid(name)):
                self.cluster.node_ready(i, self.cluster.spawn_node(i, self.ports, env), self.ports, env, timeout)
        if down := [name for name, pid in self.cluster.recorded() if not ours(name, pid)]:
            pytest.fail(f"the cluster lost {down}, which no test stops", pytrace=False)
        self.marks = {log.name: log.stat().st_size for log in self.cluster.logs.glob("*.log")}


@dataclass
class Flow:
    """A scenario's clients and publisher, for a fault that acts on them too."""

    subs: list[Subscriber]
    publisher: SteadyPublisher
    dropped: list[Subscriber] = field(default_factory=list)

    def drop(self, offset: int, offline: float = 1.0) -> list[Subscriber]:
        """Every DROP_EVERY-th client from ``offset`` (WS and SSE alike, every
        room) loses its connection as on a network blip and comes back
        ``offline`` seconds later, through the load balancer, from its last id."""
        dropped = [s for s in self.subs[offset::DROP_EVERY] if s.drop(offline)]
        self.dropped += dropped
        return dropped

    async def published(self, n: int, timeout: float = 30) -> None:
        """Until ``n`` more messages are acked: publishing got through the fault."""

        def acked() -> int:
            return sum(len(ids) for ids in self.publisher.sent.values())

        start = acked()
        await wait_for(lambda: acked() >= start + n, timeout=timeout, interval=0.05)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:  # HTTPError (503: draining, NATS away) included
        return False


@contextmanager
def running_cluster(directory: Path, **env: str) -> Iterator[RunningCluster]:
    """The cluster of ops/cluster.py, its nodes with the test keys and ``env``
    (HERALD_* settings) on top: the cluster tool passes its environment on."""
    base = free_base()
    settings = {
        "HERALD_JWT_SECRET": SECRET,
        "HERALD_PUBLISH_KEY": PUBLISH_KEY,
        "HERALD_ADMIN_KEY": ADMIN_KEY,
        "HERALD_HTTP_RECONNECT_SPREAD": "1",
        "HERALD_HTTP_SHUTDOWN_GRACE": "5",
        "HERALD_NATS_RECONNECT_WAIT": "0.5",
        **env,
    }
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    cluster = Cluster(directory)
    try:
        cluster.start(base, timeout=30)
        yield RunningCluster(cluster, Ports.from_base(base))
    finally:
        cluster.stop(5.0)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    """One cluster for the module: its start and stop took 5-20 s per test (loaded machine)."""
    # The nodes run this checkout's code, not the one the venv has installed (a worktree).
    with running_cluster(tmp_path_factory.mktemp("failover") / "cluster", PYTHONPATH=str(ROOT)) as running:
        yield running


@pytest.fixture
def cluster(shared_cluster: RunningCluster) -> RunningCluster:
    shared_cluster.heal()
    return shared_cluster


async def run_scenario(
    name: str,
    c: RunningCluster,
    http: aiohttp.ClientSession,
    fault: Callable[[Flow], Awaitable[None]],
    after: float = 4.0,
) -> tuple[Flow, dict[str, Any]]:
    """Clients connect, publishing starts, ``fault`` happens (it may drop
    clients too), publishing goes on for ``after`` seconds; returns once every
    client holds what its room got (or after 40 s), with the figures (also
    written as JSON)."""
    tag = uuid.uuid4().hex[:6]
    subs = [Subscriber(c.lb, ("ws", "sse")[i % 2], f"{tag}u{i}", f"{tag}r{i % ROOMS}") for i in range(CLIENTS)]
    tasks = [asyncio.create_task(s.run(http)) for s in subs]
    rooms = sorted({s.room for s in subs})
    try:
        await wait_for(lambda: all(s.connected for s in subs), timeout=30, interval=0.1)
        await asyncio.sleep(1.0)  # the SSE streams' subscriptions are in place after their headers
        # A killed stream leader leaves the stream without one for nats-server's
        # election timeout (4-9 s), longer on a loaded CI machine: ~60 s of tries.
        async with NatsPublisher(c.ports.nats_urls.split(","), "herald", "HERALD", attempts=30, backoff=0.1) as pub:

            async def publish(channel: str, data: Any) -> str:
                return str(await pub.publish(channel, data))

            publisher = SteadyPublisher(publish, rooms, RATE)
            flow = Flow(subs, publisher)
            publishing = asyncio.create_task(publisher.run())
            await asyncio.sleep(2.0)
            t0, wall0 = time.monotonic(), time.time()
            await fault(flow)
            fault_s = time.monotonic() - t0
            await asyncio.sleep(after)
            publisher.stop()
            await publishing
        stopped = time.monotonic()

        def caught_up() -> bool:
            return all(set(publisher.sent.get(s.room, ())) <= set(s.ids) for s in subs)

        with suppress(TimeoutError):
            await wait_for(caught_up, timeout=40, interval=0.2)
        reopened = [next((t for t in s.opened if t > t0), None) for s in subs if any(t > t0 for t in s.opened)]
        waits = sorted(t - t0 for t in reopened if t is not None)
        # The clients the fault did not touch: does the others' reconnect storm slow them down?
        untouched = [s for s in subs if not any(t > t0 for t in s.opened)]
        # A dropped client is back once it opened again after its drop, resuming from a position.
        back = [s for s in flow.dropped if s.opened[-1] > s.dropped[-1] and s.resumed[-1] is not None]
        figures: dict[str, Any] = {
            "clients": CLIENTS,
            "published": sum(len(v) for v in publisher.sent.values()),
            "publish_failures": len(publisher.failures),
            "publish_failure_reasons": sorted(set(publisher.failures))[:5],
            "reconnected": len(waits),
            "reconnect_p50_s": round(waits[len(waits) // 2], 3) if waits else None,
            "reconnect_max_s": round(waits[-1], 3) if waits else None,
            "fault_s": round(fault_s, 3),
            "dropped": len(flow.dropped),
            "dropped_back_resumed": len(back),
            "untouched_p99_ms_before": p99_latency(untouched, wall0 - 2, wall0),
            "untouched_p99_ms_during_2s": p99_latency(untouched, wall0, wall0 + 2),
            "caught_up_after_last_publish_s": round(time.monotonic() - stopped, 3),
            **check_delivery(subs, publisher.sent),
        }
    finally:
        for s in subs:
            s.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    out = ARTIFACTS / "cluster"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    return flow, figures


def assert_lossless(c: RunningCluster, figures: dict[str, Any], refusals_allowed: bool = False) -> None:
    """Nothing lost or duplicated (and, unless NATS was down as a whole, every
    publish acked). A failure shows everything (the figures in full, who lost
    what, the nodes' warnings): a red build must say why by itself."""
    failures = 0 if refusals_allowed else figures["publish_failures"]
    if (figures["lost"], figures["duplicated"], failures) != (0, 0, 0):
        warnings = [
            f"{log.name}: {line}"
            for log in sorted(c.cluster.logs.glob("node*.log"))
            for line in c.log_lines(log.name)
            if " WARNING " in line or " ERROR " in line
        ]
        pytest.fail(
            json.dumps(figures, indent=1) + "\nnode warnings:\n" + "\n".join(warnings[-40:]) + "\n" + nginx_summary(c),
            pytrace=False,
        )


def assert_resumed(figures: dict[str, Any]) -> None:
    """Flow.drop's clients (two groups) all came back, each from its last id."""
    dropped, back = figures["dropped"], figures["dropped_back_resumed"]
    assert dropped >= 2 * (CLIENTS // DROP_EVERY) and back == dropped, figures


def nginx_summary(c: RunningCluster) -> str:
    """What nginx answered (path, status, the nodes tried with their statuses)
    and its error lines, counted: whether clients were kept out, and why."""
    names = {f"{HOST}:{port}": f"node{i + 1}" for i, port in enumerate(c.ports.nodes)}
    request = re.compile(r'"\S+ (\S+)" (\d+) \d+ upstream=(.*) rt=')
    answered: Counter[str] = Counter()
    for line in c.log_lines("nginx-access.log"):
        if m := request.search(line):
            tried = re.sub(r"[\d.]+:\d+", lambda a: names.get(a[0], a[0]), m[3])
            answered[f"{m[1]} {m[2]} via {tried}"] += 1
    errors = Counter(
        line.split("] ", 1)[-1].split(", client:")[0].split(": ", 1)[-1] for line in c.log_lines("nginx-error.log")
    )
    return f"nginx answered: {answered.most_common(12)}\nnginx errors: {errors.most_common(6)}"


async def test_sigkill_of_a_gateway_node_loses_nothing(cluster: RunningCluster, many: aiohttp.ClientSession) -> None:
    async def fault(_: Flow) -> None:
        cluster.kill("node2")

    _, figures = await run_scenario("kill-node", cluster, many, fault)
    assert_lossless(cluster, figures)
    assert figures["reconnected"] >= CLIENTS // 6, figures  # node2's share came back through nginx


async def test_sigterm_drain_under_load_only_1012_or_stream_end(
    cluster: RunningCluster, many: aiohttp.ClientSession
) -> None:
    async def fault(_: Flow) -> None:
        cluster.kill("node1", signal.SIGTERM)

    flow, figures = await run_scenario("drain-node", cluster, many, fault)
    assert_lossless(cluster, figures)
    ends = [e for s in flow.subs for e in s.ends]
    assert ends, "node1 had no clients"
    bad = [e for e in ends if not (e.startswith("ws 1012 node restarting") or e == "sse end")]
    assert bad == [], bad[:10]


async def test_sigkill_of_a_nats_server_loses_nothing(cluster: RunningCluster, many: aiohttp.ClientSession) -> None:
    """The streams ride it out; clients that drop meanwhile resume from their last id."""

    async def fault(flow: Flow) -> None:
        cluster.kill("nats2")
        flow.drop(0)  # while the stream may have no leader: their resumes wait for one
        await flow.published(10)
        flow.drop(3)  # while messages flow: what they miss only their resume brings

    _, figures = await run_scenario("kill-nats", cluster, many, fault, after=3.0)
    assert_lossless(cluster, figures)
    assert_resumed(figures)


async def test_all_of_nats_down_then_back(cluster: RunningCluster, many: aiohttp.ClientSession) -> None:
    nodes = [f"http://{HOST}:{p}" for p in cluster.ports.nodes]

    async def statuses(path: str) -> list[int]:
        out = []
        for base in nodes:
            async with many.get(base + path) as resp:
                out.append(resp.status)
        return out

    async def refused() -> Counter[str]:
        """herald_connections_refused_total of every node, by reason and transport."""
        out: Counter[str] = Counter()
        for base in nodes:
            metrics = await scrape(many, base)
            out.update({k: v for k, v in metrics.items() if k.startswith("herald_connections_refused_total{")})
        return out

    during: list[Subscriber] = []
    refused_before: Counter[str] = Counter()

    async def fault(flow: Flow) -> None:
        refused_before.update(await refused())
        for i in range(3):
            cluster.kill(f"nats{i + 1}")
        await wait_for(lambda: _all(statuses("/readyz"), 503), timeout=10, interval=0.1)
        # These try to come back at once, and again: no node can open a stream.
        during.extend(flow.drop(0, offline=0.2))
        body = {"channel": "room:x", "data": 1}
        async with many.post(cluster.lb + "/api/publish", json=body, headers=PUBLISH_HEADERS) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"] == "unavailable"
        assert await statuses("/healthz") == [200, 200, 200]  # no crash
        # An open waits for NATS (nats.publish_timeout, 5 s) before its refusal.
        ws = [s for s in during if s.transport == "ws"]
        await wait_for(lambda: all(s.refused for s in ws), timeout=15, interval=0.1)
        for i in range(3):
            cluster.restart_nats(i)
        await wait_for(lambda: _all(statuses("/readyz"), 200), timeout=30, interval=0.2)
        flow.drop(3)  # right after, while messages flow again: what they miss only their resume brings

    flow, figures = await run_scenario("all-nats-down", cluster, many, fault, after=3.0)
    # What was published while NATS was down was refused (and retried by the
    # publisher until acked); what was acked reached everyone.
    assert_lossless(cluster, figures, refusals_allowed=True)
    assert_resumed(figures)
    # docs/protocol.md 13: an open stream is not closed for NATS being away (the
    # node fetches what it missed once NATS is back); one opening meanwhile is
    # refused, WebSocket close 1013, SSE 503 `unavailable` (nginx tries the
    # next node on a 503: the client may see the third node's answer), and
    # resumes once NATS is back (assert_resumed).
    kept = [s for s in flow.subs if s not in flow.dropped]
    assert [(s.user, s.ends) for s in kept if s.ends] == [], "a stream ended while NATS was away"
    refusals = Counter(r for s in during for r in s.refused)
    assert set(refusals) <= {"ws 1013 broker unavailable: try again", "sse 503 unavailable"}, refusals
    by_nodes = await refused() - refused_before
    assert set(by_nodes) == {
        'herald_connections_refused_total{reason="unavailable",transport="ws"}',
        'herald_connections_refused_total{reason="unavailable",transport="sse"}',
    }, by_nodes


async def _all(statuses: Awaitable[list[int]], wanted: int) -> bool:
    return all(s == wanted for s in await statuses)
