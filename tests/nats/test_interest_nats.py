"""One NATS subscription per channel wanted on a node, however many local
connections want it — checked on the NATS server's own monitoring endpoint."""

from __future__ import annotations

import asyncio

import aiohttp

from broker.embedded import NatsServer

from ..helpers import PUBLISH_HEADERS, RunningNode, SseClient, recv_json, scrape, token, wait_for


async def node_subjects(http: aiohttp.ClientSession, nats_server: NatsServer, node: RunningNode) -> list[str]:
    """Subjects the node's NATS connection is subscribed to, per nats-server."""
    url = f"http://127.0.0.1:{nats_server.monitor_port}/connz?subs=1&limit=1024"
    async with http.get(url) as resp:
        doc = await resp.json()
    name = f"herald-{node.settings.node.id}"
    for conn in doc["connections"]:
        if conn.get("name") == name:
            return [s for s in conn.get("subscriptions_list", []) if s.startswith(node.settings.live_prefix + ".")]
    raise AssertionError(f"no NATS connection named {name}")


async def test_many_connections_one_subscription(
    node: RunningNode, nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    live = node.settings.live_prefix
    lobby = f"{live}.room.lobby"
    sockets = []
    for i in range(8):
        ws = await http.ws_connect(node.ws_url, params={"token": token(f"u{i % 2}"), "room": "lobby"})
        assert (await recv_json(ws))["type"] == "welcome"
        sockets.append(ws)
    sse = SseClient(await http.get(node.url + "/sse", params={"token": token("u0"), "room": "lobby"}))
    assert sse.status == 200

    async def settled() -> bool:
        subjects = await node_subjects(http, nats_server, node)
        return sorted(subjects) == sorted([lobby, f"{live}.broadcast", f"{live}.user.u0", f"{live}.user.u1"])

    await wait_for(settled)
    assert (await scrape(http, node.url))["herald_channels_subscribed"] == 4
    # The first seven leave: the lobby subscription stays for the last ones.
    for ws in sockets[:7]:
        await ws.close()
    await wait_for(lambda: len(node.node.sessions) == 2)
    assert (await node_subjects(http, nats_server, node)).count(lobby) == 1
    await sockets[7].close()
    sse.response.close()
    await wait_for(lambda: not node.node.sessions)

    async def gone() -> bool:
        return await node_subjects(http, nats_server, node) == []

    await wait_for(gone)
    assert (await scrape(http, node.url))["herald_channels_subscribed"] == 0


async def test_delayed_unsubscribe_survives_a_reload(
    node_factory, nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    delay = 2.0  # wide enough that a loaded machine still checks well inside it
    node: RunningNode = await node_factory(nats={"unsubscribe_delay": delay})
    lobby = f"{node.settings.live_prefix}.room.lobby"
    ws = await http.ws_connect(node.ws_url, params={"token": token("a"), "room": "lobby"})
    await recv_json(ws)
    await ws.close()
    await wait_for(lambda: not node.node.sessions)
    left = asyncio.get_running_loop().time()
    # A page reload within the delay: the subscription was never dropped.
    assert lobby in await node_subjects(http, nats_server, node)
    ws = await http.ws_connect(node.ws_url, params={"token": token("a"), "room": "lobby"})
    await recv_json(ws)
    # Past the moment the first release would have happened: still there.
    await asyncio.sleep(max(0.0, left + delay + 0.3 - asyncio.get_running_loop().time()))
    assert lobby in await node_subjects(http, nats_server, node)
    await ws.close()
    await wait_for(lambda: not node.node.sessions)
    assert lobby in await node_subjects(http, nats_server, node)

    async def gone() -> bool:
        return lobby not in await node_subjects(http, nats_server, node)

    await wait_for(gone, timeout=delay + 4)


async def test_shared_user_subscription(node_factory, nats_server: NatsServer, http: aiohttp.ClientSession) -> None:
    """nats.user_subscriptions = shared: one wildcard subscription serves every
    user channel; each user still gets only their own messages."""
    node: RunningNode = await node_factory(nats={"user_subscriptions": "shared"})
    live = node.settings.live_prefix
    sockets = {}
    for user in ("ann", "ben", "cat", "dan"):
        ws = await http.ws_connect(node.ws_url, params={"token": token(user)})
        assert (await recv_json(ws))["type"] == "welcome"
        sockets[user] = ws
    assert sorted(await node_subjects(http, nats_server, node)) == [f"{live}.broadcast", f"{live}.user.*"]
    assert (await scrape(http, node.url))["herald_channels_subscribed"] == 2
    for user in ("ben", "dan", "nobody-here"):
        async with http.post(
            node.url + "/api/publish", json={"channel": f"user:{user}", "data": user}, headers=PUBLISH_HEADERS
        ) as r:
            assert r.status == 200
    for user in ("ben", "dan"):
        frame = await recv_json(sockets[user])
        assert (frame["channel"], frame["data"]) == ("user", user)
    for user in ("ann", "cat"):  # nothing for them: their next frame answers a ping
        await sockets[user].send_json({"type": "ping"})
        assert (await recv_json(sockets[user]))["type"] == "pong"
    for ws in sockets.values():
        await ws.close()

    async def gone() -> bool:
        return await node_subjects(http, nats_server, node) == []

    await wait_for(gone)
