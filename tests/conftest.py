"""Fixtures every tier shares, and the tiers themselves.

A test's folder is its tier, and its marker (added here, so ``-m`` selects by tier):

- ``tests/unit/``: no processes (no nats-server, no subprocess of any kind); in-process
  aiohttp servers on loopback and the in-memory broker are fine. Seconds.
- ``tests/nats/``: a real nats-server (the ``nats_server`` fixture, or a test's own),
  and Herald's own CLI (``python -m gateway``) as extra nodes.
- ``tests/system/``: anything else: nginx, Prometheus/promtool, Chromium, the cluster
  (ops/cluster.py), the soak, the CLIs end to end.

``slow`` marks the few tests of minutes (the soak, the cluster failovers):
``make test PYTEST_ARGS='-m "not slow"'`` leaves them out. The guards below keep the
tiers honest: a unit test asking for ``nats_server`` fails at once, and so does a
process a test's tier does not allow.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.embedded import NatsServer, free_port, nats_server_binary

from .helpers import NodeFactory, RunningNode, node_maker

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "nats", "system")


def tier_of(item: pytest.Item) -> str:
    for tier in TIERS:
        if item.get_closest_marker(tier) is not None:
            return tier
    return "system"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            folder = item.path.resolve().relative_to(TESTS).parts[0]
        except ValueError:
            continue
        if folder not in TIERS:
            raise pytest.UsageError(
                f"{item.nodeid}: every test lives in a tier folder, tests/unit/, tests/nats/ or tests/system/"
            )
        item.add_marker(folder)
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the order tests are handed out in
        items.sort(key=_weight)


# --- pytest-xdist (make test: -n 4 --dist loadgroup) -------------------------------------------------
# The soak (minutes, mostly waiting) starts first on a worker of its own, which takes its share of
# what is left once the soak is done; the cluster failovers (a 7-process cluster and 300 clients
# each) run one at a time on another worker; the other workers take the rest, longest tiers first.

SOLO = ("tests/system/test_soak.py::",)  # a worker to itself until it is done
SERIAL = ("tests/system/test_cluster_failover.py::",)  # one unit of work: one worker, one test at a time


def _weight(item: pytest.Item) -> int:
    """A stable sort: each module's tests stay together."""
    if item.nodeid.startswith(SOLO):
        return 0
    if item.get_closest_marker("slow") is not None:
        return 1
    return 2 + TIERS[::-1].index(tier_of(item))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup`` groups by SERIAL here: pytest 9.2 ignores the node id
    suffix xdist's own loadgroup relies on (pytest-xdist issue #1386)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling  # type: ignore[import-untyped]

    class TierScheduling(LoadGroupScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            for prefix in SERIAL:
                if nodeid.startswith(prefix):
                    return prefix
            return super()._split_scope(nodeid)  # type: ignore[no-any-return]

        def _reschedule(self, node: Any) -> None:
            units = self.assigned_work.get(node, {}).values()
            soaking = any(nid.startswith(SOLO) and not done for unit in units for nid, done in unit.items())
            if soaking and not node.shutting_down:
                # A worker does not start a test before it knows the next one (or that there is
                # none), and that one waits for the soak: it is the last unit queued, a unit test
                # of milliseconds. Once the soak is done, the worker takes its share of the rest.
                if not self.workqueue:
                    node.shutdown()
                elif self._pending_of(self.assigned_work[node]) == 1:
                    self._assign_last_unit(node)
                return
            super()._reschedule(node)

        def _assign_last_unit(self, node: Any) -> None:
            self.workqueue.move_to_end(next(reversed(self.workqueue)), last=False)
            self._assign_work_unit(node)

    config.option.loadscopereorder = False  # keep the order of _weight
    return TierScheduling(config, log)


class TierViolation(AssertionError):
    """A test started a process its tier does not allow."""


def _allowed(tier: str, argv: list[str]) -> bool:
    if tier == "system":
        return True
    if tier == "unit" or not argv:
        return False
    program = os.path.basename(argv[0])
    return program == os.path.basename(nats_server_binary()) or (
        argv[0] == sys.executable and argv[1:3] == ["-m", "gateway"]
    )


@pytest.fixture(autouse=True)
def _tier_processes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Unit tests start no process at all; nats tests only nats-server and
    ``python -m gateway``. Checked where every subprocess (asyncio's too) starts."""
    tier = tier_of(request.node)
    if tier == "system":
        yield
        return
    refused: list[str] = []
    real = subprocess.Popen._execute_child  # type: ignore[attr-defined]

    def guarded(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> Any:
        argv = [os.fsdecode(args)] if isinstance(args, (str, bytes, os.PathLike)) else [os.fsdecode(a) for a in args]
        if not _allowed(tier, argv):
            refused.append(" ".join(argv))
            raise TierViolation(
                f"a {tier} test may not start {argv[0]!r}"
                + (" (no process at all)" if tier == "unit" else " (only nats-server and python -m gateway)")
                + f": move {request.node.nodeid} to the tier it needs (see tests/conftest.py)"
            )
        return real(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "_execute_child", guarded)
    yield
    call = getattr(request.node, "_tier_call_report", None)
    if refused and call is not None and call.passed:  # the TierViolation was caught and swallowed
        pytest.fail(f"{tier} test tried to start processes its tier does not allow: {refused}", pytrace=False)


def _print_tasks(_signum: int, _frame: object) -> None:
    loop = asyncio._get_running_loop()
    if loop is None:
        return
    print(f"--- {len(asyncio.all_tasks(loop))} task(s) pending before the timeout:", file=sys.stderr)
    for task in asyncio.all_tasks(loop):
        task.print_stack(file=sys.stderr)


@pytest.fixture(autouse=True)
def _tasks_before_timeout(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test (its fixtures' teardown included) about to reach pytest-timeout
    prints its event loop's pending tasks and where each waits: the thread
    stacks pytest-timeout prints show a hung loop only waiting in epoll."""
    marker = request.node.get_closest_marker("timeout")
    timeout = float(marker.args[0] if marker and marker.args else request.config.getini("timeout") or 0)
    if timeout <= 20:
        yield
        return
    signal.signal(signal.SIGUSR2, _print_tasks)
    timer = threading.Timer(timeout - 10, os.kill, (os.getpid(), signal.SIGUSR2))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item._tier_call_report = report  # type: ignore[attr-defined]
    return report


@pytest.fixture
def nats_server(request: pytest.FixtureRequest) -> NatsServer:
    """The session's nats-server (see ``nats_session_server``); refused to unit
    tests, before anything starts."""
    if tier_of(request.node) == "unit":
        pytest.fail(
            f"{request.node.nodeid} is a unit test but needs nats_server (directly or through node /"
            " node_factory): unit tests start no nats-server; move it to tests/nats/",
            pytrace=False,
        )
    return request.getfixturevalue("nats_session_server")  # type: ignore[no-any-return]


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of this test's own, on a fixed port and store so it can be
    stopped and started again (the session server must not be disturbed)."""
    server = NatsServer(port=free_port(), store_dir=str(tmp_path / "jetstream"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def nats_session_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One real nats-server with JetStream for the session; tests isolate
    themselves by subject prefix and stream name."""
    server = NatsServer(store_dir=str(tmp_path_factory.mktemp("jetstream")), monitor_port=free_port())
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
async def node_factory(nats_server: NatsServer) -> AsyncIterator[NodeFactory]:
    """``await node_factory(ws={...}, ...)`` starts a node on a free port."""
    async with node_maker(nats_server.url) as make:
        yield make


@pytest.fixture
async def node(node_factory: NodeFactory) -> RunningNode:
    return await node_factory()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


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
