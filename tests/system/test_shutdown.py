"""The real CLI as a process: SIGTERM drains a node (1012 to WebSockets, SSE
streams end cleanly, exit 0 within the grace even with a client that never
reads), and bad configuration fails fast with one line naming the key."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from broker.embedded import NatsServer, free_port

from ..helpers import (
    PUBLISH_HEADERS,
    PUBLISH_KEY,
    SECRET,
    RawWsClient,
    SseClient,
    cli_env,
    expect_close,
    recv_json,
    scrape,
    token,
    wait_for,
    wait_http_ok,
)

_ids = itertools.count(1)


def stderr_of(proc: subprocess.Popen[bytes]) -> str:
    return Path(proc.err_path).read_text(errors="replace")  # type: ignore[attr-defined]


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"process still running after {timeout:g}s; stderr:\n{stderr_of(proc)}")
        await asyncio.sleep(0.02)
    return proc.returncode


async def wait_ready(http: aiohttp.ClientSession, base: str, proc: subprocess.Popen[bytes]) -> None:
    try:
        await wait_http_ok(http, base + "/readyz", proc, what="node")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; stderr:\n{stderr_of(proc)}") from None


async def serve_process(
    spawn: Callable[..., subprocess.Popen[bytes]],
    nats_url: str,
    http: aiohttp.ClientSession,
    **extra: str,
) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m gateway serve`` configured only by HERALD_* (no config file),
    on a private subject prefix and stream; returns once /readyz is 200."""
    n = next(_ids)
    port = free_port()
    defaults = {
        "HERALD_NATS_URLS": nats_url,
        "HERALD_HTTP_HOST": "127.0.0.1",
        "HERALD_HTTP_PORT": str(port),
        "HERALD_JWT_SECRET": SECRET,
        "HERALD_PUBLISH_KEY": PUBLISH_KEY,
        "HERALD_SUBJECT_PREFIX": f"shut{n}x{os.getpid()}",
        "HERALD_STREAM_NAME": f"SHUT{n}X{os.getpid()}",
        "HERALD_STREAM_STORAGE": "memory",
        "HERALD_HTTP_SHUTDOWN_GRACE": "1",
        "HERALD_WS_CLOSE_TIMEOUT": "1",
    }
    env = cli_env(**{**defaults, **extra})
    proc = spawn(["serve"], env)
    base = f"http://127.0.0.1:{port}"
    await wait_ready(http, base, proc)
    return proc, base


async def open_clients(
    http: aiohttp.ClientSession, base: str, room: str
) -> tuple[aiohttp.ClientWebSocketResponse, aiohttp.ClientResponse, SseClient]:
    ws = await http.ws_connect(base.replace("http", "ws", 1) + "/ws", params=[("token", token()), ("room", room)])
    assert (await recv_json(ws))["type"] == "welcome"
    sse_resp = await http.get(base + "/sse", params=[("token", token("bob")), ("room", room)])
    assert sse_resp.status == 200
    return ws, sse_resp, SseClient(sse_resp)


async def has_connections(http: aiohttp.ClientSession, base: str, count: int) -> bool:
    metrics = await scrape(http, base)
    return metrics['herald_connections{transport="ws"}'] + metrics['herald_connections{transport="sse"}'] >= count


async def test_sigterm_drains_and_exits_despite_a_stalled_client(
    spawn: Callable[..., subprocess.Popen[bytes]], nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    proc, base = await serve_process(
        spawn,
        nats_server.url,
        http,
        # Let the stalled client's queue grow instead of being cut as a slow
        # consumer: the point is a client that is still connected at SIGTERM.
        HERALD_BACKPRESSURE_MAX_BYTES=str(64 * 1024 * 1024),
        HERALD_BACKPRESSURE_MAX_MESSAGES="100000",
    )
    ws, sse_resp, sse = await open_clients(http, base, "news")
    # A client that stops reading after its welcome: the server's buffers for it fill up.
    stalled = await RawWsClient.connect(
        base.replace("http", "ws", 1) + f"/ws?token={token('carol')}&room=lobby", rcvbuf=2048
    )
    try:
        opcode, welcome = await stalled.frame()
        assert opcode == 1 and b'"welcome"' in welcome
        await wait_for(lambda: has_connections(http, base, 3), timeout=5)
        await asyncio.sleep(0.1)  # the SUBs reach NATS
        async with http.post(
            base + "/api/publish", json={"channel": "room:news", "data": {"hi": 1}}, headers=PUBLISH_HEADERS
        ):
            pass
        assert (await recv_json(ws))["data"] == {"hi": 1}
        assert (await sse.next()).json() == {"hi": 1}

        # Fill the stalled client's socket buffers and outbound queue.
        big = {"channel": "room:lobby", "data": "x" * 48_000}
        queued = 0.0
        for _ in range(200):
            async with http.post(base + "/api/publish", json=big, headers=PUBLISH_HEADERS) as resp:
                assert resp.status == 200, await resp.text()
            queued = (await scrape(http, base))["herald_outbound_queue_bytes"]
            if queued > 256 * 1024:
                break
        assert queued > 256 * 1024, f"the stalled client's buffers did not fill ({queued:.0f} bytes queued)"
        metrics = await scrape(http, base)
        assert metrics['herald_connections{transport="ws"}'] == 2, "the stalled client must still be connected"

        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code, _ = await expect_close(ws, timeout=5)
        assert code == 1012
        events = await sse.read_to_end(timeout=5)  # raises on a broken (unterminated) body
        assert [(e.event, e.json()["code"]) for e in events] == [("close", 1012)] and sse.ended
        assert await wait_exit(proc, timeout=5) == 0
        elapsed = time.monotonic() - sent
        assert elapsed < 5.0, f"exit took {elapsed:.1f}s"
    finally:
        stalled.close()
        await ws.close()
        sse_resp.close()


async def test_sigterm_shutdown_logs_no_errors(
    spawn: Callable[..., subprocess.Popen[bytes]], nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    proc, base = await serve_process(spawn, nats_server.url, http)
    ws, sse_resp, sse = await open_clients(http, base, "lobby")
    try:
        await wait_for(lambda: has_connections(http, base, 2), timeout=5)
        proc.send_signal(signal.SIGTERM)
        assert (await expect_close(ws, timeout=5))[0] == 1012
        await sse.read_to_end(timeout=5)
        assert await wait_exit(proc, timeout=5) == 0
    finally:
        await ws.close()
        sse_resp.close()
    log = stderr_of(proc)
    assert "Traceback" not in log and " ERROR " not in log, log


async def test_sigterm_goes_unready_at_once_then_spreads_the_reconnects(
    spawn: Callable[..., subprocess.Popen[bytes]], nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    """readyz 503 (and new clients refused) during ``drain_delay``, while the
    connected ones keep their streams; then each is told when to come back, at
    a random moment within ``reconnect_spread`` (WS: the close reason; SSE: a
    ``retry:`` line before the end of the stream)."""
    proc, base = await serve_process(
        spawn,
        nats_server.url,
        http,
        HERALD_HTTP_DRAIN_DELAY="1.5",
        HERALD_HTTP_RECONNECT_SPREAD="4",
        HERALD_SSE_RETRY="9999",  # the stream's opening hint: the drain's must replace it
    )
    ws_url = base.replace("http", "ws", 1) + "/ws"
    sockets = [await http.ws_connect(ws_url, params={"token": token(f"u{i}"), "room": "lobby"}) for i in range(8)]
    sse_resp = await http.get(base + "/sse", params={"token": token("bob"), "room": "lobby"})
    sse = SseClient(sse_resp)
    try:
        for ws in sockets:
            assert (await recv_json(ws))["type"] == "welcome"
        await wait_for(lambda: has_connections(http, base, 9), timeout=5)
        proc.send_signal(signal.SIGTERM)

        async def unready() -> bool:
            async with http.get(base + "/readyz") as resp:
                return resp.status == 503

        await wait_for(unready, timeout=0.5, interval=0.02)
        # Refused before the upgrade: a load balancer passes it on to another node.
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused_ws:
            await http.ws_connect(ws_url, params={"token": token("late"), "room": "lobby"})
        assert refused_ws.value.status == 503
        async with http.get(base + "/sse", params={"token": token("late")}) as refused:
            assert refused.status == 503
        assert all(not ws.closed for ws in sockets)  # the connected ones stay during the delay

        closes = [await expect_close(ws, timeout=5) for ws in sockets]
        hints = []
        for code, reason in closes:
            assert code == 1012
            match = re.fullmatch(r"node restarting: reconnect in (\d+) ms", reason)
            assert match, reason
            hints.append(int(match[1]))
        assert all(0 <= h <= 4000 for h in hints) and len(set(hints)) > 1, hints
        events = await sse.read_to_end(timeout=5)
        assert [(e.event, e.json()["code"]) for e in events] == [("close", 1012)] and sse.ended
        assert sse.retry is not None and 0 <= sse.retry <= 4000, sse.retry
        # The close event's reason and the retry line say the same delay.
        assert events[0].json()["reason"] == f"node restarting: reconnect in {sse.retry} ms"
        assert await wait_exit(proc, timeout=5) == 0
    finally:
        for ws in sockets:
            await ws.close()
        sse_resp.close()


async def test_sigterm_exits_promptly_when_nats_does_not_answer(
    spawn: Callable[..., subprocess.Popen[bytes]], tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    server = NatsServer(port=free_port(), store_dir=str(tmp_path / "jetstream"))
    server.start()
    try:
        proc, _ = await serve_process(spawn, server.url, http)
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)  # a partition: no answers, no reset
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, timeout=5) == 0
    finally:
        server.kill()  # SIGKILL also ends a stopped process


BAD_CONFIGS = {
    "env-bad-int": ({"HERALD_HTTP_PORT": "abc"}, None, ["HERALD_HTTP_PORT", "http.port"]),
    "env-unknown": ({"HERALD_HTTP_PROT": "1"}, None, ["HERALD_HTTP_PROT"]),
    "file-unknown-key": ({}, "[http]\nprot = 8080\n", ["http.prot"]),
    "file-unknown-section": ({}, "[htp]\nport = 8080\n", ["htp"]),
    "file-bad-value": ({}, '[http]\nport = "abc"\n', ["http.port"]),
    "env-bad-public-key": (
        {"HERALD_JWT_SECRET": "", "HERALD_JWT_PUBLIC_KEY": "{tmp}/key.pem"},
        None,
        ["jwt.public_key"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_fails_fast_with_one_line(case: str, tmp_path: Path) -> None:
    extra_env, toml, expected = BAD_CONFIGS[case]
    (tmp_path / "key.pem").write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    extra_env = {k: v.replace("{tmp}", str(tmp_path)) for k, v in extra_env.items()}
    args = [sys.executable, "-m", "gateway"]
    if toml is not None:
        (tmp_path / "custom.toml").write_text(toml)
        args += ["--config", "custom.toml"]
    args.append("serve")
    base = {"HERALD_NATS_URLS": f"nats://127.0.0.1:{free_port()}", "HERALD_JWT_SECRET": SECRET}
    env = cli_env(**{**base, **extra_env})
    started = time.monotonic()
    # subprocess.run kills the child if it outlives the timeout.
    result = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=15)
    assert time.monotonic() - started < 10
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    for needle in expected:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr


async def test_a_stream_nats_refuses_stops_the_node_with_one_error(
    spawn: Callable[..., subprocess.Popen[bytes]], nats_server: NatsServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A start that fails once connected (NATS refuses to change an existing
    stream's storage) says so on one line, its NATS client closed: no
    "Event loop is closed" or pending-task noise after it."""
    n = next(_ids)
    names = {"HERALD_SUBJECT_PREFIX": f"st{n}x{os.getpid()}", "HERALD_STREAM_NAME": f"ST{n}X{os.getpid()}"}
    proc, _ = await serve_process(spawn, nats_server.url, http, **names, HERALD_STREAM_STORAGE="file")
    proc.send_signal(signal.SIGTERM)
    assert await wait_exit(proc, 10) == 0
    env = {"HERALD_NATS_URLS": nats_server.url, "HERALD_JWT_SECRET": SECRET, "HERALD_HTTP_PORT": str(free_port())}
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env=cli_env(**env, **names, HERALD_STREAM_STORAGE="memory"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    errors = [line for line in result.stderr.strip().splitlines() if " INFO " not in line]
    assert result.returncode == 1 and len(errors) == 1 and "storage" in errors[0], result.stderr[-3000:]
