"""`herald serve --workers N`: N processes share the port (SO_REUSEPORT), each
with its own NATS connection, node id and admin port; SIGTERM stops them all."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp

from broker.embedded import NatsServer, free_port, free_ports

from ..helpers import ADMIN_KEY, SECRET, cli_env, recv_json, scrape, token


async def test_two_workers_share_the_port(nats_server: NatsServer, spawn, http: aiohttp.ClientSession) -> None:
    # worker k's admin port is admin + k: two consecutive ports, below the ephemeral range (which the
    # outgoing connections of tests running alongside may take at any moment)
    port, admin = free_port(), free_ports(2)
    env = cli_env(
        HERALD_NATS_URLS=nats_server.url,
        HERALD_HTTP_PORT=str(port),
        HERALD_ADMIN_PORT=str(admin),
        HERALD_ADMIN_KEY=ADMIN_KEY,
        HERALD_JWT_SECRET=SECRET,
        HERALD_SUBJECT_PREFIX="wk",
        HERALD_STREAM_NAME="WK",
        HERALD_STREAM_STORAGE="memory",
        HERALD_NODE_ID="box",
        HERALD_HTTP_BACKLOG="123",
    )
    proc = spawn(["serve", "--workers", "2"], env)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    nodes: set[str] = set()
    deadline = time.monotonic() + 30
    while len(nodes) < 2 and time.monotonic() < deadline:
        for k in (0, 1):
            try:
                async with http.get(f"http://127.0.0.1:{admin + k}/api/stats", headers=headers) as r:
                    nodes.add((await r.json())["node"])
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
    assert nodes == {"box-w0", "box-w1"}, proc.err_path.read_text()

    # Connections are spread over both processes by the kernel.
    seen: set[str] = set()
    sockets = []
    for i in range(24):
        ws = await http.ws_connect(f"ws://127.0.0.1:{port}/ws", params={"token": token(f"u{i}")})
        seen.add((await recv_json(ws))["node"])
        sockets.append(ws)
    assert seen == {"box-w0", "box-w1"}
    # Metrics live on the admin ports only.
    async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
        assert r.status == 404
    async with http.get(f"http://127.0.0.1:{admin}/metrics") as r:
        assert r.status == 200 and "herald_connections" in await r.text()
    for k in (0, 1):  # each worker has a listening socket (and accept queue) of its own
        samples = await scrape(http, f"http://127.0.0.1:{admin + k}")
        assert samples["herald_accept_queue_limit"] == 123 and samples["herald_accept_queue"] == 0

    proc.send_signal(signal.SIGTERM)
    closes = [await ws.receive(timeout=5) for ws in sockets]
    # The close frame each client received (its own close_code may read 1006
    # if the server drops TCP before the client's close reply is sent).
    assert {(m.type, m.data) for m in closes} == {(aiohttp.WSMsgType.CLOSE, 1012)}
    deadline = time.monotonic() + 8
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert proc.returncode == 0, proc.err_path.read_text()
