"""The servers under test: Herald (+ its nats-server), the naive aiohttp loop, nginx + nchan,
and the fan-out floor (ops/bench/floor.py).

Each ``start()`` returns a Target: what the load tool needs to reach the
server (URL templates, how to publish) and which pids to measure. Every
process goes through ``Processes`` so it dies with the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from broker.embedded import NatsServer, free_port

from .procs import (
    BenchError,
    Processes,
    children,
    http_status,
    install_signal_handlers,
    pinned,
    port_open,
    wait_until,
)

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
NGINX_CONF = HERE / "nginx-nchan.conf"
NAIVE_SERVER = HERE / "naive_server.py"

JWT_SECRET = "herald-bench-secret-0123456789abcdef0123456789abcdef"
PUBLISH_KEY = "herald-bench-publish-key"
PUBLISH_HEADERS = {"Authorization": f"Bearer {PUBLISH_KEY}"}
SUBJECT_PREFIX = "herald"

NCHAN_MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/lib64/nginx/modules", "/usr/share/nginx/modules")


@dataclass(frozen=True)
class HttpPublish:
    """How a server takes publishes by HTTP POST (the same shape for every peer)."""

    url: str  # may hold {room}
    body: str  # herald | raw: the load tool's --publish-body
    headers: dict[str, str] = field(default_factory=dict)

    def args(self) -> list[str]:
        """The load tool's flags for it."""
        args = ["--publish-url", self.url, "--publish-body", self.body]
        for name, value in self.headers.items():
            args += ["--publish-header", f"{name}: {value}"]
        return args


@dataclass
class Target:
    """A running server, as the load tool sees it."""

    server: str  # herald | naive | nchan | floor (| herald-wN)
    ws_url: str
    sse_url: str
    envelope: str  # herald | raw
    publish_args: list[str]
    server_pids: list[int]
    aux_pids: list[int] = field(default_factory=list)
    jwt_secret: str | None = None
    http_publish: HttpPublish | None = None

    def http(self) -> HttpPublish:
        """How it takes publishes by HTTP POST."""
        if self.http_publish is None:
            raise BenchError(f"{self.server} takes no HTTP publishes")
        return self.http_publish

    @property
    def http_publish_args(self) -> list[str]:
        """The load tool's flags for publishing by HTTP POST."""
        return self.http().args()


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment without HERALD_* (an unknown one stops a node) and without
    proxies for loopback, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def raw_target(server: str, port: int, ws_path: str, sse_path: str, pids: list[int]) -> Target:
    """A peer that sends payloads as they are and takes them by HTTP POST /pub/<room>."""
    base = f"127.0.0.1:{port}"
    http_publish = HttpPublish(f"http://{base}/pub/{{room}}", "raw")
    return Target(
        server=server,
        ws_url=f"ws://{base}{ws_path}",
        sse_url=f"http://{base}{sse_path}",
        envelope="raw",
        publish_args=http_publish.args(),
        server_pids=pids,
        http_publish=http_publish,
    )


class Server:
    name = "server"

    def __init__(self, procs: Processes, logs: Path, cores: str | None, root: Path = ROOT) -> None:
        self.procs = procs
        self.logs = logs
        self.cores = cores
        self.root = root  # the checkout it runs from
        self._started: list[subprocess.Popen[bytes]] = []

    def start(self) -> Target:
        raise NotImplementedError

    def processes(self) -> list[subprocess.Popen[bytes]]:
        """What ``start`` launched and ``stop`` will stop."""
        return list(self._started)

    def stop(self) -> None:
        for proc in reversed(self._started):
            self.procs.stop(proc)
        self._started.clear()

    def _spawn(self, cmd: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = self.procs.spawn(pinned(self.cores, cmd), self.logs / log, env=env or child_env(), cwd=self.root)
        self._started.append(proc)
        return proc

    def _fail(self, exc: BenchError, log: str) -> BenchError:
        tail = _tail(self.logs / log)
        return BenchError(f"{self.name}: {exc}" + (f"\n--- {log} (tail) ---\n{tail}" if tail else ""))


class Herald(Server):
    """nats-server (JetStream, memory store) on ``nats_cores`` + ``python -m gateway serve``."""

    name = "herald"

    def __init__(
        self,
        procs: Processes,
        logs: Path,
        cores: str | None = "0",
        nats_cores: str | None = "1",
        workers: int = 1,
        env: dict[str, str] | None = None,
        label: str = "herald",
        root: Path = ROOT,
    ) -> None:
        super().__init__(procs, logs, cores, root)
        self.nats_cores = nats_cores
        self.workers = workers
        self.extra_env = env or {}
        self.name = label
        self._nats: NatsServer | None = None

    def start(self) -> Target:
        nats = self._nats = NatsServer()
        nats_log = f"{self.name}-nats.log"
        nats_proc = self.procs.spawn(pinned(self.nats_cores, nats.command()), self.logs / nats_log, cwd=self.root)
        self._started.append(nats_proc)
        try:
            wait_until(lambda: port_open(nats.port), 20, "nats-server", nats_proc)
        except BenchError as exc:
            raise self._fail(exc, nats_log) from None

        port = free_port()
        env = child_env(
            {
                "HERALD_NATS_URLS": nats.url,
                "HERALD_HTTP_HOST": "127.0.0.1",
                "HERALD_HTTP_PORT": str(port),
                "HERALD_NODE_ID": self.name,
                "HERALD_JWT_SECRET": JWT_SECRET,
                "HERALD_PUBLISH_KEY": PUBLISH_KEY,
                "HERALD_SUBJECT_PREFIX": SUBJECT_PREFIX,
                "HERALD_STREAM_STORAGE": "memory",
                "HERALD_LOG_LEVEL": "warning",
                **self.extra_env,
            }
        )
        cmd = [sys.executable, "-m", "gateway", "serve"]
        if self.workers > 1:
            cmd += ["--workers", str(self.workers)]
        log = f"{self.name}.log"
        proc = self._spawn(cmd, log, env)
        ready = f"http://127.0.0.1:{port}/readyz"
        try:
            # With workers, each accept lands on any of them: ask a few times.
            wait_until(lambda: all(http_status(ready) == 200 for _ in range(3 * self.workers)), 60, "readyz", proc)
            pids = [proc.pid]
            if self.workers > 1:
                wait_until(lambda: len(children(proc.pid)) >= self.workers, 10, "workers", proc)
                pids = children(proc.pid)
        except BenchError as exc:
            raise self._fail(exc, log) from None
        base = f"127.0.0.1:{port}"
        return Target(
            server=self.name,
            ws_url=f"ws://{base}/ws?token={{token}}&room={{room}}",
            sse_url=f"http://{base}/sse?token={{token}}&room={{room}}",
            envelope="herald",
            publish_args=["--publish", nats.url, "--subject", f"{SUBJECT_PREFIX}.room.{{room}}"],
            server_pids=pids,
            aux_pids=[nats_proc.pid],
            jwt_secret=JWT_SECRET,
            http_publish=HttpPublish(f"http://{base}/api/publish", "herald", PUBLISH_HEADERS),
        )

    def stop(self) -> None:
        super().stop()
        if self._nats is not None:
            self._nats.cleanup()  # the process is ours (already stopped); this removes the store
            self._nats = None


class RawServer(Server):
    """A Python server of the bench's own that speaks the raw target's URLs
    (``/ws?room=…``, ``/sse?room=…``, ``POST /pub/<room>``)."""

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def start(self) -> Target:
        port = free_port()
        log = f"{self.name}.log"
        proc = self._spawn(self.command(port), log)
        try:
            wait_until(lambda: port_open(port), 20, "listen", proc)
        except BenchError as exc:
            raise self._fail(exc, log) from None
        return raw_target(self.name, port, "/ws?room={room}", "/sse?room={room}", [proc.pid])


class Naive(RawServer):
    """ops/bench/naive_server.py: the ~40-line await-every-send baseline."""

    name = "naive"

    def command(self, port: int) -> list[str]:
        return [sys.executable, str(NAIVE_SERVER), "--port", str(port)]


class Floor(RawServer):
    """``ops.bench.floor --serve fanout``: the fan-out with nothing around it, in Python and uvloop."""

    name = "floor"

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "ops.bench.floor", "--serve", "fanout", "--port", str(port)]


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def nchan_module() -> str | None:
    for folder in NCHAN_MODULE_DIRS:
        candidate = Path(folder) / "ngx_nchan_module.so"
        if candidate.exists():
            return str(candidate)
    return None


def render_nginx_conf(port: int, module: str) -> str:
    """ops/bench/nginx-nchan.conf with our port and the module path found here."""
    text = NGINX_CONF.read_text()
    text, listens = re.subn(r"listen\s+127\.0\.0\.1:\d+", f"listen 127.0.0.1:{port}", text)
    text, loads = re.subn(r"load_module\s+\S+;", f"load_module {module};", text)
    if listens != 1 or loads != 1:
        raise BenchError(f"{NGINX_CONF}: expected one `listen 127.0.0.1:PORT` and one `load_module`")
    return text


class Nchan(Server):
    """nginx (worker_processes 1) + the nchan module, config ops/bench/nginx-nchan.conf."""

    name = "nchan"

    def __init__(self, procs: Processes, logs: Path, cores: str | None = "0") -> None:
        super().__init__(procs, logs, cores)
        self._prefix: Path | None = None

    @staticmethod
    def missing() -> str | None:
        """Why nchan cannot run here, or None."""
        if nginx_binary() is None:
            return "nginx not found (apt-get install -y nginx libnginx-mod-nchan, or `make bench-peers`)"
        if nchan_module() is None:
            return "ngx_nchan_module.so not found (apt-get install -y libnginx-mod-nchan)"
        return None

    def start(self) -> Target:
        why = self.missing()
        nginx, module = nginx_binary(), nchan_module()
        if why or nginx is None or module is None:
            raise BenchError(f"nchan: {why}")
        port = free_port()
        prefix = self._prefix = Path(tempfile.mkdtemp(prefix="herald-bench-nginx-"))
        prefix.chmod(0o755)  # the worker runs as nobody when we are root
        conf = prefix / "nginx.conf"
        conf.write_text(render_nginx_conf(port, module))
        base_cmd = [nginx, "-c", str(conf), "-p", f"{prefix}/", "-e", str(prefix / "error.log")]
        check = subprocess.run([*base_cmd, "-t"], capture_output=True, text=True, timeout=30, check=False)
        if check.returncode != 0:
            raise BenchError(f"nchan: nginx -t failed:\n{check.stderr.strip()}")
        log = "nchan.log"
        proc = self._spawn(base_cmd, log)
        try:
            wait_until(lambda: http_status(f"http://127.0.0.1:{port}/healthz") == 200, 20, "healthz", proc)
            wait_until(lambda: bool(children(proc.pid)), 10, "nginx worker", proc)
        except BenchError as exc:
            raise self._fail(exc, log) from None
        # Server CPU of the worker(s), not of the idle master.
        return raw_target(self.name, port, "/sub/{room}", "/sub/{room}", children(proc.pid))

    def stop(self) -> None:
        super().stop()
        prefix, self._prefix = self._prefix, None
        if prefix is not None:
            with contextlib.suppress(OSError):
                shutil.copyfile(prefix / "error.log", self.logs / "nginx-error.log")
            shutil.rmtree(prefix, ignore_errors=True)


def gateway_supports_workers() -> bool:
    """Whether this checkout's ``serve`` has ``--workers``."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
            env=child_env(),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--workers" in out.stdout


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def against_one_node(name: str, env: dict[str, str], job: Callable[[str, int], Coroutine[Any, Any, T]]) -> T:
    """Start nats-server and one Herald node (``make bench``'s cores), run
    ``job(base URL, node pid)`` in an event loop, stop them; its result."""
    install_signal_handlers()
    procs = Processes()
    herald = Herald(procs, Path(tempfile.mkdtemp(prefix=f"herald-bench-{name}-")), env=env)
    try:
        target = herald.start()
        base = "http://" + target.ws_url.split("//", 1)[1].split("/", 1)[0]
        return asyncio.run(job(base, target.server_pids[0]))
    finally:
        herald.stop()
        procs.stop_all()
