"""herald.js behind the repository's nginx (ops/nginx/herald.conf, run by the
real nginx in front of one node): what a reverse proxy in the way must not
break, on both transports.

- A stream's URL carries the token and every room: past nginx's request line
  limit (large_client_header_buffers, 8 KB: 414) and the node's (8190 bytes:
  400) the stream could never open again; rooms past it join after the
  welcome instead, and resume like the others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Browser

from ops.cluster import Ports

from ..helpers import NodeFactory, RunningNode, api_publish, free_base, token, wait_for
from .test_browser_reconnects import TIMEOUT, Gate, bounce, client_page
from .test_ops_cluster import running_nginx


@asynccontextmanager
async def behind_nginx(tmp_path: Path, node_factory: NodeFactory) -> AsyncIterator[tuple[RunningNode, RunningNode]]:
    """A node on the first upstream port of ops/nginx/herald.conf, nginx in front:
    (the node, the node as the page sees it: through nginx)."""
    ports = Ports.from_base(free_base())
    node = await node_factory(http={"port": ports.nodes[0]})
    async with running_nginx(tmp_path, ports):
        yield node, dataclasses.replace(node, url=f"http://127.0.0.1:{ports.lb}")


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_rooms_past_the_url_limit_join_after_the_welcome_and_resume(
    transport: str, tmp_path: Path, node_factory: NodeFactory, http: aiohttp.ClientSession, browser: Browser
) -> None:
    """70 rooms of 120 characters (within limits.max_subscriptions and the id rules): ~9 KB of `room=`.
    Their URL got 414 from nginx (and 400 from the node): SSE stopped (4000), WebSocket retried for ever."""
    rooms = [str(i).rjust(120, "r") for i in range(70)]
    last = rooms[-1]
    gate = Gate()
    async with (
        behind_nginx(tmp_path, node_factory) as (node, front),
        client_page(browser, front, token("uma"), transport, rooms, setup=gate.install) as page,
    ):
        session = node.node.sessions.of_user("uma")[0]
        await wait_for(lambda: {f"room:{r}" for r in rooms} <= session.channels, timeout=10)
        live = await api_publish(http, node, f"room:{last}", {"n": "live"})
        await page.wait_for_function(f"got.some((m) => m.id === '{live}')", timeout=TIMEOUT)
        away: list[str] = []

        async def publish_while_down() -> None:
            away.append(await api_publish(http, node, f"room:{last}", {"n": "while down"}))

        await bounce(page, node, gate, "uma", publish_while_down)
        await page.wait_for_function(f"got.some((m) => m.id === '{away[0]}')", timeout=TIMEOUT)
        ids = await page.evaluate(f"got.filter((m) => m.channel === 'room:{last}').map((m) => m.id)")
        assert ids == [live, away[0]], ids
        assert await page.evaluate("c.state") == "open"
