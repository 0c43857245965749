"""The watchdog of ``serve --workers``: each worker's event loop writes a byte
on a pipe of its own every second; the parent, which waits on the workers
anyway, finds one silent for longer than ``http.worker_timeout``.

A stalled worker (SIGSTOP, a busy loop, a deadlock) keeps its SO_REUSEPORT
socket, so the kernel goes on handing it its share of new connections, which
hang. The byte comes from a loop timer, not a thread: a loop that does not run
says nothing. The bound is far above what a busy loop holds (a full GC pass
< 1 s; a connect storm is many short passes) and above ``presence.ttl``, past
which the other nodes already take a silent node for dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing.connection
import os
import time
from collections.abc import Sequence
from typing import Any

BEAT_INTERVAL = 1.0


def beat(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """From now on, write a byte on ``fd`` from ``loop`` every BEAT_INTERVAL."""
    os.set_blocking(fd, False)

    def once() -> None:
        # Full pipe (the parent reads later) or none (it died: the worker is
        # told to stop by its own means): nothing to do about either here.
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(fd, b".")
        loop.call_later(BEAT_INTERVAL, once)

    loop.call_soon(once)


class Watchdog:
    """One pipe per worker, made before they are forked. ``timeout`` 0: none."""

    def __init__(self, workers: int, timeout: float) -> None:
        self.timeout = timeout
        self._pipes = [os.pipe() for _ in range(workers)] if timeout else []
        self._heard: dict[int, float] = {}  # worker index → when its loop last wrote

    def worker_end(self, index: int) -> int | None:
        """In worker ``index``, once forked: its write end (the rest is closed)."""
        if not self._pipes:
            return None
        for k, (read, write) in enumerate(self._pipes):
            os.close(read)
            if k != index:
                os.close(write)
        return self._pipes[index][1]

    def watch(self) -> None:
        """In the parent, once the workers are forked: from now on they are heard."""
        now = time.monotonic()
        for k, (read, write) in enumerate(self._pipes):
            os.close(write)
            os.set_blocking(read, False)
            self._heard[k] = now

    def wait(self, sentinels: Sequence[int]) -> list[Any]:
        """Wait for ``sentinels`` (the workers that end), hearing the workers
        meanwhile, until one of those ends or a worker may be silent too long."""
        timeout = None
        if self._heard:
            timeout = max(0.0, min(self._heard.values()) + self.timeout - time.monotonic())
        start = time.monotonic()
        ready = multiprocessing.connection.wait([*sentinels, *self._readers()], timeout)
        if timeout is not None and time.monotonic() - start > timeout + BEAT_INTERVAL:
            # This process was held itself (a frozen VM): the workers were, likely, too.
            self._heard = dict.fromkeys(self._heard, time.monotonic())
        self._hear()
        return [r for r in ready if r in sentinels]

    def silent(self) -> list[tuple[int, float]]:
        """The workers silent for longer than the bound, with for how long;
        each is named once (then no longer watched)."""
        now = time.monotonic()
        found = [(k, now - heard) for k, heard in self._heard.items() if now - heard > self.timeout]
        for k, _ in found:
            self._forget(k)
        return found

    def _readers(self) -> list[int]:
        return [self._pipes[k][0] for k in self._heard]

    def _hear(self) -> None:
        for k in list(self._heard):
            try:
                got = os.read(self._pipes[k][0], 4096)
            except BlockingIOError:
                continue
            if got:
                self._heard[k] = time.monotonic()
            else:  # the worker is gone: its end shows in its sentinel
                self._forget(k)

    def _forget(self, k: int) -> None:
        del self._heard[k]
        os.close(self._pipes[k][0])
