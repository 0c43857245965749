"""A rotation of jwt.secret and publish.key by README's procedure (Rotating
secrets), with real ``herald serve`` processes restarted one at a time while
Python clients (HeraldClient, which asks ``get_token`` after a 4001) stay
connected and a backend publishes: no refused connect or publish while both
keys are taken, each client back in after the old key is dropped, and no
message lost or doubled. In-process nodes and every path: tests/nats/test_key_rotation.py."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Callable
from typing import Any

import aiohttp

from broker.embedded import NatsServer, free_port
from gateway.auth import mint_token
from gateway.client import HeraldClient

from ..helpers import SECRET, cli_env, wait_for, wait_http_ok

NEW_SECRET = "the-new-secret-that-is-long-enough-for-hs256"
OLD_KEY, NEW_KEY = "old-publish-key", "new-publish-key"
CLIENTS = 8
Spawn = Callable[..., subprocess.Popen[bytes]]


class Fleet:
    """Two nodes on fixed ports, restarted one at a time with other keys."""

    def __init__(self, spawn: Spawn, http: aiohttp.ClientSession, nats_url: str) -> None:
        self._spawn, self._http, self._nats_url = spawn, http, nats_url
        self.ports = [free_port(), free_port()]
        self.procs: list[subprocess.Popen[bytes] | None] = [None, None]
        self.prefix = f"rot{self.ports[0]}"

    async def start(self, i: int, secret: str, key: str, previous: tuple[str, str] = ("", "")) -> None:
        env = cli_env(
            HERALD_NATS_URLS=self._nats_url,
            HERALD_HTTP_PORT=str(self.ports[i]),
            HERALD_HTTP_RECONNECT_SPREAD="0.3",
            HERALD_HTTP_SHUTDOWN_GRACE="1",
            HERALD_JWT_SECRET=secret,
            HERALD_PUBLISH_KEY=key,
            HERALD_SUBJECT_PREFIX=self.prefix,
            HERALD_STREAM_NAME=self.prefix.upper(),
            HERALD_STREAM_STORAGE="memory",
        )
        if previous[0]:
            env |= {"HERALD_JWT_SECRET_PREVIOUS": previous[0], "HERALD_PUBLISH_KEY_PREVIOUS": previous[1]}
        self.procs[i] = proc = self._spawn(["serve"], env)
        await wait_http_ok(self._http, f"http://127.0.0.1:{self.ports[i]}/readyz", proc, timeout=20)

    async def roll(self, secret: str, key: str, previous: tuple[str, str] = ("", "")) -> None:
        for i, proc in enumerate(self.procs):
            assert proc is not None
            proc.send_signal(signal.SIGTERM)  # drains: its clients go to the other node
            await asyncio.to_thread(proc.wait)
            await self.start(i, secret, key, previous)


async def test_a_rolling_rotation_refuses_nothing_and_loses_nothing(
    spawn: Spawn, http: aiohttp.ClientSession, nats_server: NatsServer
) -> None:
    fleet = Fleet(spawn, http, nats_server.url)
    for i in range(2):
        await fleet.start(i, SECRET, OLD_KEY)
    urls = [f"http://127.0.0.1:{p}" for p in fleet.ports]
    issuer = {"secret": SECRET, "key": OLD_KEY, "phase": "add"}
    refused: dict[str, list[Any]] = {"connect": [], "publish": []}

    def get_token(user: str) -> Callable[[], str]:
        def new_token() -> str:  # asked after a 4001
            refused["connect"].append((issuer["phase"], user))
            return mint_token(issuer["secret"], user, ["lobby"])

        return new_token

    clients = [
        HeraldClient(
            urls[n % 2 :] + urls[: n % 2],
            token=mint_token(SECRET, f"u{n}", ["lobby"]),
            get_token=get_token(f"u{n}"),
            rooms=["lobby"],
            min_delay=0.1,
            session=http,
        )
        for n in range(CLIENTS)
    ]
    received: list[list[str]] = [[] for _ in clients]

    async def read(n: int) -> None:
        async for message in clients[n]:
            received[n].append(str(message.id))

    readers = [asyncio.create_task(read(n)) for n in range(CLIENTS)]
    published: list[str] = []
    stop = asyncio.Event()

    async def backend() -> None:
        k = 0
        while not stop.is_set():
            k += 1
            for url in (urls[k % 2], urls[(k + 1) % 2]):  # the other node when one is down, as a balancer does
                headers = {"Authorization": f"Bearer {issuer['key']}"}
                try:
                    body = {"channel": "room:lobby", "data": k}
                    async with http.post(url + "/api/publish", json=body, headers=headers) as resp:
                        answer = await resp.json(content_type=None)
                except aiohttp.ClientError:
                    continue
                if resp.status == 200:
                    published.append(str(answer["id"]))
                elif resp.status != 503:  # a draining node's
                    refused["publish"].append((issuer["phase"], resp.status, answer))
                break
            await asyncio.sleep(0.02)

    try:
        for client in clients:
            client.start()
        await wait_for(lambda: all(c.connected for c in clients), timeout=10)
        publisher = asyncio.create_task(backend())
        await fleet.roll(NEW_SECRET, NEW_KEY, previous=(SECRET, OLD_KEY))  # 1. every node takes both
        issuer.update(secret=NEW_SECRET, key=NEW_KEY, phase="switch")  # 2. issuer and backends switch
        await asyncio.sleep(0.5)
        issuer["phase"] = "drop"
        await fleet.roll(NEW_SECRET, NEW_KEY)  # 4. (3. cut short: clients still hold old tokens)
        await asyncio.sleep(0.5)
        stop.set()
        await publisher
        await wait_for(lambda: all(c.connected for c in clients), timeout=10)
        await wait_for(lambda: all(r[-1:] == published[-1:] for r in received), timeout=10)
    finally:
        for client in clients:
            await client.close()
        for reader in readers:
            reader.cancel()
    assert refused["publish"] == []
    # While both keys were taken nobody was refused; after the drop, a client that still held an
    # old-key token was refused once and came back with a new one (each is connected again).
    assert [r for r in refused["connect"] if r[0] != "drop"] == []
    assert len(refused["connect"]) == len(set(refused["connect"])) <= CLIENTS
    assert len(published) > 20
    for got in received:
        assert got == published  # every message, once, in order
