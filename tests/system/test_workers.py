"""`herald serve --workers N`: N processes share the port (SO_REUSEPORT), each
with its own NATS connection, node id and admin port; SIGTERM stops them all."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

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


def workers_env(nats_server: NatsServer, name: str) -> dict[str, str]:
    return cli_env(
        HERALD_NATS_URLS=nats_server.url,
        HERALD_HTTP_PORT=str(free_port()),
        HERALD_JWT_SECRET=SECRET,
        HERALD_SUBJECT_PREFIX=name.lower(),
        HERALD_STREAM_NAME=name,
        HERALD_STREAM_STORAGE="memory",
    )


async def started_workers(proc: subprocess.Popen[bytes], serving: bool) -> list[int]:
    """The pids of ``proc``'s two workers, once forked (``serving``: once both take connections)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            pids = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
            if len(pids) == 2 and (not serving or all(listening(pid) for pid in pids)):
                return pids
        await asyncio.sleep(0.002 if not serving else 0.05)
    raise AssertionError(f"the workers did not start: {proc.err_path.read_text()}")  # type: ignore[attr-defined]


def listening(pid: int) -> bool:
    """Whether the process holds a listening TCP socket (its node serves)."""
    inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    table = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    return any(row.split()[3] == "0A" and f"socket:[{row.split()[9]}]" in inodes for row in table)


async def exit_code(proc: subprocess.Popen[bytes], timeout: float = 15) -> int | None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return proc.poll()


@pytest.mark.parametrize("which", [0, 1])
async def test_a_worker_killed_stops_the_others_and_fails(nats_server: NatsServer, spawn, which: int) -> None:
    """Whichever worker dies (the OOM killer: SIGKILL), the parent sees it at
    once, stops the other and exits 1: systemd's Restart=on-failure starts the node again."""
    proc = spawn(["serve", "--workers", "2"], workers_env(nats_server, f"KILL{which}"))
    pids = await started_workers(proc, serving=True)
    os.kill(pids[which], signal.SIGKILL)
    assert await exit_code(proc) == 1, proc.err_path.read_text()
    assert "stopping the others" in proc.err_path.read_text()


async def test_sigterm_while_the_workers_start_stops_them_all(nats_server: NatsServer, spawn) -> None:
    proc = spawn(["serve", "--workers", "2"], workers_env(nats_server, "EARLY"))
    await started_workers(proc, serving=False)
    proc.send_signal(signal.SIGTERM)  # the workers are still connecting to NATS
    log = proc.err_path.read_text() if await exit_code(proc) is not None else "still running"
    assert proc.returncode == 0 and "Traceback" not in log, log


async def test_a_worker_that_ends_unasked_stops_the_node(nats_server: NatsServer, spawn) -> None:
    """A worker stopped on its own (SIGTERM to its pid) is not a node quietly
    serving on with one process fewer: the parent says so, stops the others and
    exits 1, so the supervisor starts the whole node again."""
    proc = spawn(["serve", "--workers", "2"], workers_env(nats_server, "UNASKED"))
    pids = await started_workers(proc, serving=True)
    os.kill(pids[0], signal.SIGTERM)
    assert await exit_code(proc) == 1, proc.err_path.read_text()
    assert "w0 exited (0): stopping the others" in proc.err_path.read_text()


async def test_an_admin_port_in_use_is_named(nats_server: NatsServer, spawn) -> None:
    """The error names the port that is taken (worker 1's admin port), not the main one."""
    env = workers_env(nats_server, "ADMINPORT")
    admin = free_ports(2)
    env.update(HERALD_ADMIN_PORT=str(admin))
    with socket.socket() as other:
        other.bind(("127.0.0.1", admin + 1))
        other.listen()
        proc = spawn(["serve", "--workers", "2"], env)
        code = await exit_code(proc)
        log = proc.err_path.read_text()
    assert code == 1, log
    assert f"cannot listen on 127.0.0.1:{admin + 1}" in log and f"127.0.0.1:{env['HERALD_HTTP_PORT']}:" not in log, log


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_a_port_already_served_is_refused(nats_server: NatsServer, spawn) -> None:
    """Another server on the port (another herald --workers: SO_REUSEPORT, same
    user) is "address in use", as it is without --workers: the workers do not
    silently join it and take a share of its clients."""
    env = workers_env(nats_server, "TAKEN")
    port = int(env["HERALD_HTTP_PORT"])
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", port))
        other.listen()
        proc = spawn(["serve", "--workers", "2"], env)
        code = await exit_code(proc)
        log = proc.err_path.read_text()
    assert code == 1, log
    assert f"cannot listen on 127.0.0.1:{port}" in log and "Traceback" not in log, log


async def test_the_workers_drain_when_their_parent_dies(nats_server: NatsServer, spawn) -> None:
    """The parent killed (SIGKILL, or a SIGHUP it does not handle): its workers
    stop too instead of serving on, orphaned, beside the node started next."""
    proc = spawn(["serve", "--workers", "2"], workers_env(nats_server, "ORPHAN"))
    pids = await started_workers(proc, serving=True)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not any(alive(pid) for pid in pids), proc.err_path.read_text()
    assert "draining" in proc.err_path.read_text()  # stopped as by SIGTERM, not killed


async def test_workers_without_an_admin_port_warn_about_metrics(nats_server: NatsServer, spawn) -> None:
    """Without [admin] port, /metrics and /api/stats on the shared port answer for
    whichever worker the kernel picked: a scrape there mixes the workers'
    counters (seen as resets). The node says so when it starts."""
    proc = spawn(["serve", "--workers", "2"], workers_env(nats_server, "NOADMIN"))
    await started_workers(proc, serving=True)
    log = proc.err_path.read_text()
    assert "admin.port" in log and "/metrics" in log, log


@pytest.mark.parametrize("case", ["past-65535", "on-the-http-port", "any-http-port"])
async def test_ports_of_the_workers_are_checked(nats_server: NatsServer, spawn, case: str) -> None:
    """Worker k's admin port is admin.port + k: worker 1's on 65536 (which
    bound a random port) or on the HTTP port is a config error naming the key,
    before any worker starts; so is http.port 0 (each worker took a random
    port of its own: none shared)."""
    env = workers_env(nats_server, case.replace("-", "").upper())
    port = int(env["HERALD_HTTP_PORT"])
    key = "http.port" if case == "any-http-port" else "admin.port"
    if case == "any-http-port":
        env.update(HERALD_HTTP_PORT="0")
    else:
        env.update(HERALD_ADMIN_PORT=str(65535 if case == "past-65535" else port - 1))
    proc = spawn(["serve", "--workers", "2"], env)
    code = await exit_code(proc, timeout=10)
    log = proc.err_path.read_text()
    assert code == 2 and key in log and "Traceback" not in log, log


async def test_each_worker_names_itself_in_its_log_lines(nats_server: NatsServer, spawn) -> None:
    """N processes write to one stderr: a warning is of use only if it says which worker had it."""
    env = workers_env(nats_server, "LOGS")
    env.update(HERALD_NODE_ID="box", HERALD_ADMIN_PORT=str(free_ports(2)))
    proc = spawn(["serve", "--workers", "2"], env)
    await started_workers(proc, serving=True)
    lines = proc.err_path.read_text().splitlines()  # the workers' only: the parent has said nothing
    assert any("created stream LOGS" in line for line in lines), lines
    assert all(line.split()[3] in ("[box-w0]", "[box-w1]") for line in lines), lines


async def test_a_stalled_worker_is_killed_and_stops_the_node(nats_server: NatsServer, spawn) -> None:
    """A worker that stalls (SIGSTOP here; a blocked event loop, a deadlock)
    keeps its SO_REUSEPORT socket, and the kernel hands it its share of new
    connections, which hang. Its loop stops telling the parent it is alive:
    past http.worker_timeout the parent says so, kills it and stops the node
    (exit 1), as for a worker that ended unasked: the supervisor restarts it."""
    env = workers_env(nats_server, "STALL")
    env.update(HERALD_HTTP_WORKER_TIMEOUT="3")
    proc = spawn(["serve", "--workers", "2"], env)
    pids = await started_workers(proc, serving=True)
    os.kill(pids[1], signal.SIGSTOP)
    try:
        assert await exit_code(proc, timeout=15) == 1, proc.err_path.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[1], signal.SIGCONT)
    log = proc.err_path.read_text()
    assert re.search(rf"worker w1 \(pid {pids[1]}\) silent for [3-9]\.\d s", log), log
    assert "w1 exited (-9): stopping the others" in log, log
    assert not alive(pids[0]) and not alive(pids[1]), log


async def test_a_worker_stalled_briefly_is_not_killed(nats_server: NatsServer, spawn) -> None:
    """A loop held for less than http.worker_timeout (a connect storm, a long
    GC pass) is busy, not failed: once it runs again the parent hears from it."""
    env = workers_env(nats_server, "BRIEF")
    env.update(HERALD_HTTP_WORKER_TIMEOUT="4")
    proc = spawn(["serve", "--workers", "2"], env)
    pids = await started_workers(proc, serving=True)
    for _ in range(2):
        os.kill(pids[1], signal.SIGSTOP)
        await asyncio.sleep(2)
        os.kill(pids[1], signal.SIGCONT)
        await asyncio.sleep(1)
    await asyncio.sleep(3)  # past the bound since the first stall began
    assert proc.poll() is None and all(alive(pid) for pid in pids), proc.err_path.read_text()
    assert "silent" not in proc.err_path.read_text()


async def test_one_node_on_a_busy_port_touches_no_nats(nats_server: NatsServer, spawn) -> None:
    """Without --workers too, a port in use is found before NATS is: a second
    node started by mistake neither creates nor updates the stream, nor says
    it is ready; one line names the port."""
    env = workers_env(nats_server, "BUSY")
    port = int(env["HERALD_HTTP_PORT"])
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen()
        proc = spawn(["serve"], env)
        code = await exit_code(proc)
        log = proc.err_path.read_text()
    assert code == 1, log
    assert f"cannot listen on 127.0.0.1:{port}" in log and "Traceback" not in log, log
    assert "stream" not in log and " ready" not in log and len(log.splitlines()) == 1, log
