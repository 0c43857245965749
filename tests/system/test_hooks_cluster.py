"""The webhook dispatcher on a 3-server NATS cluster (R3 file stream): the
server leading its consumer is SIGKILLed mid-delivery and comes back (the
single-server cases: tests/nats/test_hooks.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import nats
from aiohttp import web

from broker.embedded import free_port, nats_server_binary
from broker.publisher import NatsPublisher
from gateway.hooks import Dispatcher
from gateway.settings import with_overrides
from ops.cluster import NAMES, Cluster, Ports

from ..helpers import free_base, make_settings, start_node, wait_for

HOOKS = {"secret": "hook-secret-0123456789", "offline_after": 0.0, "max_backoff": 0.5, "timeout": 1.0}


async def test_losing_the_consumer_leader_mid_delivery_loses_no_webhook(tmp_path: Path) -> None:
    ports = Ports.from_base(free_base())
    cluster = Cluster(tmp_path / "cluster")
    got: list[str] = []

    async def receive(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(0.1)  # a delivery under way when the server goes
        got.append(request.headers["Herald-Delivery-Id"])
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    urls = tuple(f"nats://127.0.0.1:{p}" for p in ports.nats)
    settings = make_settings(urls[0], stream={"replicas": 3, "storage": "file"})
    settings = with_overrides(
        settings, nats={"urls": urls}, hooks={"url": f"http://127.0.0.1:{port}/hook", "concurrency": 4, **HOOKS}
    )
    sent: list[str] = []
    try:
        cluster.start_nats(ports, timeout=30)
        node = await start_node(settings)
        dispatcher = Dispatcher(settings)
        task = asyncio.create_task(dispatcher.run())
        pub = NatsPublisher(list(urls), prefix=settings.subject.prefix, stream=settings.stream.name, attempts=60)
        await pub.connect()

        async def publish(n: int) -> None:
            for i in range(n):
                sent.append(str(await pub.publish(f"user:c{i % 7}", {"n": i}, idempotency_key=uuid.uuid4().hex)))
                await asyncio.sleep(0.05)

        try:
            await wait_for(lambda: dispatcher.source.ready, timeout=30)
            await publish(40)
            await wait_for(lambda: len(got) >= 10, timeout=20)
            nc = await nats.connect(list(urls))
            try:
                info = await nc.jetstream().consumer_info(settings.stream.name, f"{settings.stream.name}_hooks")
            finally:
                await nc.close()
            assert info.cluster is not None and info.cluster.leader in NAMES
            i = NAMES.index(info.cluster.leader)
            os.kill(dict(cluster.recorded())[f"nats{i + 1}"], signal.SIGKILL)
            await publish(30)  # during the election
            env = os.environ | {"NATS_STORE_DIR": str(cluster.dir / "data" / NAMES[i])}
            cluster.spawn(f"nats{i + 1}", [nats_server_binary(), "-c", str(cluster.conf / f"{NAMES[i]}.conf")], env)
            await publish(30)
            await wait_for(lambda: set(sent) <= set(got), timeout=60, interval=0.2)
            assert dispatcher.source.ready
        finally:
            await pub.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await node.stop()
    finally:
        cluster.stop(5.0)
        await runner.cleanup()
