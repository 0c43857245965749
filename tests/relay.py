"""A TCP relay between a client and a node, on a port of its own.

``target`` may be changed at any time (a balancer sending new connections to
another node). ``freeze()`` stops the connections open now from forwarding
anything, either way, without closing them, also once the client closes its
side: what a network switch (Wi-Fi to cellular) leaves behind, a socket whose
node never gets a FIN. New connections pass.
"""

from __future__ import annotations

import asyncio


class Relay:
    def __init__(self, target: int) -> None:
        self.target = target
        self.server: asyncio.Server | None = None
        self.port = 0
        self._open: list[asyncio.Event] = []  # per connection: set while it forwards
        # Each connection's task: asyncio holds a server's handler task only weakly once its client's
        # socket is gone, and a frozen one collected would close the node's side (a FIN, not half-open).
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        """The connections open now forward nothing more, and stay open."""
        for forwarding in self._open:
            forwarding.clear()
        self._open = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        forwarding = asyncio.Event()
        forwarding.set()
        self._open.append(forwarding)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    await forwarding.wait()  # frozen: held for good
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                if forwarding.is_set():
                    w.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        finally:  # both ways done, or the relay stopped: frozen ones too are dropped
            writer.transport.abort()
            up_w.transport.abort()

    async def stop(self) -> None:
        """Stop listening, and drop every connection (frozen ones too)."""
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
