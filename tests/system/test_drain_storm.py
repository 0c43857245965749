"""A drain behind nginx with many clients, each its own user (ops/cluster.py:
3 nats-servers, 3 nodes, nginx): node1 gets SIGTERM while ~500 clients
(WebSocket and SSE) are connected and publishes flow. Its clients reconnect
through nginx to the other nodes and resume: nothing lost or duplicated, and
no reconnect is refused — not with a 503 of the draining node that nginx
passed on, and not with 4029 / 429 for a user whose only connection was the
drained one (``limits.max_connections_per_user = 1``: the drained connection
must be counted out before its client is told to come back)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import aiohttp
import pytest

from broker.publisher import NatsPublisher

from ..failover import SteadyPublisher, Subscriber, check_delivery
from ..helpers import ROOT, wait_for
from .test_cluster_failover import RunningCluster, assert_lossless, nginx_summary, running_cluster

pytestmark = pytest.mark.slow

CLIENTS = int(os.environ.get("HERALD_STORM_CLIENTS", "500"))
ROOMS = 10
RATE = 40.0


@pytest.fixture
def one_per_user(tmp_path: Path) -> Iterator[RunningCluster]:
    """The cluster, each user allowed one connection (refuse-new)."""
    with running_cluster(
        tmp_path / "cluster",
        # Most clients come back within tens of ms: before a count out left to their close is written.
        HERALD_HTTP_RECONNECT_SPREAD="0.3",
        HERALD_LIMITS_MAX_CONNECTIONS_PER_USER="1",
        # The nodes run this checkout (the venv's editable install may be of another worktree).
        PYTHONPATH=str(ROOT),
    ) as running:
        yield running


def passed_on_503s(c: RunningCluster) -> Counter[str]:
    """Streams nginx answered 503 (its client saw the refusal), by path."""
    request = re.compile(r'"\S+ (\S+)" (\d+) ')
    seen: Counter[str] = Counter()
    for line in c.log_lines("nginx-access.log"):
        if (m := request.search(line)) and m[1] in ("/ws", "/sse") and m[2] == "503":
            seen[m[1]] += 1
    return seen


async def test_a_drain_storm_through_nginx_is_admitted_and_lossless(
    one_per_user: RunningCluster, many: aiohttp.ClientSession
) -> None:
    c = one_per_user
    tag = uuid.uuid4().hex[:6]
    subs = [Subscriber(c.lb, ("ws", "sse")[i % 2], f"{tag}u{i}", f"{tag}r{i % ROOMS}") for i in range(CLIENTS)]
    tasks = [asyncio.create_task(s.run(many)) for s in subs]
    try:
        await wait_for(lambda: all(s.connected for s in subs), timeout=60, interval=0.2)
        await asyncio.sleep(1.0)
        before = [list(s.refused) for s in subs]
        async with NatsPublisher(c.ports.nats_urls.split(","), "herald", "HERALD", attempts=30, backoff=0.1) as pub:

            async def publish(channel: str, data: object) -> str:
                return str(await pub.publish(channel, data))

            publisher = SteadyPublisher(publish, sorted({s.room for s in subs}), RATE)
            publishing = asyncio.create_task(publisher.run())
            await asyncio.sleep(2.0)
            t0 = time.monotonic()
            c.kill("node1", signal.SIGTERM)
            await asyncio.sleep(5.0)
            publisher.stop()
            await publishing

        def caught_up() -> bool:
            return all(set(publisher.sent.get(s.room, ())) <= set(s.ids) for s in subs)

        with suppress(TimeoutError):
            await wait_for(caught_up, timeout=40, interval=0.2)
        moved = [s for s in subs if any(t > t0 for t in s.opened)]
        figures = {
            "clients": CLIENTS,
            "published": sum(len(v) for v in publisher.sent.values()),
            "publish_failures": len(publisher.failures),
            "publish_failure_reasons": sorted(set(publisher.failures))[:5],
            "reconnected": len(moved),
            **check_delivery(subs, publisher.sent),
        }
    finally:
        for s in subs:
            s.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert_lossless(c, figures)
    assert len(moved) >= CLIENTS // 6, figures  # node1's share came back through nginx
    refusals = Counter(r for s, old in zip(subs, before, strict=True) for r in s.refused[len(old) :])
    assert not refusals, f"reconnects refused: {refusals.most_common()}\n{nginx_summary(c)}"
    assert not passed_on_503s(c), nginx_summary(c)
    ends = [e for s in subs for e in s.ends]
    assert all(e.startswith("ws 1012 node restarting") or e == "sse end" for e in ends), Counter(ends)
