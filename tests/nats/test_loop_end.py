"""A node's event loop ends with nothing of it left pending (gateway.server._run,
as ``herald serve`` runs it). Stopped while connects waited on a NATS gone,
they were closed with the loop: each destroyed pending, and any shared wait
(a stream read, a lookup several connects asked) that failed just before left
its waiters' exceptions unread: "Task was destroyed but it is pending!" and
"Future exception was never retrieved" on stderr as the process exited."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading

import aiohttp
import pytest

from broker.embedded import NatsServer, free_port
from gateway import server

from ..helpers import PUBLISH_HEADERS, make_settings, token

CONNECTS = 200


def storm(ws_url: str, stop: threading.Event) -> None:
    """Connects resuming in the same room, again and again until ``stop``, from
    a loop of their own (the node's loop is the one under test)."""

    async def connect(i: int, http: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            try:
                params = {"token": token(f"u{i}"), "room": "lobby", "since": str(1 + i % 3)}
                async with http.ws_connect(ws_url, params=params) as ws:
                    await ws.receive(timeout=2)
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(0.05)

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            await asyncio.gather(*(connect(i, http) for i in range(CONNECTS)))

    asyncio.run(run())


def test_a_node_stopped_while_connects_wait_on_a_lost_nats_leaves_nothing_pending(
    own_nats: NatsServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "tune_gc", lambda: None)  # gc.freeze() would be this test process's
    port = free_port()
    settings = make_settings(own_nats.url, http={"port": port}, nats={"reconnect_wait": 0.2})
    stop = threading.Event()
    clients = threading.Thread(target=storm, args=(f"ws://127.0.0.1:{port}/ws", stop), daemon=True)
    loops: list[asyncio.AbstractEventLoop] = []
    storming: list[asyncio.Task[None]] = []

    async def nats_lost_mid_storm() -> None:
        try:
            async with aiohttp.ClientSession() as http:
                for n in range(120):  # more than a direct get reads: consumer reads too
                    url = f"http://127.0.0.1:{port}/api/publish"
                    async with http.post(url, json={"channel": "room:lobby", "data": n}, headers=PUBLISH_HEADERS) as r:
                        assert r.status == 200
            clients.start()
            await asyncio.sleep(1.0)
            own_nats.kill()
            await asyncio.sleep(0.3)  # connects now wait for NATS (buffered requests, shared reads)
        finally:
            signal.raise_signal(signal.SIGINT)  # the node's own handler: drain and stop

    def ready() -> None:
        loop = asyncio.get_running_loop()
        loops.append(loop)
        storming.append(loop.create_task(nats_lost_mid_storm()))

    caplog.set_level(logging.ERROR, logger="asyncio")
    try:
        assert server._run(settings, False, ready) == 0
    finally:
        stop.set()
        clients.join(10)
    assert storming and storming[0].done() and storming[0].exception() is None
    left = [t for t in asyncio.all_tasks(loops[0]) if not t.done()]
    del storming[:], loops[:]
    assert not left, [repr(t) for t in left]
    gc.collect()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not said, said
