"""HTTP hygiene: the demo page's security headers, no CORS on the API, and no
token, key or secret in a node's log, even at debug level and under attack."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from gateway.app import PAGE_HEADERS

from ..helpers import ADMIN_KEY, PUBLISH_HEADERS, PUBLISH_KEY, SECRET, RunningNode, recv_json, spawn_cluster_node, token


async def test_the_demo_and_client_carry_security_headers(node: RunningNode, http: aiohttp.ClientSession) -> None:
    for path in ("/", "/static/herald.js", "/static/demo.css"):
        async with http.get(node.url + path) as resp:
            assert resp.status == 200
            for name, value in PAGE_HEADERS.items():
                assert resp.headers[name] == value, (path, name)
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
    csp = PAGE_HEADERS["Content-Security-Policy"]
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    async with http.get(node.url + "/healthz") as resp:
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert "Content-Security-Policy" not in resp.headers


async def test_no_cors_on_the_publish_api(node: RunningNode, http: aiohttp.ClientSession) -> None:
    evil = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    async with http.options(node.url + "/api/publish", headers=evil) as preflight:
        assert preflight.status in (403, 404, 405)
        assert not any(h.lower().startswith("access-control-") for h in preflight.headers)
    headers = {"Origin": "https://evil.example", **PUBLISH_HEADERS}
    async with http.post(node.url + "/api/publish", json={"channel": "room:a", "data": 1}, headers=headers) as resp:
        assert "Access-Control-Allow-Origin" not in resp.headers


async def test_no_secret_reaches_the_log(spawn: Any, nats_server: Any, http: aiohttp.ClientSession) -> None:
    tag = "hy" + uuid.uuid4().hex[:8]
    shared = {"subject": {"prefix": tag}, "stream": {"name": tag.upper()}}
    env = {"HERALD_LOG_LEVEL": "debug", "HERALD_PUBLISH_KEY": PUBLISH_KEY, "HERALD_LIMITS_ABUSE_STRIKES": "2"}
    proc, base = await spawn_cluster_node(spawn, http, nats_server.url, shared, **env)
    ws_url = base.replace("http", "ws", 1) + "/ws"
    good, expired = token("alice"), token("alice", ttl=-60)
    forged = token("alice") + "x"
    secrets = [good, expired, forged, SECRET, PUBLISH_KEY, ADMIN_KEY, "wrong-publish-key-0123"]

    ws = await http.ws_connect(ws_url, params={"token": good, "room": "lobby"})
    await recv_json(ws)
    await ws.send_json({"type": "refresh", "token": forged})
    await ws.send_json({"type": "refresh", "token": expired})
    for _ in range(5):
        await ws.send_json({"type": "subscribe", "room": "a.b"})
    await ws.close()
    for bad in (expired, forged):
        bad_ws = await http.ws_connect(ws_url, params={"token": bad})
        await bad_ws.receive()
        await bad_ws.close()
        async with http.get(base + "/sse", params={"token": bad}):
            pass
        async with http.get(base + "/sse", headers={"Authorization": f"Bearer {bad}"}, params={"token": good}):
            pass  # conflicting tokens
    for key in (PUBLISH_KEY, "wrong-publish-key-0123"):
        async with http.post(
            base + "/api/publish", json={"channel": "room:a", "data": 1}, headers={"Authorization": f"Bearer {key}"}
        ):
            pass
    async with http.get(base + "/api/stats", headers={"Authorization": f"Bearer {ADMIN_KEY}"}):
        pass
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    time.sleep(0.1)
    log = Path(proc.err_path).read_text(errors="replace") + Path(proc.out_path).read_text(errors="replace")
    assert "refused token" in log  # the attacks were logged, without what was sent
    leaked = [s[:16] + "…" for s in secrets if s in log]
    assert leaked == [], leaked
    for part in good.split("."):  # not even a piece of a token (its payload names the user)
        assert part not in log
