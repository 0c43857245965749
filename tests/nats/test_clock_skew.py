"""Nodes whose wall clocks are off — from each other, from the token issuer,
from nats-server — by seconds to minutes (NTP not synced yet after boot, a VM
resumed from suspend): real ``herald serve`` / ``herald hooks`` processes on
one nats-server, each with its clock skewed in-process (tests/skewed_clock).
What users see must not change with a skew of up to a minute or so."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from broker.embedded import NatsServer

from ..helpers import (
    PUBLISH_HEADERS,
    PUBLISH_KEY,
    ROOT,
    NodeFactory,
    RunningNode,
    api_publish,
    expect_close,
    recv_json,
    recv_until,
    scrape,
    spawn_cluster_node,
    token,
    wait_for,
)
from .test_connect_hook import CONNECT_SECRET, App, app  # noqa: F401 - the fixture
from .test_hooks import Receiver, consumer_ready, dispatcher_env, hook_settings, receiver  # noqa: F401 - the fixture

SKEWED_CLOCK = ROOT / "tests" / "skewed_clock"
_clusters = iter(range(1, 1_000_000))


def cluster() -> dict[str, dict[str, Any]]:
    n = next(_clusters)
    return {"subject": {"prefix": f"skew{n}"}, "stream": {"name": f"SKEW{n}", "storage": "memory"}}


def skewed(seconds: float, **env: str) -> dict[str, str]:
    """The environment of a process whose wall clock runs ``seconds`` ahead (negative: behind)."""
    return {"PYTHONPATH": f"{SKEWED_CLOCK}:{ROOT}", "SKEWED_CLOCK_OFFSET": str(seconds), **env}


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/ws"


async def test_a_node_behind_the_token_issuer_admits_its_fresh_tokens(
    nats_server: NatsServer, spawn: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """A token minted now (``iat`` now, by a backend whose clock is right)
    is fine on a node 30 s behind: ``iat`` says when it was issued, not from
    when it is valid (that is ``nbf``, RFC 7519 4.1.5-6). Before, the node
    refused it with 4001 "token not yet valid" — even 2 s behind, with the
    default jwt.leeway of 0 — and herald.js, whose one fresh token got the same
    answer, stopped for good."""
    shared = cluster()
    for seconds in (-2, -30):
        _, url = await spawn_cluster_node(spawn, http, nats_server.url, shared, **skewed(seconds))
        ws = await http.ws_connect(ws_url(url), params={"token": token("ann"), "room": "lobby"})
        assert (await recv_json(ws))["type"] == "welcome", f"node {seconds} s behind"
        await ws.close()


async def test_close_oldest_closes_the_oldest_whatever_the_clocks_of_the_nodes(
    nats_server: NatsServer, spawn: Callable[..., Any], node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """A user's first tab on node A, the second on node B (60 s behind),
    the third on A: close-oldest closes the first. Before, each connection
    was stamped with its node's clock, the second looked a minute older than
    the first and was closed instead (and herald.js, told it was replaced,
    stopped)."""
    shared = {**cluster(), "limits": {"max_connections_per_user": 2, "connections_policy": "close-oldest"}}
    a = await node_factory(**shared)
    env = {"HERALD_LIMITS_MAX_CONNECTIONS_PER_USER": "2", "HERALD_LIMITS_CONNECTIONS_POLICY": "close-oldest"}
    _, b = await spawn_cluster_node(spawn, http, nats_server.url, shared, **skewed(-60, **env))
    tabs = []
    for url in (a.url, b, a.url):
        ws = await http.ws_connect(ws_url(url), params={"token": token("ann"), "room": "lobby"})
        assert (await recv_json(ws))["type"] == "welcome"
        tabs.append(ws)
    code, reason = await expect_close(tabs[0])
    assert code == 4029 and "oldest" in reason
    for ws in tabs[1:]:
        await ws.send_json({"type": "ping", "ref": "p"})
        assert (await recv_json(ws))["type"] == "pong"
        await ws.close()


async def test_the_webhook_dispatcher_waits_offline_after_by_the_stream_s_clock(
    node: RunningNode,
    http: aiohttp.ClientSession,
    receiver: Receiver,  # noqa: F811 - the fixture
    nats_server: NatsServer,
    spawn: Callable[..., Any],
) -> None:
    """A message's age is nats-server's clock minus its stored time: a
    dispatcher 30 s ahead still waits offline_after (4 s) before it sends an
    offline user's webhook, one 6 s behind does not wait 6 s longer. Before,
    the age was taken on the dispatcher's clock: 30 s ahead sent it at once
    (with the default of 60 s, a push for every message a user reconnecting
    gets anyway), 6 s behind after 10 s."""
    settings = hook_settings(node, receiver.url, offline_after=4.0)
    for seconds in (30, -6):
        proc = spawn(["hooks"], dispatcher_env(settings, nats_server, **skewed(seconds)))
        await consumer_ready(nats_server, settings)
        sent = len(receiver.requests)
        began = time.monotonic()
        await api_publish(http, node, "user:hal", {"skew": seconds})
        await wait_for(lambda: len(receiver.requests) > sent, timeout=20)  # noqa: B023 - awaited here
        waited = receiver.times[-1] - began
        assert 3.5 < waited < 6.0, f"dispatcher {seconds:+} s: sent after {waited:.1f} s, offline_after 4 s"
        proc.kill()
        proc.wait()


async def test_a_clock_stepped_back_does_not_keep_connect_hook_answers_longer(
    nats_server: NatsServer,
    spawn: Callable[..., Any],
    http: aiohttp.ClientSession,
    app: App,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    """An answer of the app is reused for auth.connect_cache_ttl seconds
    (1.5 here), however the node's clock moves meanwhile. Before, "until" was
    a wall-clock time: the node's clock stepped back by 2 minutes (an NTP
    correction) kept the answer 2 minutes longer — a logout at the app not
    seen by the node that long."""
    clock = tmp_path / "clock"
    clock.write_text("0")
    env = {
        "HERALD_AUTH_MODE": "hook",
        "HERALD_AUTH_CONNECT_URL": app.url,
        "HERALD_AUTH_CONNECT_SECRET": CONNECT_SECRET,
        "HERALD_AUTH_CONNECT_CACHE_TTL": "1.5",
        "SKEWED_CLOCK_FILE": str(clock),
    }
    _, url = await spawn_cluster_node(spawn, http, nats_server.url, cluster(), **skewed(0, **env))
    cookie = app.login("s1", "ann", ["lobby"])

    async def connect() -> None:
        async with http.ws_connect(ws_url(url), headers={"Cookie": cookie}) as ws:
            assert (await recv_json(ws))["type"] == "welcome"

    await connect()
    await connect()
    assert len(app.requests) == 1  # the second was answered from the cache
    clock.write_text("-120")
    await asyncio.sleep(2.0)  # past the ttl (the clock file is read again every 20 ms)
    await connect()
    assert len(app.requests) == 2, "the answer was reused past connect_cache_ttl"


async def test_a_node_ahead_keeps_what_a_room_s_max_age_keeps(
    nats_server: NatsServer, spawn: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """Rooms whose history lasts 20 s, on a node 30 s ahead: a message
    published just now is in the history page and in a resume. Before, the
    node judged its age on its own clock against the time nats-server stored
    it: 30 s old, past the room's max_age — an empty page, and a resume that
    got a reset instead of the message (a node behind kept messages past it)."""
    env = {"HERALD_ROOMS_HISTORY": "brief-*=100/20", "HERALD_PUBLISH_KEY": PUBLISH_KEY}
    _, url = await spawn_cluster_node(spawn, http, nats_server.url, cluster(), **skewed(30, **env))
    ids = []
    for n in range(2):
        async with http.post(
            url + "/api/publish", json={"channel": "room:brief-1", "data": n}, headers=PUBLISH_HEADERS
        ) as resp:
            ids.append((await resp.json())["id"])
    ws = await http.ws_connect(ws_url(url), params={"token": token("ann"), "room": "brief-1", "since": ids[0]})
    assert (await recv_json(ws))["type"] == "welcome"
    replayed = await recv_json(ws)
    assert (replayed["type"], replayed.get("id")) == ("message", ids[1]), replayed
    await ws.send_json({"type": "history", "room": "brief-1", "ref": "h"})
    page = await recv_json(ws)
    assert [m["id"] for m in page["messages"]] == ids, page
    await ws.close()


async def test_delivery_latency_is_not_the_node_s_clock_skew(
    nats_server: NatsServer, spawn: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """herald_delivery_latency_seconds of a node 30 s ahead is the delivery's
    latency, not 30 s (which fired HeraldDeliveryLatencyHigh on a skew of half
    a second) — nor -30 s for an ephemeral message, which the node stamps on
    arrival — and herald_clock_offset_seconds shows the skew."""
    _, url = await spawn_cluster_node(
        spawn, http, nats_server.url, cluster(), **skewed(30, HERALD_PUBLISH_KEY=PUBLISH_KEY)
    )
    ws = await http.ws_connect(ws_url(url), params={"token": token("ann", publish=["*"]), "room": "lobby"})
    assert (await recv_json(ws))["type"] == "welcome"
    for n in range(3):
        async with http.post(url + "/api/publish", json={"channel": "room:lobby", "data": n}, headers=PUBLISH_HEADERS):
            pass
        assert (await recv_json(ws))["data"] == n
    await ws.send_json({"type": "publish", "room": "lobby", "data": "typing", "ephemeral": True})
    assert (await recv_until(ws, "message"))["data"] == "typing"
    await ws.close()
    metrics = await scrape(http, url)
    assert metrics["herald_delivery_latency_seconds_count"] == 4
    assert -0.5 < metrics["herald_delivery_latency_seconds_sum"] < 1.0, metrics["herald_delivery_latency_seconds_sum"]
    assert abs(metrics["herald_clock_offset_seconds"] - 30) < 1.0


async def test_a_node_whose_clock_steps_reads_the_offset_again_by_the_next_scrape(
    nats_server: NatsServer, spawn: Callable[..., Any], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A node whose streams stay open (no connect, no replay asks the stream
    anything) has its clock stepped 60 s ahead: a scrape has the offset read
    again (the next one shows it), and deliveries after it are not counted 60 s
    late."""
    clock = tmp_path / "clock"
    clock.write_text("0")
    env = {"HERALD_PUBLISH_KEY": PUBLISH_KEY, "SKEWED_CLOCK_FILE": str(clock)}
    _, url = await spawn_cluster_node(spawn, http, nats_server.url, cluster(), **skewed(0, **env))
    ws = await http.ws_connect(ws_url(url), params={"token": token("ann"), "room": "lobby"})
    assert (await recv_json(ws))["type"] == "welcome"
    clock.write_text("60")
    await asyncio.sleep(0.2)  # read by the node's clock within 20 ms

    async def read_again() -> bool:
        return abs((await scrape(http, url))["herald_clock_offset_seconds"] - 60) < 1.0

    await wait_for(read_again, timeout=5, interval=0.2)
    async with http.post(url + "/api/publish", json={"channel": "room:lobby", "data": 1}, headers=PUBLISH_HEADERS):
        pass
    assert (await recv_json(ws))["data"] == 1
    await ws.close()
    assert (await scrape(http, url))["herald_delivery_latency_seconds_sum"] < 1.0
