"""``herald listen``'s standard output, as scripts use it.

- A write never blocks the event loop for long: a reader that stops reading
  fills the pipe, and a blocked ``write`` would hold off the loop's signal
  handlers (SIGTERM from ``timeout`` would wait for the reader). Each chunk
  is written once the fd is writable, and at most ``PIPE_BUF`` bytes, which a
  writable pipe takes at once. The fd stays blocking: its open file is
  shared with the shell and the rest of the pipeline.
- A pipe whose reader went away (``| head -1`` done) is noticed while there
  is nothing to write: ``gone`` is called (the shell of ``$(herald listen …
  | head -1)`` waits for listen too, and the next message may never come).
"""

from __future__ import annotations

import asyncio
import os
import select
import stat
from collections.abc import Callable


class Stdout:
    """Bytes to ``fd`` from the event loop; ``gone()`` once a pipe's reader has closed it."""

    def __init__(self, fd: int, gone: Callable[[], None]) -> None:
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        mode = os.fstat(fd).st_mode
        self._pollable = not stat.S_ISREG(mode)  # a file's writes do not wait (and epoll refuses files)
        self._watched = stat.S_ISFIFO(mode)
        if self._watched:
            # The write end of a pipe is never readable: epoll reports its
            # reader's close (EPOLLERR), which asyncio hands to readers.
            self._loop.add_reader(fd, gone)

    async def write(self, data: bytes) -> None:
        """All of ``data``; raises BrokenPipeError once the reader is gone."""
        view = memoryview(data)
        while view:
            if self._pollable:
                await self._writable()
            view = view[os.write(self._fd, view[: select.PIPE_BUF]) :]

    async def _writable(self) -> None:
        if select.select([], [self._fd], [], 0)[1]:
            return
        ready: asyncio.Future[None] = self._loop.create_future()

        def writable() -> None:
            if not ready.done():
                ready.set_result(None)

        self._loop.add_writer(self._fd, writable)
        try:
            await ready
        finally:
            self._loop.remove_writer(self._fd)

    def close(self) -> None:
        if self._watched:
            self._loop.remove_reader(self._fd)
            self._watched = False
