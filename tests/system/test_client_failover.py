"""The Python client and ``herald listen`` through a node's SIGKILL: with two
nodes (processes of their own), the node both are connected to is killed
while 200 messages are published to their rooms and user channel; each,
given the list of node URLs, moves to the other node, resumes, and ends with
every message once, in order per channel."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from broker.embedded import NatsServer
from broker.publisher import NatsPublisher
from gateway.client import HeraldClient

from ..helpers import cli_env, spawn_cluster_node, token, wait_for

TOTAL = 200
KILL_AT = 70  # messages published before the kill
CHANNELS = ("room:lobby", "room:side", "user")


def lines_of(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines ``herald listen`` has printed so far."""
    text = path.read_text()
    return [orjson.loads(line) for line in text.split("\n")[:-1] if line]


async def test_sigkill_of_the_node_loses_nothing_for_the_client_and_herald_listen(
    nats_server: NatsServer, spawn: Callable[..., subprocess.Popen[bytes]], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    tag = "cf" + uuid.uuid4().hex[:8]
    shared = {"subject": {"prefix": tag}, "stream": {"name": tag.upper()}}
    doomed, doomed_url = await spawn_cluster_node(spawn, http, nats_server.url, shared, HERALD_NODE_ID="doomed")
    _, survivor_url = await spawn_cluster_node(spawn, http, nats_server.url, shared, HERALD_NODE_ID="survivor")
    user = "u" + uuid.uuid4().hex[:8]
    tok = token(user, rooms=["lobby", "side"])
    urls = [doomed_url, survivor_url]

    out, err = tmp_path / "listen.out", tmp_path / "listen.err"
    args = ["listen", *CHANNELS, "--verbose", "--url", doomed_url, "--url", survivor_url]
    listener = spawn(args, cli_env(HERALD_TOKEN=tok), out, err)

    got: dict[str, list[str]] = {name: [] for name in CHANNELS}
    sent: dict[str, list[str]] = {name: [] for name in CHANNELS}

    async with HeraldClient(urls, token=tok, rooms=["lobby", "side"], min_delay=0.05, max_delay=1.0) as client:
        await client.ping()
        assert client.welcome is not None and client.welcome.node == "doomed"

        async def receive() -> None:
            async for message in client:
                assert message.id is not None
                got[message.channel].append(message.id)
                if sum(map(len, got.values())) == TOTAL:
                    return

        receiving = asyncio.create_task(receive())
        await wait_for(lambda: "connected to doomed" in err.read_text(), timeout=15)

        async with NatsPublisher([nats_server.url], tag, tag.upper(), attempts=5, backoff=0.1) as pub:
            for i in range(TOTAL):
                name = CHANNELS[i % len(CHANNELS)]
                channel = f"user:{user}" if name == "user" else name
                sent[name].append(str(await pub.publish(channel, {"i": i})))
                if i + 1 == KILL_AT:
                    doomed.send_signal(signal.SIGKILL)
                    killed = time.monotonic()
                await asyncio.sleep(0.005)

        await asyncio.wait_for(receiving, 20)
        assert client.welcome.node == "survivor"
    assert got == sent  # all 200, once, in order per channel

    def listened() -> bool:
        if listener.poll() is not None:
            raise AssertionError(f"herald listen exited with {listener.returncode}:\n{err.read_text()}")
        return len(lines_of(out)) >= TOTAL

    await wait_for(listened, timeout=20, interval=0.05)
    printed = lines_of(out)
    by_channel = {name: [line["id"] for line in printed if line["channel"] == name] for name in CHANNELS}
    assert by_channel == sent and len(printed) == TOTAL
    assert all(set(line) == {"channel", "id", "event", "data"} for line in printed)
    assert "connected to survivor" in err.read_text()
    assert time.monotonic() - killed < 25

    os.kill(listener.pid, signal.SIGINT)
    assert await asyncio.to_thread(listener.wait, 10) == 0, err.read_text()
    assert "Traceback" not in err.read_text()
