"""herald.js behind the repository's nginx (ops/nginx/herald.conf, run by the
real nginx in front of one node): what a reverse proxy in the way must not
break, on both transports.

- A stream's URL carries the token and every room: past nginx's request line
  limit (large_client_header_buffers, 8 KB: 414) and the node's (8190 bytes:
  414) the stream could never open again; rooms past it join after the
  welcome instead, and resume like the others.
- Over HTTP/2 (what docs/protocol.md §4.1 tells SSE deployments to serve:
  HTTP/1.1 gives a browser 6 connections per origin, and 6 SSE tabs leave
  none for commands) more tabs than that stream and get their commands
  answered, and streams nginx cuts (a proxy_read_timeout shorter than the
  keep-alive) resume without loss or repeats.
- A node that takes connections but answers nothing (a frozen process: the
  kernel still accepts) holds a stream nginx passed it for the location's
  read timeout, an hour: the client gives the welcome `timeout` ms, then
  reconnects, and nginx passes it to a node that answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from playwright.async_api import Browser

from ops.cluster import Ports, render_nginx

from ...helpers import NodeFactory, RunningNode, api_publish, free_base, token, wait_for
from ..test_ops_cluster import running_nginx
from .test_reconnects import PAGE, TIMEOUT, Gate, bounce, client_page


@asynccontextmanager
async def behind_nginx(
    tmp_path: Path,
    node_factory: NodeFactory,
    edit: Callable[[str], str] | None = None,
    scheme: str = "http",
    upstream: int = 0,
) -> AsyncIterator[tuple[RunningNode, RunningNode]]:
    """A node on upstream port ``upstream`` of ops/nginx/herald.conf (changed by ``edit``), nginx in front:
    (the node, the node as the page sees it: through nginx)."""
    ports = Ports.from_base(free_base())
    node = await node_factory(http={"port": ports.nodes[upstream]})
    confs = render_nginx(ports)
    if edit is not None:
        confs["herald.conf"] = edit(confs["herald.conf"])
    async with running_nginx(tmp_path, ports, confs):
        yield node, dataclasses.replace(node, url=f"{scheme}://127.0.0.1:{ports.lb}")


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (the browser context ignores HTTPS errors)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_rooms_past_the_url_limit_join_after_the_welcome_and_resume(
    transport: str, tmp_path: Path, node_factory: NodeFactory, http: aiohttp.ClientSession, browser: Browser
) -> None:
    """70 rooms of 120 characters (within limits.max_subscriptions and the id rules): ~9 KB of `room=`.
    Their URL got 414 from nginx (and 400 from the node): SSE stopped (4000), WebSocket retried for ever."""
    rooms = [str(i).rjust(120, "r") for i in range(70)]
    last = rooms[-1]
    gate = Gate()
    async with (
        behind_nginx(tmp_path, node_factory) as (node, front),
        client_page(browser, front, token("uma"), transport, rooms, setup=gate.install) as page,
    ):
        session = node.node.sessions.of_user("uma")[0]
        await wait_for(lambda: {f"room:{r}" for r in rooms} <= session.channels, timeout=10)
        live = await api_publish(http, node, f"room:{last}", {"n": "live"})
        await page.wait_for_function(f"got.some((m) => m.id === '{live}')", timeout=TIMEOUT)
        away: list[str] = []

        async def publish_while_down() -> None:
            away.append(await api_publish(http, node, f"room:{last}", {"n": "while down"}))

        await bounce(page, node, gate, "uma", publish_while_down)
        await page.wait_for_function(f"got.some((m) => m.id === '{away[0]}')", timeout=TIMEOUT)
        ids = await page.evaluate(f"got.filter((m) => m.channel === 'room:{last}').map((m) => m.id)")
        assert ids == [live, away[0]], ids
        assert await page.evaluate("c.state") == "open"


TABS = 7  # one more than HTTP/1.1 gives a browser per origin (protocol §4.1)


async def test_sse_tabs_over_http2_get_commands_answered_and_resume_streams_nginx_cuts(
    tmp_path: Path, node_factory: NodeFactory, http: aiohttp.ClientSession, browser: Browser
) -> None:
    """ops/nginx/herald.conf with `listen … ssl http2` and /sse's proxy_read_timeout at 2 s (under
    sse.keepalive: nginx cuts every idle stream). Seven SSE tabs of one browser: each opens, pings, and
    gets every message of its room once, in order, across the cuts."""
    cert, key = self_signed(tmp_path / "tls")

    def http2_with_short_reads(conf: str) -> str:
        listen = conf[conf.index("    listen ") : conf.index("\n", conf.index("    listen "))]
        tls = f"{listen.rstrip(';')} ssl http2;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};"
        sse = conf.index("location = /sse")
        cut = conf[sse:].replace("proxy_read_timeout 1h;", "proxy_read_timeout 2s;", 1)
        return conf[:sse].replace(listen, tls, 1) + cut

    async with behind_nginx(tmp_path, node_factory, http2_with_short_reads, scheme="https") as (node, front):
        context = await browser.new_context(ignore_https_errors=True)
        try:
            pages = []
            for _ in range(TABS):
                page = await context.new_page()
                await page.goto(front.url + "/healthz")
                await page.evaluate(PAGE, [front.url, token("tia"), "sse", ["lobby"], {"timeout": 3000}])
                pages.append(page)
            for page in pages:
                await page.wait_for_function("c.state === 'open'", timeout=TIMEOUT)
            answers = await asyncio.gather(*(p.evaluate("c.ping().then((a) => a.type, (e) => e.code)") for p in pages))
            assert answers == ["pong"] * TABS
            hops = await pages[0].evaluate("performance.getEntriesByType('resource').map((e) => e.nextHopProtocol)")
            assert "h2" in hops, hops
            sent = []
            for n in range(3):  # each after a cut: 2.5 s of silence
                await asyncio.sleep(2.5)
                sent.append(await api_publish(http, node, "room:lobby", {"n": n}))
            for page in pages:
                await page.wait_for_function(f"got.some((m) => m.id === '{sent[-1]}')", timeout=TIMEOUT)
                assert await page.evaluate("got.map((m) => m.id)") == sent
            assert max([await p.evaluate("closes.length") for p in pages]) >= 2  # nginx did cut them
        finally:
            await context.close()


class FreezesOnce:
    """Stands on nginx's first upstream port for a node: passes connections on to it, but the first
    stream (/ws or /sse) it holds, answering nothing, as a frozen process would."""

    def __init__(self, node_port: int) -> None:
        self.node_port = node_port
        self.held: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n")
        if not self.held and head.split(b"?")[0] in (b"GET /ws", b"GET /sse"):
            self.held.append(writer)
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.node_port)
        up_writer.write(head)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_a_stream_a_frozen_node_holds_is_given_up_and_opened_again(
    transport: str, tmp_path: Path, node_factory: NodeFactory, browser: Browser
) -> None:
    """nginx passes the first stream to a node that answers nothing; /ws and /sse wait an hour for it."""
    node = await node_factory()
    ports = Ports.from_base(free_base())
    freezes = FreezesOnce(int(node.url.rsplit(":", 1)[1]))
    stand_in = await asyncio.start_server(freezes.serve, "127.0.0.1", ports.nodes[0])
    try:
        async with running_nginx(tmp_path, ports):
            front = dataclasses.replace(node, url=f"http://127.0.0.1:{ports.lb}")
            async with client_page(browser, front, token("tom"), transport, ["lobby"], timeout=2000) as page:
                assert freezes.held, "the first stream was not held"
                assert await page.evaluate("closes.length") >= 1
    finally:
        for writer in freezes.held:
            writer.close()
        stand_in.close()
