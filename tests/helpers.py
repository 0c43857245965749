"""Test helpers: nodes on real ports, real-socket clients, metric scraping."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import orjson
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from broker import BrokerEvents, Delivery
from broker.embedded import free_port, free_ports
from gateway.app import create_app
from gateway.auth import mint_token
from gateway.keys import NODE
from gateway.node import BrokerFactory, Node
from gateway.server import app_runner, listen
from gateway.settings import Settings, load_settings, with_overrides

VENV_BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
SECRET = "test-secret-that-is-long-enough-for-hs256!"
PUBLISH_KEY = "test-publish-key"
PUBLISH_HEADERS = {"Authorization": f"Bearer {PUBLISH_KEY}"}
ADMIN_KEY = "test-admin-key"
_ids = itertools.count(1)


def make_settings(
    nats_url: str = "nats://127.0.0.1:1", *, isolate: bool = True, **sections: dict[str, Any]
) -> Settings:
    """Test settings: a private subject prefix and stream per call (unless the
    caller passes ``subject``/``stream``), fast timings, test secrets."""
    n = next(_ids)
    base: dict[str, dict[str, Any]] = {
        "node": {"id": f"node{n}"},
        "http": {"host": "127.0.0.1", "port": 0, "shutdown_grace": 1.0},
        "nats": {"urls": (nats_url,), "unsubscribe_delay": 0.0, "connect_timeout": 3.0},
        "jwt": {"secret": SECRET},
        "publish": {"key": PUBLISH_KEY},
        "admin": {"key": ADMIN_KEY},
        "ws": {"close_timeout": 1.0},
    }
    if isolate:
        base["subject"] = {"prefix": f"t{n}"}
        base["stream"] = {"name": f"T{n}", "storage": "memory"}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return with_overrides(load_settings(env={}, use_default_file=False), **base)


def token(
    user: str = "alice",
    rooms: list[str] | None = None,
    publish: list[str] | None = None,
    ttl: float = 3600,
    key: str = SECRET,
    algorithm: str = "HS256",
    **claims: Any,
) -> str:
    return mint_token(key, user, rooms if rooms is not None else ["*"], publish or [], ttl, algorithm, **claims)


@dataclass
class RunningNode:
    settings: Settings
    runner: web.AppRunner
    url: str

    @property
    def node(self) -> Node:
        return self.runner.app[NODE]

    @property
    def ws_url(self) -> str:
        return self.url.replace("http", "ws", 1) + "/ws"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_node(settings: Settings, broker_factory: BrokerFactory | None = None) -> RunningNode:
    runner = app_runner(create_app(settings, broker_factory), settings)
    await runner.setup()
    await listen(runner, settings)
    host, port = runner.addresses[0][:2]
    return RunningNode(settings, runner, f"http://{host}:{port}")


@asynccontextmanager
async def node_maker(nats_url: str) -> AsyncIterator[NodeFactory]:
    """``await make(ws={...}, ...)`` starts a node on a free port; all are stopped on exit."""
    running: list[RunningNode] = []

    async def make(
        broker_factory: BrokerFactory | None = None, nats_url: str = nats_url, **sections: dict[str, Any]
    ) -> RunningNode:
        node = await start_node(make_settings(nats_url, **sections), broker_factory)
        running.append(node)
        return node

    try:
        yield make
    finally:
        for node in reversed(running):
            await node.stop()


def broker_events(deliver: Callable[[Delivery], None] | None = None) -> BrokerEvents:
    """Events for a broker built alone: deliveries to ``deliver``, the rest ignored."""

    def ignore(*_: object) -> None:
        pass

    async def unanswered(_: bytes) -> bytes:
        return b""

    return BrokerEvents(deliver or ignore, ignore, ignore, unanswered)


async def recv_json(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> dict[str, Any]:
    msg = await ws.receive(timeout=timeout)
    assert msg.type is aiohttp.WSMsgType.TEXT, f"expected a text frame, got {msg.type} {msg.data!r} {msg.extra!r}"
    return orjson.loads(msg.data)  # type: ignore[no-any-return]


async def recv_until(ws: aiohttp.ClientWebSocketResponse, kind: str, timeout: float = 5.0) -> dict[str, Any]:
    """Skip frames until one of type ``kind``."""
    while True:
        frame = await recv_json(ws, timeout)
        if frame["type"] == kind:
            return frame


async def expect_close(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> tuple[int | None, str]:
    """Read until the server closes; returns (close code, reason)."""
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.CLOSE:  # the frame's own code (close_code may lag)
                return int(msg.data), str(msg.extra or "")
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return ws.close_code, str(msg.extra or "")
            if msg.type is aiohttp.WSMsgType.ERROR:
                return ws.close_code, str(msg.data)


@dataclass
class SseEvent:
    event: str = "message"
    data: str = ""
    id: str | None = None
    fields: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return orjson.loads(self.data)


class SseClient:
    """Reads an event stream from a real socket and parses it per the spec.
    The stream's first event, ``welcome``, is kept in ``welcome`` rather than
    returned by ``next``; an envelope stream's ``keepalive`` events are
    counted in ``keepalives``, as comments are in ``comments``, not returned."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.status = response.status
        self.retry: int | None = None
        self.comments = 0
        self.keepalives = 0
        self.ended = False
        self.welcome: dict[str, Any] | None = None
        self.last_event_id = ""  # what an EventSource would send as Last-Event-ID now

    async def next(self, timeout: float = 5.0) -> SseEvent:
        while True:
            ev = await self._next(timeout)
            if self.welcome is None and ev.event == "welcome":
                self.welcome = ev.json()
            elif ev.event == "keepalive":
                self.keepalives += 1
            else:
                return ev

    async def _next(self, timeout: float) -> SseEvent:
        async with asyncio.timeout(timeout):
            ev = SseEvent()
            data: list[str] = []
            have = False
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    self.ended = True
                    raise EOFError("stream ended")
                line = raw.decode().rstrip("\r\n")
                if not line:
                    if ev.id is not None:
                        self.last_event_id = ev.id
                    if have:
                        ev.data = "\n".join(data)
                        return ev
                    ev = SseEvent()  # no data: no event (an id alone moves last_event_id)
                    continue
                if line.startswith(":"):
                    self.comments += 1
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    data.append(value)
                    have = True
                elif name == "event":
                    ev.event = value
                elif name == "id":
                    ev.id = value
                elif name == "retry":
                    self.retry = int(value)
                else:
                    ev.fields[name] = value

    async def read_to_end(self, timeout: float = 5.0) -> list[SseEvent]:
        events = []
        try:
            while True:
                events.append(await self.next(timeout))
        except EOFError:
            return events


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """``/metrics`` as {'name{label="v",...}': value}, labels sorted."""
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def held_now(node: Node) -> int:
    """What the node's connections hold this moment, queued and in their
    transports: each one read now (herald_outbound_queue_bytes has the
    transports' part as of their links' last tick)."""
    return sum(s.outbound.pending_bytes() for s in node.sessions)


async def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> None:
    """Poll a sync or async predicate until it is true."""
    async with asyncio.timeout(timeout):
        while True:
            result = predicate()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(interval)


async def core_publish(
    nats_url: str, subject: str, data: bytes | list[bytes], headers: dict[str, str] | None = None
) -> None:
    """Publish with plain core NATS, as any backend would. Several payloads go
    on one connection: the stream stores them in that order (publishes on
    different connections may be stored out of order, even one flushed before
    the other was sent)."""
    nc = await nats.connect(nats_url)
    try:
        for payload in [data] if isinstance(data, bytes) else data:
            await nc.publish(subject, payload, headers=headers)
        await nc.flush()
    finally:
        await nc.close()


class RawWsClient:
    """A WebSocket client on a plain socket, so a test controls reading: it can
    stop reading entirely (receive window fills) and resume later."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, url: str, rcvbuf: int = 4096) -> RawWsClient:
        import base64
        import os
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        sock = socket.socket()
        # Set before connect so the advertised window stays small.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**20)
        key = base64.b64encode(os.urandom(16)).decode()
        target = parts.path + ("?" + parts.query if parts.query else "")
        writer.write(
            (
                f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True, masked: bool = True, rsv: int = 0) -> None:
        """One client frame, built by hand (so a test can also break the rules)."""
        n = len(payload)
        head = bytes([(0x80 if fin else 0) | rsv | opcode])
        mask_bit = 0x80 if masked else 0
        if n < 126:
            head += bytes([mask_bit | n])
        elif n < 65536:
            head += bytes([mask_bit | 126]) + n.to_bytes(2, "big")
        else:
            head += bytes([mask_bit | 127]) + n.to_bytes(8, "big")
        if masked:
            key = os.urandom(4)
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
            head += key
        self.writer.write(head + payload)

    async def frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame."""
        async with asyncio.timeout(timeout):
            b1, b2 = await self.reader.readexactly(2)
            n = b2 & 0x7F
            if n == 126:
                n = int.from_bytes(await self.reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await self.reader.readexactly(8), "big")
            return b1 & 0x0F, await self.reader.readexactly(n)

    async def messages_until_close(self, timeout: float = 10.0) -> tuple[list[dict[str, Any]], int | None]:
        """Read text frames until a close frame; returns (frames, close code or None on EOF)."""
        frames: list[dict[str, Any]] = []
        try:
            while True:
                opcode, payload = await self.frame(timeout)
                if opcode == 0x8:
                    return frames, int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                if opcode == 0x1:
                    frames.append(orjson.loads(payload))
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return frames, None

    def close(self) -> None:
        self.writer.transport.abort()


def cli_env(**extra: str) -> dict[str, str]:
    """A clean environment for a CLI subprocess: no HERALD_* from the caller,
    the venv first on PATH, and this checkout's packages first on the path
    (the venv's editable install may be of another worktree)."""
    env = {
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "VIRTUAL_ENV": str(VENV_BIN.parent),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


async def api_publish(http: aiohttp.ClientSession, node: RunningNode, channel: str, data: Any) -> str:
    """Publish through the node's HTTP API; returns the id it answers."""
    async with http.post(
        node.url + "/api/publish",
        json={"channel": channel, "data": data},
        headers=PUBLISH_HEADERS,
        timeout=aiohttp.ClientTimeout(total=5),
    ) as resp:
        body = await resp.json(content_type=None)
        assert resp.status == 200, body
        return str(body["id"])


async def spawn_cluster_node(
    spawn: Any,
    http: aiohttp.ClientSession,
    nats_url: str,
    shared: dict[str, dict[str, Any]],
    port: int | None = None,
    **env: str,
) -> tuple[Any, str]:
    """``herald serve`` in its own process (so a test can SIGKILL it), in the
    cluster ``shared`` describes (subject prefix and stream, as given to
    node_factory), on ``port`` (default: a free one); returns the process and
    its base URL once it is ready."""
    port = port or free_port()
    proc = spawn(
        ["serve"],
        cli_env(
            HERALD_NATS_URLS=nats_url,
            HERALD_HTTP_PORT=str(port),
            HERALD_JWT_SECRET=SECRET,
            HERALD_ADMIN_KEY=ADMIN_KEY,
            HERALD_SUBJECT_PREFIX=shared["subject"]["prefix"],
            HERALD_STREAM_NAME=shared["stream"]["name"],
            HERALD_STREAM_STORAGE="memory",
            **env,
        ),
    )
    url = f"http://127.0.0.1:{port}"
    await wait_http_ok(http, url + "/readyz", proc, timeout=20)
    return proc, url


async def wait_http_ok(
    http: aiohttp.ClientSession, url: str, proc: Any = None, timeout: float = 15, what: str = "process"
) -> None:
    """Poll ``url`` until it answers 200; fail at once if ``proc`` (a Popen) exits."""

    async def ok() -> bool:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode} before {url} answered 200")
        try:
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    await wait_for(ok, timeout=timeout, interval=0.05)


def free_base(count: int = 13) -> int:
    """A port with ``count - 1`` free ports after it (the cluster's --base-port)."""
    return free_ports(count)


# What the node-starting fixtures hand a test (conftest.py): call it, await a node.
NodeFactory = Callable[..., Awaitable[RunningNode]]
