"""A node whose NATS connection nats-py closes for good (any -ERR of the
server but a stale connection or a permissions violation: maximum
subscriptions or connections exceeded, ...) does not serve on without NATS:
it drains its clients (1012) and exits 1 with one line, for its service
manager to start it again with a new connection."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import aiohttp

from broker.embedded import NatsServer

from ..helpers import expect_close, token
from .test_shutdown import serve_process, stderr_of, wait_exit


async def open_user(http: aiohttp.ClientSession, base: str, user: str) -> aiohttp.ClientWebSocketResponse | None:
    """``user``'s stream, welcomed; None once the node refuses it (NATS gone)."""
    ws = await http.ws_connect(base.replace("http", "ws", 1) + "/ws", params={"token": token(user)})
    msg = await ws.receive()
    if msg.type is aiohttp.WSMsgType.TEXT and msg.json()["type"] == "welcome":
        return ws
    await ws.close()
    return None


async def test_nats_closing_the_connection_for_good_drains_and_exits_1(
    spawn: Callable[..., subprocess.Popen[bytes]], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # Each user's channel is a subscription of the node: past max_subscriptions
    # nats-server answers -ERR "maximum subscriptions exceeded", and nats-py
    # closes the connection for good (no reconnect).
    config = tmp_path / "nats.conf"
    config.write_text("max_subscriptions: 40\n")
    with NatsServer(store_dir=str(tmp_path / "js"), config_file=str(config)) as server:
        proc, base = await serve_process(spawn, server.url, http)
        first = await open_user(http, base, "u0")
        assert first is not None, stderr_of(proc)
        opened = [first]
        for n in range(1, 80):
            ws = await open_user(http, base, f"u{n}")
            if ws is None:
                break
            opened.append(ws)
        assert len(opened) < 79, stderr_of(proc)
        code, _ = await expect_close(first, timeout=10)
        assert code == 1012, stderr_of(proc)
        assert await wait_exit(proc, 15) == 1
        log = stderr_of(proc)
        assert "maximum subscriptions exceeded" in log and "Traceback" not in log, log
        # Said once as the node's error; the stream opening at that moment may name it in its 1013 line.
        errors = [line for line in log.splitlines() if " ERROR " in line]
        assert sum("closed for good" in line for line in errors) == 1, log
        for ws in opened:
            await ws.close()
