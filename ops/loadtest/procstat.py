"""CPU and memory of the server under test, its helpers, and ourselves, from /proc.

Several pids are summed (nginx workers, several Herald processes); a pid that
has gone away counts as zero rather than failing the run.
"""

from __future__ import annotations

import os
import resource

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_times(pid: int) -> tuple[float, float] | None:
    """utime and stime of ``pid`` in seconds (user space, kernel), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may contain spaces and ')': fields start after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # fields 14 and 15 of proc(5)


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` in seconds, or None if it is gone."""
    times = cpu_times(pid)
    return None if times is None else times[0] + times[1]


def live_cpu_seconds(pid: int) -> float:
    """``cpu_seconds`` of a process that must still be there (a node under
    measurement): ProcessLookupError if it is gone."""
    seconds = cpu_seconds(pid)
    if seconds is None:
        raise ProcessLookupError(f"process {pid} is gone")
    return seconds


def rss_bytes(pid: int) -> int | None:
    """VmRSS of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return 0  # kernel threads and zombies have no VmRSS


def self_cpu() -> float:
    """This process's CPU seconds, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class ProcGroup:
    """A set of pids measured as one."""

    def __init__(self, pids: list[int]) -> None:
        missing = [p for p in pids if cpu_seconds(p) is None]
        if missing:
            raise ValueError(f"no such process: {', '.join(map(str, missing))}")
        self.pids = list(pids)

    def __bool__(self) -> bool:
        return bool(self.pids)

    def cpu(self) -> float:
        return self.cpu_and_kernel()[0]

    def cpu_and_kernel(self) -> tuple[float, float]:
        """``cpu()`` and, from the same reading, the kernel's share of it
        (stime): system calls and, on their way, the network stack's work
        for the sockets."""
        times = [t for t in map(cpu_times, self.pids) if t is not None]
        return sum(u + k for u, k in times), sum(k for _, k in times)

    def rss(self) -> int:
        return sum(r for r in map(rss_bytes, self.pids) if r is not None)


def raise_fd_limit(wanted: int) -> int:
    """Lift the soft open-files limit toward ``wanted`` (up to the hard limit); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return soft
