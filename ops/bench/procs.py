"""Child processes of a bench run: each in its own process group, all killed at the end.

Also the machine knobs a run needs (open-files limit, listen backlog) and small
waiting helpers. Nothing here knows about Herald, nchan or the load tool.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

# Requests to our own servers must never go through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BenchError(RuntimeError):
    """A server did not start, a tool failed: the run cannot go on."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP turned into an exception, like KeyboardInterrupt for SIGINT."""


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP unwind the stack like Ctrl-C, so every ``finally`` runs.
    SIGINT is set back to KeyboardInterrupt even when our parent ignored it
    (a non-interactive shell does that for background jobs)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)


def pinned(cores: str | None, cmd: Sequence[str]) -> list[str]:
    """``cmd`` under ``taskset -c cores`` (taskset execs, so the pid is the program's)."""
    return ["taskset", "-c", cores, *cmd] if cores else list(cmd)


class Processes:
    """Every process a run starts, each the leader of its own process group."""

    def __init__(self) -> None:
        self._live: list[subprocess.Popen[bytes]] = []
        self.hurry = False  # interrupted: short graces from now on

    def spawn(
        self,
        cmd: Sequence[str],
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        pipe_output: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in a new session (so a Ctrl-C on the terminal reaches only
        us, and we stop it). Output goes to ``log`` unless ``pipe_output``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            out.write(f"$ {' '.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipe_output else out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        self._live.append(proc)
        return proc

    def pgids(self) -> set[int]:
        """Process groups of everything still running (each leader's pid is its group id)."""
        return {p.pid for p in self._live}

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """Signal the process group, wait up to ``grace``, then SIGKILL the group.
        The group is killed even when the leader already exited (orphans)."""
        if self.hurry:
            grace = min(grace, 1.0)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if proc.poll() is None:
                os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
        if proc in self._live:
            self._live.remove(proc)

    def stop_all(self) -> None:
        """Everything still running, newest first (clients before servers)."""
        for proc in reversed(list(self._live)):
            self.stop(proc, grace=3.0)


def tee_lines(
    stream: IO[bytes],
    log: Path,
    echo: Callable[[str], None] | None,
    stamped: list[tuple[float, str]] | None = None,
) -> threading.Thread:
    """Copy ``stream`` line by line to ``log`` (and ``echo``) in a daemon thread;
    with ``stamped``, also keep each line with the monotonic time it arrived."""

    def pump() -> None:
        with open(log, "ab") as out:
            for line in iter(stream.readline, b""):
                out.write(line)
                out.flush()
                text = line.decode(errors="replace").rstrip()
                if stamped is not None:
                    stamped.append((time.monotonic(), text))
                if echo is not None:
                    echo(text)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc, all threads' lists)."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        with contextlib.suppress(OSError, ValueError):
            found += [int(c) for c in (task / "children").read_text().split()]
    if not found:  # kernels without CONFIG_PROC_CHILDREN: scan ppids
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    stat = (entry / "stat").read_text()
                    if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry.name))
    return sorted(set(found))


def wait_until(check: Callable[[], bool], timeout: float, what: str, alive: subprocess.Popen[bytes] | None) -> None:
    """Poll ``check`` until true; fail if ``alive`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if alive is not None and alive.poll() is not None:
            raise BenchError(f"{what}: process exited with {alive.returncode}")
        time.sleep(0.1)
    raise BenchError(f"{what}: not ready within {timeout:g}s")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


def http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def raise_nofile(want: int = 65536) -> tuple[int, int]:
    """Raise our soft open-files limit (inherited by every child) towards ``want``:
    to the hard limit, and the hard limit too when we may. Returns the new limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want, want
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft == resource.RLIM_INFINITY or soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class Sysctls:
    """Raise a few kernel knobs when they are writable and too low; put them back
    afterwards. Never fails the run."""

    WANT = {
        "net/core/somaxconn": 4096,
        "net/ipv4/tcp_max_syn_backlog": 4096,
    }

    def __init__(self) -> None:
        self._saved: dict[Path, str] = {}
        self.notes: list[str] = []

    def raise_all(self) -> None:
        for name, want in self.WANT.items():
            path = Path("/proc/sys") / name
            try:
                old = path.read_text().strip()
                if int(old) >= want:
                    continue
                path.write_text(str(want))
                self._saved[path] = old
                self.notes.append(f"{name.replace('/', '.')}: {old} -> {want} (restored at the end)")
            except (OSError, ValueError) as exc:
                self.notes.append(f"{name.replace('/', '.')}: left as is ({exc.__class__.__name__})")

    def restore(self) -> None:
        for path, old in self._saved.items():
            with contextlib.suppress(OSError):
                path.write_text(old)
        self._saved.clear()


CLK_TCK = os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> tuple[float, float]:
    """(user + nice + system, steal) over all CPUs, in seconds, from /proc/stat.
    irq/softirq time is left out: no process is charged for it, and on loopback
    most of it is our own traffic."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    values = [int(v) for v in fields] + [0] * 8
    return (values[0] + values[1] + values[2]) / CLK_TCK, values[7] / CLK_TCK


def _group_cpu_seconds(pgids: set[int]) -> float:
    """utime + stime of every live process in the given process groups."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_bytes()
            fields = stat[stat.rfind(b")") + 2 :].split()
            if int(fields[2]) in pgids:  # field 5 of proc(5): pgrp
                total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def _own_cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # children we have reaped (the load tool)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class CpuAudit:
    """How much CPU the rest of the machine used while we measured.

    foreign = all process CPU time on the machine (from /proc/stat) minus ours:
    this process, what we reaped, and every live process in our process groups
    (servers, nginx workers, nats-server). Processes of ours that exited and
    were reaped by someone else are missed, so it errs towards "busy".
    """

    def __init__(self, procs: Processes) -> None:
        self.procs = procs
        self._start: tuple[float, float, float, float] | None = None

    def _sample(self) -> tuple[float, float, float, float]:
        busy, steal = _busy_seconds()
        ours = _own_cpu_seconds() + _group_cpu_seconds(self.procs.pgids())
        return time.monotonic(), busy, steal, ours

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        """Since ``start``: other processes' and the hypervisor's (steal) CPU, in % of one core."""
        if self._start is None:
            return {}
        t0, busy0, steal0, ours0 = self._start
        t1, busy1, steal1, ours1 = self._sample()
        window = max(t1 - t0, 1e-3)
        foreign = max(0.0, (busy1 - busy0) - (ours1 - ours0))
        return {
            "window_s": round(window, 1),
            "foreign_cpu_pct": round(100 * foreign / window, 1),
            "steal_pct": round(100 * (steal1 - steal0) / window, 1),
        }


def wait_for_quiet(procs: Processes, max_wait: float, threshold_pct: float = 10.0) -> float:
    """Wait (up to ``max_wait`` s) for a one-second window in which other
    processes use less than ``threshold_pct`` of a core. Returns the last reading."""
    deadline = time.monotonic() + max_wait
    while True:
        audit = CpuAudit(procs)
        audit.start()
        time.sleep(1.0)
        pct = audit.stop().get("foreign_cpu_pct", 0.0)
        if pct < threshold_pct or time.monotonic() >= deadline:
            return pct


def _per_core_jiffies() -> list[tuple[int, int]]:
    """(busy, total) jiffies per CPU; busy counts irq and softirq (loopback traffic)
    but not idle or iowait."""
    cores = []
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                values = [int(v) for v in line.split()[1:]]
                total = sum(values[:8])
                cores.append((total - values[3] - values[4], total))
    return cores


class CoreSampler:
    """Samples every core's busy share in a thread, so a step's window can be
    looked up afterwards: a server pinned to a core that is 100 % busy (its own
    CPU plus the softirq work of its sockets) is saturated even when its own
    process CPU says 70 %."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.samples: list[tuple[float, list[tuple[int, int]]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                with contextlib.suppress(OSError, ValueError):
                    self.samples.append((time.monotonic(), _per_core_jiffies()))
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def busy_pct(self, t0: float, t1: float) -> list[float] | None:
        """Per-core busy % between the first sample at or after ``t0`` and the last at or before ``t1``."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return None
        (_, first), (_, last) = inside[0], inside[-1]
        out = []
        for (b0, n0), (b1, n1) in zip(first, last, strict=False):
            out.append(round(100 * (b1 - b0) / (n1 - n0), 1) if n1 > n0 else 0.0)
        return out
