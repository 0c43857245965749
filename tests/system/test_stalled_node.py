"""A node that stalls past ``presence.ttl`` (a VM freeze, a swap storm: here
SIGSTOP) is taken for a dead one: the others sweep its presence entries and
drop its connections from their users' counts. When it carries on with its
clients still connected, it writes both back (docs/protocol.md 11)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp

from broker.embedded import NatsServer

from ..helpers import ADMIN_KEY, NodeFactory, expect_close, recv_json, spawn_cluster_node, token

TTL = 2.0
LIMIT = 3


async def test_a_stalled_node_back_counts_its_users_again(
    nats_server: NatsServer,
    node_factory: NodeFactory,
    spawn: Callable[..., subprocess.Popen[bytes]],
    http: aiohttp.ClientSession,
) -> None:
    tag = "st" + uuid.uuid4().hex[:8]
    shared: dict[str, dict[str, Any]] = {
        "subject": {"prefix": tag},
        "stream": {"name": tag.upper(), "storage": "memory"},
    }
    limits = {"presence": {"ttl": TTL}, "limits": {"max_connections_per_user": LIMIT}}
    steady = await node_factory(**shared, **limits)
    env = {"HERALD_PRESENCE_TTL": str(TTL), "HERALD_LIMITS_MAX_CONNECTIONS_PER_USER": str(LIMIT)}
    stalling, stalling_url = await spawn_cluster_node(spawn, http, nats_server.url, shared, **env)
    tok = token("bo", rooms=["lobby"])
    held = [
        await http.ws_connect(stalling_url.replace("http", "ws", 1) + "/ws", params={"token": tok, "room": "lobby"})
        for _ in range(LIMIT)
    ]
    for ws in held:
        assert (await recv_json(ws))["type"] == "welcome"

    async def present() -> list[str]:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with http.get(steady.url + "/api/presence/lobby", headers=headers) as resp:
            return list((await resp.json())["users"])

    assert await wait_for_value(present, ["bo"])
    stalling.send_signal(signal.SIGSTOP)
    try:
        # Its liveness key expires, and a sweep of the steady node removes its entries.
        assert await wait_for_value(present, [], timeout=3 * TTL + 5)
        await asyncio.sleep(TTL)
        # Meanwhile its connections do not count: one more is let in.
        during = await http.ws_connect(steady.ws_url, params={"token": tok})
        assert (await recv_json(during))["type"] == "welcome"
    finally:
        stalling.send_signal(signal.SIGCONT)
    assert await wait_for_value(present, ["bo"], timeout=3 * TTL + 5)
    assert not any(ws.closed for ws in held)
    # LIMIT + 1 open: none more until some close (the counts are written back
    # as the presence entries are: a moment to finish).
    await asyncio.sleep(0.5)
    async with http.ws_connect(steady.ws_url, params={"token": tok}) as refused:
        assert (await expect_close(refused))[0] == 4029
    for ws in [*held, during]:
        await ws.close()


async def wait_for_value(get: Callable[[], Any], want: Any, timeout: float = 10) -> bool:
    """Whether ``await get()`` returns ``want`` within ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await get() == want:
            return True
        await asyncio.sleep(0.1)
    return False
