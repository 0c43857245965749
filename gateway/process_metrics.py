"""The node process's CPU, memory and file descriptors: the ``process_*``
series of prometheus-client's ProcessCollector, read at a cost that does not
grow with the connections.

ProcessCollector counts open descriptors by listing ``/proc/self/fd``: about
2 µs a descriptor, on the event loop, on every scrape (20 ms at 10,000
connections). Linux 6.2 and later give the count as that directory's size; on
older kernels (size 0) the directory is listed as before.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

PROC = "/proc/self"


def open_fds(proc: str = PROC) -> int:
    """How many descriptors the process holds."""
    fd_dir = os.path.join(proc, "fd")
    count = os.stat(fd_dir).st_size
    return count if count > 0 else len(os.listdir(fd_dir))


class ProcessMetrics(ProcessCollector):
    """ProcessCollector's series (Linux ``/proc``; none elsewhere), with
    ``process_open_fds`` from :func:`open_fds`."""

    def __init__(self) -> None:
        super().__init__(registry=None)

    def collect(self) -> Iterator[Metric]:
        if not self._btime:  # no /proc: ProcessCollector's own test
            return
        try:
            with open(os.path.join(PROC, "stat"), "rb") as stat:
                parts = stat.read().split(b")")[-1].split()
            with open(os.path.join(PROC, "limits"), "rb") as limits:
                max_fds = next(float(line.split()[3]) for line in limits if line.startswith(b"Max open file"))
            fds = open_fds()
        except (OSError, StopIteration):
            return
        ticks = self._ticks
        yield GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.", value=float(parts[20]))
        yield GaugeMetricFamily(
            "process_resident_memory_bytes", "Resident memory size in bytes.", value=float(parts[21]) * self._pagesize
        )
        yield GaugeMetricFamily(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            value=float(parts[19]) / ticks + self._btime,
        )
        yield CounterMetricFamily(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
            value=(float(parts[11]) + float(parts[12])) / ticks,
        )
        yield GaugeMetricFamily("process_open_fds", "Number of open file descriptors.", value=fds)
        yield GaugeMetricFamily("process_max_fds", "Maximum number of open file descriptors.", value=max_fds)
