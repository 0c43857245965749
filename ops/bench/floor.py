"""Floors: what a minimal Python/uvloop server costs on this machine per
publish and per connect when it does only the work Herald's contract needs,
none of Herald's own (``make bench-floor``). What Herald costs above these
is Herald's; what they cost is Python's and asyncio's here.

    python -m ops.bench.floor [--only publish,connect] [--seconds 10] [--conns 5000] [--warmup 1]

publish: ``POST`` bodies on 10 keep-alive connections at 500 and 2,000/s (as
the ``publish-api`` scenario, each after ``--warmup`` seconds at 200/s), answered by
  - ``http``: a fixed answer, nothing else;
  - ``publish``: the answer sent on the stream's ack of a JetStream publish of
    the body, over a raw NATS protocol (callbacks only: no client library,
    task or future).
connect: WebSocket connects offered at 5,000/s (as ``connect-storm-ws``), ready
at a welcome frame sent with the 101
  - ``handshake``: at once;
  - ``connect``: after the NATS work a Herald connect needs: the user's SUB,
    its connection count read and written (compare-and-set) and its
    inbox's last message (its read position too, were the inbox not empty).
The server runs on core 0, nats-server and the load generator on core 1;
the server's CPU is read from /proc.

A third floor is a server of the bench itself (``--servers floor``, in the
``fanout-*-http`` scenarios, beside Herald and nchan in the same run):
``--serve fanout`` keeps WebSocket connections and SSE streams per room and
writes each ``POST /pub/<room>`` body, framed once, to every one of them —
what a fan-out costs in Python and uvloop without a broker in the path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, cast

import nats
import uvloop
from nats.js.api import StorageType, StreamConfig

from broker.embedded import NatsServer, free_port, wait_for_port
from gateway.frames import ws_frame
from ops.loadtest.procstat import live_cpu_seconds
from ops.loadtest.publisher import HttpPublisher
from ops.loadtest.wsproto import accept_value

from .procs import CoreSampler, Processes, pinned

SERVER_CORES, OTHER_CORES = "0", "1"
ANSWER = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{"id":"1"}'
WELCOME = b'{"type":"welcome","conn":"c","user":"u","node":"floor","channels":[]}'
STREAM, COUNTS = "FLOOR", "KV_FLOOR"  # messages; one value per key, as a KV bucket
MODES = {"publish": ("http", "publish"), "connect": ("handshake", "connect")}
SERVED = ("fanout",)  # modes only the bench runs (``--servers floor``)
WS_HEAD = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
)
# A close-delimited body, as Herald's: events go out as they are, no chunk framing.
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n"


def header(head: bytes, name: bytes) -> bytes:
    """The value of header ``name`` (lower case, with its colon) in a request
    head, b"" if it has none: the one header each floor needs, nothing checked."""
    for line in head.split(b"\r\n")[1:]:
        if line[: len(name)].lower() == name:
            return line[len(name) :].strip()
    return b""


class NatsLine(asyncio.Protocol):
    """The NATS protocol by hand: requests whose replies call back, writes
    gathered into one per loop pass."""

    def __init__(self) -> None:
        self.ready = asyncio.get_running_loop().create_future()
        self._buffer = b""
        self._waiting: dict[bytes, Callable[[bytes], None]] = {}
        self._ids = 0
        self._out: list[bytes] = []
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        hello = b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\n'
        self._transport.write(hello + b"SUB _R.* 1\r\nPING\r\n")

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\r\n")) >= 0:
            line = self._buffer[:end]
            if line.startswith((b"MSG ", b"HMSG ")):
                words = line.split()
                start = end + 2
                if len(self._buffer) < start + int(words[-1]) + 2:
                    return
                payload = self._buffer[start : start + int(words[-1])]
                self._buffer = self._buffer[start + len(payload) + 2 :]
                answer = self._waiting.pop(words[1], None)
                if answer is not None:
                    answer(payload)
                continue
            self._buffer = self._buffer[end + 2 :]
            if line == b"PING":
                self._send(b"PONG\r\n")
            elif line == b"PONG" and not self.ready.done():
                self.ready.set_result(None)

    def request(self, subject: bytes, body: bytes, answer: Callable[[bytes], None], head: bytes = b"") -> None:
        self._ids += 1
        reply = b"_R.%d" % self._ids
        self._waiting[reply] = answer
        if head:
            block = b"NATS/1.0\r\n%s\r\n" % head
            self._send(
                b"HPUB %s %s %d %d\r\n%s%s\r\n" % (subject, reply, len(block), len(block) + len(body), block, body)
            )
        else:
            self._send(b"PUB %s %s %d\r\n%s\r\n" % (subject, reply, len(body), body))

    def subscribe(self, subject: bytes) -> None:
        self._ids += 1
        self._send(b"SUB %s %d\r\n" % (subject, self._ids + 1_000_000))

    def _send(self, command: bytes) -> None:
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(command)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._transport is not None:
            self._transport.writelines(out)


class HttpFloor(asyncio.Protocol):
    """Requests with a Content-Length body; each answered (``publish``: on its ack)."""

    nats: NatsLine | None = None

    def __init__(self) -> None:
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            length = int(header(self._buffer[:end], b"content-length:") or 0)
            if len(self._buffer) < end + 4 + length:
                return
            body, self._buffer = self._buffer[end + 4 : end + 4 + length], self._buffer[end + 4 + length :]
            if self.nats is None:
                self._answer(b"")
            else:
                self.nats.request(b"floor.room", body, self._answer, b"Nats-Expected-Stream: " + STREAM.encode())

    def _answer(self, _ack: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(ANSWER)


class WsFloor(asyncio.Protocol):
    """A WebSocket upgrade answered with the 101 and a welcome frame
    (``connect``: once its four replies are in)."""

    nats: NatsLine | None = None
    users = 0

    def __init__(self) -> None:
        self._buffer: bytes | None = b""
        self._answer = b""
        self._left = 0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._buffer is None:
            return  # frames from the client: not read
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        key = header(self._buffer[:end], b"sec-websocket-key:")
        self._buffer = None
        self._answer = WS_HEAD % accept_value(key.decode("latin-1")).encode() + ws_frame(WELCOME)
        nats_line = self.nats
        if nats_line is None:
            self._write_answer()
            return
        WsFloor.users += 1
        user = b"u%d" % WsFloor.users
        self._left = 3
        nats_line.subscribe(b"floor.user." + user)
        get = b"$JS.API.STREAM.MSG.GET." + COUNTS.encode()

        def counted(reply: bytes) -> None:
            self._left -= 1
            seq = json.loads(reply).get("message", {}).get("seq", 0)
            expected = b"Nats-Expected-Last-Subject-Sequence: %d" % seq
            nats_line.request(b"$KV.floor.c." + user, b"1", self._done, expected)

        def inbox(reply: bytes) -> None:
            if b'"seq"' not in reply:  # nothing sent to the user: no read position to read (as Herald)
                self._done(reply)
                return
            nats_line.request(get, b'{"last_by_subj":"$KV.floor.r.%s"}' % user, self._done)

        nats_line.request(get, b'{"last_by_subj":"$KV.floor.c.%s"}' % user, counted)
        last = b"$JS.API.STREAM.MSG.GET." + STREAM.encode()
        nats_line.request(last, b'{"last_by_subj":"floor.user.%s"}' % user, inbox)

    def _done(self, _reply: bytes) -> None:
        self._left -= 1
        if not self._left:
            self._write_answer()

    def _write_answer(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(self._answer)


class FanoutFloor(asyncio.Protocol):
    """``GET /ws?room=R`` (a WebSocket) and ``GET /sse?room=R`` (an event
    stream, close-delimited as Herald's) join room R; ``POST /pub/R`` writes its body
    to all of R's, framed once per transport, and is answered."""

    rooms: ClassVar[defaultdict[bytes, dict[asyncio.Transport, bool]]] = defaultdict(dict)  # → is SSE

    def __init__(self) -> None:
        self._buffer: bytes | None = b""
        self._room = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self.rooms[self._room].pop(self._transport, None)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        if self._buffer is None:  # a stream: the load tool's clients send nothing but a close
            transport.close()
            return
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            head = self._buffer[:end]
            target = head.split(b" ", 2)[1]
            length = int(header(head, b"content-length:") or 0)
            if len(self._buffer) < end + 4 + length:
                return
            body, self._buffer = self._buffer[end + 4 : end + 4 + length], self._buffer[end + 4 + length :]
            if target.startswith(b"/pub/"):
                self._publish(target[5:], body)
                transport.write(ANSWER)
                continue
            self._buffer, self._room = None, target.partition(b"room=")[2].partition(b"&")[0]
            sse = target.startswith(b"/sse")
            if sse:
                transport.write(SSE_HEAD)
            else:
                key = header(head, b"sec-websocket-key:").decode("latin-1")
                transport.write(WS_HEAD % accept_value(key).encode())
            self.rooms[self._room][transport] = sse
            return

    def _publish(self, room: bytes, body: bytes) -> None:
        ws = ws_frame(body)
        sse = b"data: %s\n\n" % body
        for transport, is_sse in self.rooms[room].items():
            transport.write(sse if is_sse else ws)


async def serve(mode: str, port: int, nats_url: str) -> None:
    loop = asyncio.get_running_loop()
    if mode == "fanout":
        await loop.create_server(FanoutFloor, "127.0.0.1", port, backlog=4096)
        await asyncio.Event().wait()
    protocol: type[HttpFloor] | type[WsFloor] = HttpFloor if mode in MODES["publish"] else WsFloor
    if mode in ("publish", "connect"):
        host, nats_port = nats_url.removeprefix("nats://").split(":")
        _, line = await loop.create_connection(NatsLine, host, int(nats_port))
        await line.ready
        protocol.nats = line
    await loop.create_server(protocol, "127.0.0.1", port, backlog=4096)
    await asyncio.Event().wait()


async def make_streams(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=STREAM, subjects=["floor.>"], storage=StorageType.FILE))
    await js.add_stream(
        StreamConfig(name=COUNTS, subjects=["$KV.floor.>"], max_msgs_per_subject=1, storage=StorageType.FILE)
    )
    await nc.close()


async def publish_cost(port: int, pid: int, rate: float, seconds: float, warmup: float) -> dict[str, Any]:
    publisher = HttpPublisher([f"r{k}" for k in range(10)], 100, f"http://127.0.0.1:{port}/api/publish", {}, True)
    await publisher.start()
    await publisher.run(200, warmup)
    await publisher.drain(5)
    before = live_cpu_seconds(pid)
    sent = await publisher.run(rate, seconds)
    await publisher.drain(5)
    cost = live_cpu_seconds(pid) - before
    await publisher.close()
    return {"rate": rate, "sent": sent, "errors": dict(publisher.errors), "us_per_publish": round(1e6 * cost / sent, 1)}


def storm_cost(procs: Processes, port: int, pid: int, nats_pid: int, conns: int, logs: Path) -> dict[str, Any]:
    out = logs / f"storm-{port}.json"
    cmd = [sys.executable, "-m", "ops.loadtest", "--storm", "--transport", "ws"]
    cmd += ["--url", f"ws://127.0.0.1:{port}/ws?token={{token}}&room={{room}}", "--conns", str(conns)]
    cmd += ["--connect-rate", "5000", "--jwt-secret", "x" * 32, "--json", str(out), "--server-pid", str(pid)]
    cmd += ["--aux-pid", str(nats_pid)]
    cores = CoreSampler(0.1)  # is the other core (nats-server and the generator) the limit?
    cores.start()
    try:
        root = Path(__file__).resolve().parents[2]
        procs.spawn(pinned(OTHER_CORES, cmd), logs / "generator.log", cwd=root).wait()
    finally:
        cores.stop()
    storm = json.loads(out.read_text())["storm"]
    return {
        "connected": storm["connected"],
        "admitted_per_s": storm["admitted_per_s"],
        "ready_p99_ms": storm["handshake_ms"]["p99"],
        "us_per_connect": storm["server"]["us_per_connect"],
        "nats_us_per_connect": storm["aux"]["us_per_connect"],
        "generator_cpu_pct": storm["generator_cpu_max"],
        "cores_busy_pct": cores.busy_pct(*storm["window"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="publish,connect", help="publish, connect or both")
    parser.add_argument("--seconds", type=float, default=10.0, help="each publish step")
    parser.add_argument("--conns", type=int, default=5000, help="connects per storm (offered at 5,000/s)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds at 200/s before each publish step")
    served = [*(m for pair in MODES.values() for m in pair), *SERVED]
    parser.add_argument("--serve", choices=served, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--nats", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        uvloop.run(serve(args.serve, args.port, args.nats))
        return 0
    procs, logs = Processes(), Path(tempfile.mkdtemp(prefix="herald-floor-"))
    nats_server = NatsServer()
    results: dict[str, Any] = {}
    try:
        nats_proc = procs.spawn(pinned(OTHER_CORES, nats_server.command()), logs / "nats.log")
        if not wait_for_port("127.0.0.1", nats_server.port, 15):
            raise SystemExit("nats-server did not start")
        asyncio.run(make_streams(nats_server.url))
        for kind in args.only.split(","):
            for mode in MODES[kind]:
                port = free_port()
                cmd = [sys.executable, "-m", "ops.bench.floor", "--serve", mode, "--port", str(port)]
                server = procs.spawn(pinned(SERVER_CORES, [*cmd, "--nats", nats_server.url]), logs / f"{mode}.log")
                if not wait_for_port("127.0.0.1", port, 15):
                    raise SystemExit(f"the {mode} floor server did not start (see {logs})")
                if kind == "publish":
                    results[mode] = [
                        asyncio.run(publish_cost(port, server.pid, r, args.seconds, args.warmup)) for r in (500, 2000)
                    ]
                else:
                    results[mode] = storm_cost(procs, port, server.pid, nats_proc.pid, args.conns, logs)
                procs.stop(server)
                print(mode, json.dumps(results[mode]), flush=True)
    finally:
        procs.stop_all()
        nats_server.cleanup()
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
