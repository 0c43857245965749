"""A client whose network went away without a word (a phone switching from
Wi-Fi to cellular: no FIN, no RST) leaves its stream half-open. The node's
keep-alives then go unacknowledged, and ``http.tcp_user_timeout`` has the
kernel give the connection up: the session is counted out and its user leaves
presence within about that timeout plus one keep-alive, not after the
kernel's ~15 minutes of retransmissions.

The client runs in a network namespace of its own, joined to the node's by a
veth pair. Setting its end down drops every packet the node sends (this
machine has no netem): a true half-open connection."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import aiohttp
import pytest

from ..helpers import ADMIN_KEY, NodeFactory, scrape, token

USER_TIMEOUT = 3.0
KEEPALIVE = 1.0

# Connects from inside the namespace, reads up to the welcome, says so, then
# reads on: after its link is down nothing comes, and it never closes.
CLIENT = """
import socket, sys
host, port, target = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sock = socket.create_connection((host, port), timeout=5)
sock.sendall(f"GET {target} HTTP/1.1\\r\\nHost: {host}:{port}\\r\\n\\r\\n".encode())
got = b""
while b"event: welcome" not in got:
    chunk = sock.recv(65536)
    if not chunk:
        sys.exit("the stream ended before its welcome: " + got.decode(errors="replace"))
    got += chunk
print("welcome", flush=True)
sock.settimeout(None)
while sock.recv(65536):
    pass
"""


@dataclass
class FarSide:
    """A network namespace (held by a process: it and the veth pair go with it)
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
        await _ip(*self.run("ip", "link", "set", self.link + "b", "down"))


async def _ip(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stderr=subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode:
        raise OSError(f"{' '.join(argv)}: {err.decode().strip()}")


@asynccontextmanager
async def far_side() -> AsyncIterator[FarSide]:
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("ip", "nsenter", "unshare")):
        pytest.skip("needs root and ip, nsenter, unshare (a network namespace and a veth pair)")
    n = os.getpid() % 16000  # unique among parallel test processes
    link = f"hho{n}"
    base = f"10.251.{n // 64}.{n % 64 * 4}"
    prefix = base.rsplit(".", 1)[0]
    holder = await asyncio.create_subprocess_exec("unshare", "-n", "sleep", "600", stderr=subprocess.PIPE)
    side = FarSide(holder.pid, link, f"{prefix}.{n % 64 * 4 + 1}", f"{prefix}.{n % 64 * 4 + 2}")
    try:
        await asyncio.sleep(0.1)  # unshare has made the namespace and runs sleep in it
        try:
            await _ip(
                "ip", "link", "add", link + "a", "type", "veth", "peer", "name", link + "b", "netns", str(holder.pid)
            )
        except OSError as exc:
            pytest.skip(f"cannot make a veth pair into a network namespace here: {exc}")
        await _ip("ip", "addr", "add", side.node_address + "/30", "dev", link + "a")
        await _ip("ip", "link", "set", link + "a", "up")
        await _ip(*side.run("ip", "addr", "add", side.client_address + "/30", "dev", link + "b"))
        await _ip(*side.run("ip", "link", "set", link + "b", "up"))
        yield side
    finally:
        holder.kill()
        await holder.wait()
        with suppress(OSError):  # gone with the namespace already, unless it was never moved there
            await _ip("ip", "link", "del", link + "a")


async def test_a_half_open_sse_stream_is_counted_out(node_factory: NodeFactory, http: aiohttp.ClientSession) -> None:
    async with far_side() as side:
        node = await node_factory(
            http={"host": side.node_address, "tcp_user_timeout": USER_TIMEOUT}, sse={"keepalive": KEEPALIVE}
        )
        port = node.url.rsplit(":", 1)[1]
        target = f"/sse?token={token('mo', rooms=['lobby'])}&room=lobby"
        client = await asyncio.create_subprocess_exec(
            *side.run(sys.executable, "-c", CLIENT, side.node_address, port, target), stdout=subprocess.PIPE
        )
        try:
            assert client.stdout is not None
            assert await asyncio.wait_for(client.stdout.readline(), 10) == b"welcome\n"
            assert await sse_streams(http, node.url) == 1
            assert await present(http, node.url) == ["mo"]
            await side.cut()
            loop = asyncio.get_running_loop()
            cut_at = loop.time()
            deadline = cut_at + USER_TIMEOUT + KEEPALIVE + 3
            while await sse_streams(http, node.url) and loop.time() < deadline:
                await asyncio.sleep(0.1)
            took = loop.time() - cut_at
            assert await sse_streams(http, node.url) == 0, (
                f"the half-open stream still counts {took:.1f} s after the cut"
            )
            assert took > USER_TIMEOUT - 0.5  # ended by the timeout, not by the cut itself
            assert await present(http, node.url) == []
            closed = (await scrape(http, node.url))[
                'herald_connections_closed_total{reason="heartbeat_timeout",transport="sse"}'
            ]
            assert closed == 1  # told from a client that closed: the client did not answer
        finally:
            client.kill()
            await client.wait()


async def sse_streams(http: aiohttp.ClientSession, url: str) -> float:
    return (await scrape(http, url))['herald_connections{transport="sse"}']


async def present(http: aiohttp.ClientSession, url: str) -> list[str]:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with http.get(url + "/api/presence/lobby", headers=headers) as resp:
        return list((await resp.json())["users"])
