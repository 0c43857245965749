"""Connections per user are counted across the cluster: the 11th of one user,
wherever it lands, is refused — or the oldest is closed, by policy."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import aiohttp

from ..helpers import NodeFactory, RunningNode, SseClient, expect_close, recv_json, scrape, token, wait_for

_clusters = itertools.count(1)


def cluster(**limits: Any) -> dict[str, dict[str, Any]]:
    n = next(_clusters)
    return {
        "subject": {"prefix": f"uc{n}"},
        "stream": {"name": f"UC{n}", "storage": "memory"},
        "limits": limits,
    }


async def connect(http: aiohttp.ClientSession, node: RunningNode, user: str) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(node.ws_url, params={"token": token(user), "room": "lobby"})
    return ws


async def test_eleventh_connection_across_two_nodes_is_refused(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    shared = cluster()
    a = await node_factory(**shared)
    b = await node_factory(**shared)
    tabs = []
    for i in range(10):
        ws = await connect(http, a if i % 2 else b, "grace")
        assert (await recv_json(ws))["type"] == "welcome"
        tabs.append(ws)
    other = await connect(http, a, "heidi")  # another user is not affected
    assert (await recv_json(other))["type"] == "welcome"

    eleventh = await connect(http, a, "grace")
    code, reason = await expect_close(eleventh)
    assert code == 4029 and "at most 10 connections" in reason
    resp = await http.get(b.url + "/sse", params={"token": token("grace")})
    assert resp.status == 429
    assert (await resp.json())["error"] == "too_many_connections"
    metrics = await scrape(http, a.url)
    assert metrics['herald_limit_rejections_total{limit="connections_per_user"}'] == 1

    # One closes: there is room again (counted down on the node it was on).
    await tabs[3].close()

    async def room_again() -> bool:
        ws = await connect(http, b, "grace")
        first = await ws.receive(timeout=5)
        if first.type == aiohttp.WSMsgType.TEXT:
            tabs[3] = ws
            return True
        await ws.close()
        return False

    await wait_for(room_again, timeout=5, interval=0.1)
    for ws in [*tabs, other]:
        await ws.close()


async def test_close_oldest_closes_the_oldest_on_the_other_node(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    shared = cluster(max_connections_per_user=3, connections_policy="close-oldest")
    a = await node_factory(**shared)
    b = await node_factory(**shared)
    oldest = await connect(http, b, "ivan")
    assert (await recv_json(oldest))["type"] == "welcome"
    middle = await connect(http, a, "ivan")
    assert (await recv_json(middle))["type"] == "welcome"
    sse = SseClient(await http.get(a.url + "/sse", params={"token": token("ivan")}))
    newest = await connect(http, a, "ivan")
    assert (await recv_json(newest))["type"] == "welcome"

    code, reason = await expect_close(oldest)
    assert code == 4029 and "oldest" in reason
    # The others stay.
    for ws in (middle, newest):
        await ws.send_json({"type": "ping", "ref": "x"})
        assert (await recv_json(ws))["type"] == "pong"
    assert not sse.ended
    metrics = await scrape(http, b.url)
    assert metrics['herald_connections_closed_total{reason="replaced",transport="ws"}'] == 1
    for ws in (middle, newest):
        await ws.close()


async def test_a_burst_of_one_users_connects_on_two_nodes_admits_exactly_the_limit(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """A storm of connects at once (each count a compare-and-set, pipelined
    with the others): the limit holds exactly, and other users are admitted."""
    shared = cluster(max_connections_per_user=3)
    a = await node_factory(**shared)
    b = await node_factory(**shared)

    async def first_frame(node: RunningNode, user: str) -> tuple[aiohttp.ClientWebSocketResponse, str]:
        ws = await connect(http, node, user)
        msg = await ws.receive(timeout=10)
        return ws, ("welcome" if msg.type == aiohttp.WSMsgType.TEXT else f"closed {ws.close_code}")

    burst = [first_frame(a if i % 2 else b, "judy") for i in range(12)]
    burst += [first_frame(a if i % 2 else b, f"bystander{i}") for i in range(20)]
    outcomes = await asyncio.gather(*burst)
    judy = [what for _, what in outcomes[:12]]
    assert judy.count("welcome") == 3 and judy.count("closed 4029") == 9, judy
    assert all(what == "welcome" for _, what in outcomes[12:])
    for ws, _ in outcomes:
        await ws.close()


async def test_a_node_started_since_the_live_nodes_were_listed_counts(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """Node A lists the live nodes (kept ttl/3); node B starts after and
    admits the user: A must count B's connection (not take B for a dead
    node), and must not drop it from the user's table either."""
    shared = cluster(max_connections_per_user=1)
    a = await node_factory(**shared)
    warm = await connect(http, a, "zed")  # A lists the live nodes now
    assert (await recv_json(warm))["type"] == "welcome"
    b = await node_factory(**shared)
    first = await connect(http, b, "ann")
    assert (await recv_json(first))["type"] == "welcome"
    for node in (a, a, b):  # refused each time: B's connection is still counted
        second = await connect(http, node, "ann")
        code, reason = await expect_close(second)
        assert code == 4029 and "at most 1 connections" in reason
    for ws in (warm, first):
        await ws.close()
