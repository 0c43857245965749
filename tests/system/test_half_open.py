"""A client whose network went away without a word (a phone switching from
Wi-Fi to cellular: no FIN, no RST) leaves its stream half-open. What the node
sends then goes unacknowledged, and ``http.tcp_user_timeout`` has the kernel
give the connection up: the session is counted out and its user leaves
presence within about that timeout plus one keep-alive, not after the
kernel's ~15 minutes of retransmissions.

The client runs in a network namespace of its own, joined to the node's by a
veth pair. Setting its end down drops every packet the node sends (this
machine has no netem): a true half-open connection."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import aiohttp
import pytest

from ..helpers import ADMIN_KEY, NodeFactory, api_publish, scrape, token, wait_for

USER_TIMEOUT = 3.0
KEEPALIVE = 1.0
_links = itertools.count()

# Connects from inside the namespace, reads up to the welcome, says so, then
# reads on: after its link is down nothing comes, and it never closes.
CLIENT = """
import socket, sys
host, port, target, upgrade = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
sock = socket.create_connection((host, port), timeout=5)
sock.sendall(f"GET {target} HTTP/1.1\\r\\nHost: {host}:{port}\\r\\n{upgrade}\\r\\n".encode())
got = b""
while b'"type":"welcome"' not in got:
    chunk = sock.recv(65536)
    if not chunk:
        sys.exit("the stream ended before its welcome: " + got.decode(errors="replace"))
    got += chunk
print("welcome", flush=True)
sock.settimeout(None)
while sock.recv(65536):
    pass
"""
WS_UPGRADE = (
    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


@dataclass
class FarSide:
    """A network namespace (held by a process: the veth pair goes with it)
    whose end of the pair is ``client_address``; the node's end is ``node_address``."""

    pid: int
    link: str
    node_address: str
    client_address: str

    def run(self, *argv: str) -> list[str]:
        """``argv`` as run inside the namespace."""
        return ["nsenter", "-t", str(self.pid), "-n", *argv]

    async def cut(self) -> None:
        """The client's link goes down: what the node sends is dropped, nothing answers."""
        await _run(*self.run("ip", "link", "set", self.link + "b", "down"))


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stderr=subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode:
        raise OSError(f"{' '.join(argv)}: {err.decode().strip()}")


@asynccontextmanager
async def far_side() -> AsyncIterator[FarSide]:
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("ip", "nsenter", "unshare")):
        pytest.skip("needs root and ip, nsenter, unshare (a network namespace and a veth pair)")
    n = (os.getpid() * 4 + next(_links)) % 16000  # unique among parallel test processes
    link = f"hho{n}"
    prefix, last = f"10.251.{n // 64}", n % 64 * 4  # a /30 of its own
    holder = await asyncio.create_subprocess_exec("unshare", "-n", "sleep", "600", stderr=subprocess.PIPE)
    side = FarSide(holder.pid, link, f"{prefix}.{last + 1}", f"{prefix}.{last + 2}")
    try:
        await asyncio.sleep(0.1)  # unshare has made the namespace and runs sleep in it
        try:
            await _run(
                "ip", "link", "add", link + "a", "type", "veth", "peer", "name", link + "b", "netns", str(holder.pid)
            )
        except OSError as exc:
            if "not permitted" in str(exc) or "not supported" in str(exc):
                pytest.skip(f"cannot make a veth pair into a network namespace here: {exc}")
            raise
        await _run("ip", "addr", "add", side.node_address + "/30", "dev", link + "a")
        await _run("ip", "link", "set", link + "a", "up")
        await _run(*side.run("ip", "addr", "add", side.client_address + "/30", "dev", link + "b"))
        await _run(*side.run("ip", "link", "set", link + "b", "up"))
        yield side
    finally:
        with suppress(OSError):  # now: a namespace dies (and takes its links) only some time after its last process
            await _run("ip", "link", "del", link + "a")
        holder.kill()
        await holder.wait()


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_a_half_open_stream_is_counted_out(
    transport: str, node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """SSE: the keep-alives go unacknowledged. WebSocket, with its heartbeat
    off (with it, the node's ping finds a silent client as well): a message."""
    async with far_side() as side:
        node = await node_factory(
            http={"host": side.node_address, "tcp_user_timeout": USER_TIMEOUT},
            sse={"keepalive": KEEPALIVE},
            ws={"heartbeat": 0},
            limits={"max_connections_per_user": 1},
        )
        port = node.url.rsplit(":", 1)[1]
        target = f"/{transport}?token={token('mo', rooms=['lobby'])}&room=lobby"
        upgrade = WS_UPGRADE if transport == "ws" else ""
        client = await asyncio.create_subprocess_exec(
            *side.run(sys.executable, "-c", CLIENT, side.node_address, port, target, upgrade), stdout=subprocess.PIPE
        )
        try:
            assert client.stdout is not None
            assert await asyncio.wait_for(client.stdout.readline(), 10) == b"welcome\n"
            assert await streams(http, node.url, transport) == 1
            assert await present(http, node.url) == ["mo"]
            assert await another_stream(http, node.url) == 429  # the user's one slot is taken
            await side.cut()
            loop = asyncio.get_running_loop()
            cut_at = loop.time()
            if transport == "ws":
                await api_publish(http, node, "room:lobby", {"text": "unanswered"})
            deadline = cut_at + USER_TIMEOUT + KEEPALIVE + 3
            while await streams(http, node.url, transport) and loop.time() < deadline:
                await asyncio.sleep(0.1)
            took = loop.time() - cut_at
            assert await streams(http, node.url, transport) == 0, f"the stream still counts {took:.1f} s after the cut"
            assert took > USER_TIMEOUT - 0.5  # ended by the timeout, not by the cut itself
            assert await present(http, node.url) == []

            async def admitted() -> bool:
                return await another_stream(http, node.url) == 200

            await wait_for(admitted, timeout=3)  # and the user's slot is free again
            closed = (await scrape(http, node.url))[
                f'herald_connections_closed_total{{reason="heartbeat_timeout",transport="{transport}"}}'
            ]
            assert closed == 1  # told from a client that closed: the client did not answer
        finally:
            client.kill()
            await client.wait()


async def streams(http: aiohttp.ClientSession, url: str, transport: str) -> float:
    return (await scrape(http, url))[f'herald_connections{{transport="{transport}"}}']


async def another_stream(http: aiohttp.ClientSession, url: str) -> int:
    """The status a new stream of the same user gets (from the node's own namespace)."""
    async with http.get(url + "/sse", params={"token": token("mo")}) as resp:
        return resp.status


async def present(http: aiohttp.ClientSession, url: str) -> list[str]:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with http.get(url + "/api/presence/lobby", headers=headers) as resp:
        return list((await resp.json())["users"])
