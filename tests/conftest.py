from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser

from broker.embedded import NatsServer, free_port
from gateway.node import BrokerFactory

from .browser import launch_chromium
from .helpers import RunningNode, make_settings, start_node


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One real nats-server with JetStream for the session; tests isolate
    themselves by subject prefix and stream name."""
    server = NatsServer(store_dir=str(tmp_path_factory.mktemp("jetstream")), monitor_port=free_port())
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
async def node_factory(nats_server: NatsServer) -> AsyncIterator[Callable[..., Any]]:
    """``await node_factory(ws={...}, ...)`` starts a node on a free port."""
    running: list[RunningNode] = []

    async def make(
        broker_factory: BrokerFactory | None = None, nats_url: str | None = None, **sections: dict[str, Any]
    ) -> RunningNode:
        settings = make_settings(nats_url or nats_server.url, **sections)
        node = await start_node(settings, broker_factory)
        running.append(node)
        return node

    yield make
    for node in reversed(running):
        await node.stop()


@pytest.fixture
async def node(node_factory: Callable[..., Any]) -> RunningNode:
    return await node_factory()  # type: ignore[no-any-return]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's headless chromium through playwright's async API (same loop as the nodes), closed afterwards."""
    async with launch_chromium() as launched:
        yield launched


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start ``python -m gateway ARGS`` in its own process group (cwd=tmp_path,
    stdout/stderr to files, kept as ``out_path``/``err_path`` on the process);
    the whole group — the process and any nats-server it started — is killed
    afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        args: list[str], env: dict[str, str], out: Path | None = None, err: Path | None = None
    ) -> subprocess.Popen[bytes]:
        n = len(procs)
        out = out or tmp_path / f"out{n}.txt"
        err = err or tmp_path / f"err{n}.txt"
        with open(out, "wb") as out_fh, open(err, "wb") as err_fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", *args],
                env=env,
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=out_fh,
                stderr=err_fh,
                start_new_session=True,
            )
        proc.out_path = out  # type: ignore[attr-defined]
        proc.err_path = err  # type: ignore[attr-defined]
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
