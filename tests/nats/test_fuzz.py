"""Fuzzing the node's edges with hypothesis (issue "Hardening", part 1).

Each property drives a real node (real nats-server, real sockets) with
generated input and checks the answer against the public contract: the
documented ``error`` frame, close code or HTTP status with its JSON body —
never a 500, a 1011, a traceback in the logs or a dead node. After every
example a bystander WebSocket, connected in a room before the fuzzing started,
must still receive a message published through the HTTP API.

1. WebSocket text / binary frames on one long-lived connection, against an
   oracle of the command protocol (which answer, which error code, which ref).
2. WebSocket and SSE query strings (``room`` repeated, ``since``, ``token``)
   with NATS-special characters and look-alikes; and raw stream request headers.
3. ``POST /api/publish``: random bodies and headers, as raw HTTP bytes.
4. Config files: no node needed, so in tests/unit/test_fuzz.py.

Budget: ``HERALD_FUZZ_EXAMPLES`` examples per property (default 100, twice that
for the config files); ``make fuzz`` runs 5000 (tests/fuzzing.py). Examples and inputs/s per
property are printed after the run and written to artifacts/fuzz/stats.json.

The bugs these properties found are pinned by the regression tests at the
bottom.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
import logging
import re
import string
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import orjson
import pytest
import yarl
from hypothesis import event, given
from hypothesis import strategies as st

from broker.channels import check_event

from ..fuzzing import FUZZ, REPORTS, fuzz_report, one_in  # noqa: F401 - fuzz_report: autouse
from ..helpers import PUBLISH_KEY, RunningNode, api_publish, expect_close, token

# The contract's id rule (README: Channels), written out here rather than imported.
ID_RE = re.compile(r"[A-Za-z0-9_:@=+-]{1,128}")
GLOB_RE = re.compile(r"[A-Za-z0-9_:@=+*?-]{1,128}")
SEQ_RE = re.compile(r"[0-9]{1,20}")
MAX_SUBSCRIPTIONS = 40
MAX_FRAME = 65536
# Close codes documented for WebSocket clients (README: WebSocket protocol). 1011 is
# documented too, but it means the node failed: never acceptable here.
WS_CLOSE_CODES = {1000, 1009, 1012, 1013, 4000, 4001, 4003, 4008, 4029}
ANSWERS = {"ack", "error", "pong", "presence"}
ERROR_CODES = {
    "bad_frame",
    "bad_request",
    "unknown_command",
    "forbidden",
    "bad_token",
    "too_many_subscriptions",
    "rate_limited",
    "unavailable",
}
# High limits: every fuzzed frame gets its own answer instead of a rate limit.
FUZZ_LIMITS: dict[str, Any] = {
    "command_rate": 10**9,
    "publish_rate": 10**9,
    "abuse_strikes": 10**6,
    "max_connections_per_user": 10**6,
    "api_rate": 1e9,
    "max_subscriptions": MAX_SUBSCRIPTIONS,
}


def valid_id(value: object) -> bool:
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


def valid_seq(value: object) -> bool:
    """A resume / read position: digits (or, in JSON, a non-negative int) below 2**63."""
    if type(value) is int:
        return 0 <= value < 2**63
    return isinstance(value, str) and SEQ_RE.fullmatch(value) is not None and int(value) < 2**63


def glob_allows(globs: tuple[str, ...], room: str) -> bool:
    def one(pattern: str) -> bool:
        rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
        return re.fullmatch(rx, room, re.DOTALL) is not None

    return any(one(p) for p in globs)


# --------------------------------------------------------------------------- strategies

ID_CHARS = string.ascii_letters + string.digits + "_:@=+-"
# NATS token separators and wildcards, whitespace, and Unicode look-alikes of
# them: ONE DOT LEADER, FULLWIDTH ASTERISK, SMALL GREATER-THAN SIGN, FULLWIDTH
# FULL STOP, ASTERISK OPERATOR, NBSP, ZERO WIDTH SPACE, dotted I, KELVIN SIGN,
# ARABIC-INDIC ONE, SUPERSCRIPT TWO, MATHEMATICAL DOUBLE-STRUCK ONE.
TRICKY = list(
    ".*> \t\n\r\x00\x7f%&#?/\\'\"é\u2024\uff0a\ufe65\uff0e\u2217\u00a0\u200b\u0130\u212a\u0661\u00b2\U0001d7d9\ufeff"
)
SPECIAL_IDS = [
    "",
    ".",
    "*",
    ">",
    "a.b",
    "a*",
    "lobby.>",
    "lobby.*",
    "lobby ",
    " lobby",
    "lob by",
    "lobby\u2024x",
    "\uff0a",
    "\ufe65",
    "lob\u200bby",
    "lobby\n",
    "LOBBY",
    "lobby",
    "chat-1",
    "user:bob",
    "a=b+c@d:e",
    "-",
    "%2E",
    "%",
    "r" * 128,
    "r" * 129,
]
ids = st.one_of(
    st.text(st.sampled_from(ID_CHARS), min_size=1, max_size=12),
    st.text(st.sampled_from(list(ID_CHARS) + TRICKY), max_size=16),
    st.sampled_from(SPECIAL_IDS),
    st.integers(120, 136).map(lambda n: "r" * n),
    st.text(max_size=10),
)
long_values = st.one_of(
    st.integers(129, 2000).map(lambda n: "x" * n),
    st.integers(100, 400).map(lambda n: "\u2024" * n),
    st.integers(100, 700).map(lambda n: "lobby." * n),
)
seqs = st.one_of(
    st.integers(0, 2**64 + 5).map(str),
    st.sampled_from(
        [
            "",
            "0",
            "1",
            "-1",
            "1.0",
            " 1",
            "1 ",
            "+1",
            "0x10",
            "1e3",
            "NaN",
            "\u0661\u0662",
            "\u00b2",
            "9223372036854775806",
            "9223372036854775807",
            "9223372036854775808",
            "18446744073709551615",
            "99999999999999999999",
            "999999999999999999999",
            "00000000000000000001",
        ]
    ),
    ids,
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # unbounded: huge ints too
    st.sampled_from([2**53 - 1, 2**53, -(2**53), 2**63 - 1, 2**63, 2**64, -1, 0, 10**30]),
    st.floats(),  # nan / inf serialise as NaN / Infinity: not JSON
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
field_values = st.one_of(json_values, ids, seqs, long_values)

# Tokens: the ones the node would accept, and everything around them.
OTHER_SECRET = "another-secret-that-is-long-enough-for-hs256"


@dataclass(frozen=True)
class Tok:
    text: str
    user: str | None  # None: the node must refuse it
    rooms: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()


def _tok(user: str, rooms: list[str], publish: list[str] | None = None, **kw: Any) -> Tok:
    publish = ["*"] if publish is None else publish
    good = valid_id(user) and all(GLOB_RE.fullmatch(g) for g in [*rooms, *publish]) and not kw
    return Tok(token(user, rooms=rooms, publish=publish, **kw), user if good else None, tuple(rooms), tuple(publish))


ALICE = _tok("alice", ["*"])
TOKENS = [
    ALICE,
    _tok("alice", ["lobby", "chat-*"], ["lobby"]),
    _tok("alice", []),
    _tok("bob", ["*"]),
    _tok("a=b+c@d:e", ["*"]),
    _tok("r" * 128, ["r?b*"]),
    *[_tok(user, ["*"]) for user in ["*", ">", "a.b", "", " ", "alice ", "al\u2024ice", "r" * 129, "\uff0a"]],
    *[_tok("alice", [room]) for room in ["a.b", "*.>", ">", "lobby ", "\ufe65"]],
]
BAD_TOKENS = [
    Tok(token("alice", ttl=-60), None),
    Tok(token("alice", key=OTHER_SECRET), None),
    Tok(token("alice", rooms=["*"], exp=None), None),  # exp is required
    Tok(ALICE.text + "x", None),
    Tok(ALICE.text.rsplit(".", 1)[0] + ".", None),
    Tok("eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.", None),  # alg: none
]
KNOWN_TOKENS = {t.text: t for t in TOKENS + BAD_TOKENS}
tokens = st.one_of(
    st.sampled_from(TOKENS + BAD_TOKENS),
    st.text(max_size=40).map(lambda s: Tok(s, None)),
    st.sampled_from(["", " ", "Bearer", "null", "\u2024", "x" * 3000]).map(lambda s: Tok(s, None)),
)


def token_of(text: str) -> Tok:
    return KNOWN_TOKENS.get(text) or Tok(text, None)


# --------------------------------------------------------------------------- the harness


@dataclass(repr=False)
class Harness:
    """One node per property, a bystander in room ``bystander`` connected
    before the fuzzing, the captured logs, and the examples' count and pace."""

    name: str
    node: RunningNode
    http: aiohttp.ClientSession
    caplog: pytest.LogCaptureFixture
    bystander: aiohttp.ClientWebSocketResponse
    seen: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    examples: int = 0
    started: float = 0.0
    finished: float = 0.0
    notes: Counter[str] = field(default_factory=Counter)
    log_mark: int = 0
    markers: int = 0
    reader: asyncio.Task[None] | None = None
    tolerated_logs: list[Callable[[logging.LogRecord], bool]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)  # what a property keeps from one example to the next

    def __repr__(self) -> str:  # short, in pytest's and hypothesis' reports
        return f"<{self.name} harness on {self.node.url}>"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    @contextlib.asynccontextmanager
    async def example(self) -> AsyncIterator[None]:
        """One example: counted, its logs checked from here, and never hanging
        (after EXAMPLE_TIMEOUT it fails with the stacks of every task)."""
        if not self.examples:
            self.started = time.perf_counter()
        self.examples += 1
        self.log_mark = len(self.caplog.records)
        self.tolerated_logs.clear()
        stacks: list[str] = []
        # Taken just before the timeout cancels the example: where everything was stuck.
        watchdog = asyncio.get_running_loop().call_later(EXAMPLE_TIMEOUT - 0.5, lambda: stacks.append(_task_stacks()))
        try:
            async with asyncio.timeout(EXAMPLE_TIMEOUT):
                yield
        except TimeoutError as exc:
            raise AssertionError(f"example timed out ({EXAMPLE_TIMEOUT} s); tasks then:\n{''.join(stacks)}") from exc
        finally:
            watchdog.cancel()

    async def read_bystander(self) -> None:
        while True:
            msg = await self.bystander.receive()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                self.seen.append({"type": "closed", "code": self.bystander.close_code})
                self.arrived.set()
                return
            self.seen.append(orjson.loads(msg.data))
            self.arrived.set()

    async def end(self, what: object) -> None:
        """The node is unharmed: nothing logged at ERROR or with a traceback,
        and the bystander still receives a message published now."""
        self.check_logs(what)
        self.markers += 1
        marker = {"marker": self.markers, "property": self.name}
        await api_publish(self.http, self.node, "room:bystander", marker)
        async with asyncio.timeout(5):
            while not any(f.get("data") == marker for f in self.seen):
                assert not any(f["type"] == "closed" for f in self.seen), f"bystander dropped after {what!r}"
                self.arrived.clear()
                await self.arrived.wait()
        del self.seen[:]
        self.finished = time.perf_counter()

    def check_logs(self, what: object) -> None:
        for record in self.caplog.records[self.log_mark :]:
            if not record.name.startswith(("herald", "aiohttp", "gateway", "broker")):
                continue
            if any(tolerate(record) for tolerate in self.tolerated_logs):
                continue
            assert record.levelno < logging.ERROR and not record.exc_info, (
                f"{record.name} logged {record.levelname} {record.getMessage()!r} "
                f"(traceback: {bool(record.exc_info)}) after {what!r}"
            )
        self.log_mark = len(self.caplog.records)

    def report(self) -> dict[str, Any]:
        elapsed = max(self.finished - self.started, 1e-9)
        return {
            "examples": self.examples,
            "seconds": round(elapsed, 3),
            "per_second": round(self.examples / elapsed, 1),
            "notes": dict(self.notes),
        }


EXAMPLE_TIMEOUT = 60.0


def _task_stacks() -> str:
    """Every task's await chain, innermost last (Task.print_stack shows only the outer coroutine)."""
    out = io.StringIO()
    for task in asyncio.all_tasks():
        out.write(f"{task!r}\n")
        coro: Any = task.get_coro()
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None:
                out.write(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}\n")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return out.getvalue()


async def _harness(
    name: str, node_factory: Callable[..., Any], http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Harness]:
    caplog.set_level(logging.WARNING)
    node = await node_factory(limits=FUZZ_LIMITS)
    bystander = await http.ws_connect(
        node.ws_url, params={"token": token("bystander", rooms=["bystander"]), "room": "bystander"}
    )
    welcome = orjson.loads((await bystander.receive(timeout=5)).data)
    assert welcome["type"] == "welcome", welcome
    h = Harness(name, node, http, caplog, bystander)
    h.reader = asyncio.create_task(h.read_bystander())
    yield h
    if h.examples:
        REPORTS[name] = h.report()
    h.log_mark = 0  # the teardown phase has records of its own
    h.tolerated_logs.clear()
    h.check_logs("the end of the run")
    h.reader.cancel()
    await bystander.close()


@pytest.fixture
async def ws_harness(node_factory: Any, http: aiohttp.ClientSession, caplog: Any) -> AsyncIterator[Harness]:
    async for h in _harness("ws_frames", node_factory, http, caplog):
        yield h


@pytest.fixture
async def query_harness(node_factory: Any, http: aiohttp.ClientSession, caplog: Any) -> AsyncIterator[Harness]:
    async for h in _harness("stream_query", node_factory, http, caplog):
        yield h


@pytest.fixture
async def header_harness(node_factory: Any, http: aiohttp.ClientSession, caplog: Any) -> AsyncIterator[Harness]:
    async for h in _harness("stream_headers", node_factory, http, caplog):
        yield h


@pytest.fixture
async def api_harness(node_factory: Any, http: aiohttp.ClientSession, caplog: Any) -> AsyncIterator[Harness]:
    async for h in _harness("api_publish", node_factory, http, caplog):
        yield h


# --------------------------------------------------------------------------- raw HTTP


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def raw_http(url: str, head: bytes, body: bytes | list[bytes] = b"", timeout: float = 10.0) -> RawResponse:
    """Send ``head`` (request line and headers, without the blank line) and
    ``body`` (a list: chunked) byte for byte; read the answer's head and, unless
    it is a stream (101, event-stream), its body."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port, limit=2**20)
    try:
        async with asyncio.timeout(timeout):
            if isinstance(body, list):
                chunks = b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in body if c) + b"0\r\n\r\n"
                writer.write(head + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
            else:
                writer.write(head + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            with contextlib.suppress(ConnectionResetError):  # answered before the whole body was sent
                await writer.drain()
            status = 100
            while 100 <= status < 200 and status != 101:  # skip interim answers (100 Continue)
                status = int((await reader.readline()).split()[1])
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
            if status == 101 or headers.get("content-type", "").startswith("text/event-stream"):
                return RawResponse(status, headers, b"")
            if "content-length" in headers:
                data = await reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                data = b""
                while (size := int((await reader.readline()).split(b";")[0], 16)) != 0:
                    data += await reader.readexactly(size)
                    await reader.readline()
            else:
                data = await reader.read()
            return RawResponse(status, headers, data)
    finally:
        writer.transport.abort()


def assert_json_error(resp: RawResponse, what: object) -> dict[str, Any]:
    assert resp.headers.get("content-type", "").startswith("application/json"), (resp, what)
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and isinstance(body.get("message"), str), (
        body,
        what,
    )
    return body


# --------------------------------------------------------------------------- bytes and headers


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _first_header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    return next((v for n, v in headers if n.lower() == name), None)


# --------------------------------------------------------------------------- 1. WebSocket frames


@dataclass
class Frame:
    kind: str  # text | binary | text_bytes (a TEXT frame with raw, possibly invalid, UTF-8)
    data: str | bytes

    def __repr__(self) -> str:
        data = repr(self.data) if len(self.data) < 300 else f"{self.data[:60]!r}... ({len(self.data)} long)"
        return f"Frame({self.kind}, {data})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis' printer: short
        p.text(repr(self))


COMMANDS = ["subscribe", "unsubscribe", "publish", "presence", "read", "refresh", "ping"]
types = st.one_of(
    st.sampled_from(COMMANDS),
    st.sampled_from(["PING", "ping ", "Subscribe", "", "pong", "message", "welcome", "ack", "__class__", "get"]),
    json_values,
)
refs = st.one_of(
    st.none(),
    st.text(max_size=70),
    st.integers(-(2**54), 2**54),
    st.sampled_from([2**53 - 1, 2**53, -(2**53) + 1, -(2**53), True, 1.0, 1.5, [], {}, "r" * 64, "r" * 65]),
)
events = st.one_of(
    st.none(), ids, st.sampled_from(["chat", "a.b", "x" * 64, "x" * 65, "!join", "message"]), json_values
)
commands = st.builds(
    lambda base, extra: {**extra, **base},
    st.fixed_dictionaries(
        {"type": types},
        optional={
            "room": st.one_of(ids, field_values),
            "ref": refs,
            "since": st.one_of(seqs, field_values),
            "data": json_values,
            "event": events,
            "id": st.one_of(seqs, field_values),
            "token": st.one_of(tokens.map(lambda t: t.text), json_values),
            "ephemeral": st.one_of(st.booleans(), json_values),
        },
    ),
    st.dictionaries(st.text(max_size=8), json_values, max_size=3),
)

valid_ids = st.text(st.sampled_from(ID_CHARS), min_size=1, max_size=12)
valid_seqs = st.one_of(st.integers(0, 60).map(str), st.integers(0, 2**63 - 1).map(str), st.integers(0, 2**63 - 1))
ROOM_POOL = ["lobby", "chat-1", *(f"r{i}" for i in range(MAX_SUBSCRIPTIONS + 10))]
# Well-formed commands with plausible fields: these reach the handlers.
likely_commands = st.builds(
    lambda base, extra: {**extra, **base},
    st.fixed_dictionaries(
        {"type": st.sampled_from(COMMANDS), "room": st.one_of(st.sampled_from(ROOM_POOL), valid_ids, ids)},
        optional={
            "ref": st.one_of(st.text(max_size=10), st.integers(-1000, 10**6)),
            "since": st.one_of(valid_seqs, seqs),
            "data": json_values,
            "event": st.one_of(st.sampled_from(["chat", "typing"]), events),
            "id": st.one_of(valid_seqs, seqs),
            "token": st.sampled_from(TOKENS + BAD_TOKENS).map(lambda t: t.text),
            "ephemeral": st.booleans(),
        },
    ),
    st.dictionaries(st.text(max_size=8), json_values, max_size=2),
)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _padded_ping(size: int) -> str:
    """A valid ping frame of exactly ``size`` UTF-8 bytes."""
    head = '{"type":"ping","ref":"big","pad":"'
    return head + "x" * (size - len(head) - 2) + '"}'


frames = st.one_of(
    likely_commands.map(lambda c: Frame("text", _dumps(c))),
    likely_commands.map(lambda c: Frame("text", _dumps(c))),
    likely_commands.map(lambda c: Frame("text", _dumps(c))),
    likely_commands.map(lambda c: Frame("text", _dumps(c))),
    commands.map(lambda c: Frame("text", _dumps(c))),
    commands.map(lambda c: Frame("text", _dumps(c))),
    json_values.map(lambda v: Frame("text", _dumps(v))),
    st.text(max_size=40).map(lambda s: Frame("text", s)),
    st.sampled_from(
        [
            "",
            " ",
            "null",
            "[]",
            "{}",
            '"ping"',
            "{'type': 'ping'}",
            '{"type":"ping"',
            '{"type":"ping"}garbage',
            '{"type":"ping"} ',
            '{"type":"ping","type":"subscribe"}',
            '{"type":"ping","ref":NaN}',
            '{"type":"read","id":1e400}',
            '{"type":"read","id":-0}',
            '{"type":"read","id":1.0}',
            '{"type":"ping","ref":"\\ud800"}',
            '\ufeff{"type":"ping"}',
        ]
    ).map(lambda s: Frame("text", s)),
    st.sampled_from([1025, 10_000]).map(lambda n: Frame("text", "[" * n + "]" * n)),
    st.sampled_from([1025, 10_000]).map(lambda n: Frame("text", '{"a":' * n + "1" + "}" * n)),
    st.sampled_from([1025, 10_000]).map(lambda n: Frame("text", '{"type":"publish","room":"x","data":' + "[" * n)),
    st.binary(max_size=64).map(lambda b: Frame("binary", b)),
    st.sampled_from([b'{"type":"ping"}', b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80"]).map(lambda b: Frame("binary", b)),
    st.sampled_from([MAX_FRAME - 1, MAX_FRAME]).map(lambda n: Frame("text", _padded_ping(n))),
)
rare_frames = st.one_of(
    # Not UTF-8 in a TEXT frame (RFC 6455: close 1007) and over ws.max_frame (1009): both end the connection.
    st.sampled_from([b"\xff", b'{"type":"ping","x":"\xc3\x28"}', b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]).map(
        lambda b: Frame("text_bytes", b)
    ),
    st.sampled_from([MAX_FRAME + 1, MAX_FRAME + 1000]).map(lambda n: Frame("text", _padded_ping(n))),
    st.sampled_from([MAX_FRAME + 1]).map(lambda n: Frame("binary", b"\x00" * n)),
)


@st.composite
def frame_lists(draw: st.DrawFn) -> list[Frame]:
    """A few frames for one connection; one in ten batches ends with one that closes it."""
    batch = draw(st.lists(frames, min_size=1, max_size=6))
    if draw(one_in(10)):
        batch.append(draw(rare_frames))
    return batch


@dataclass
class Expect:
    kind: str  # ack | error | pong | presence | close
    codes: frozenset[str] = frozenset()  # error codes allowed, or {str(close code)}
    ref: Any = None
    check: Callable[[dict[str, Any]], None] | None = None


@dataclass
class FuzzConn:
    """The long-lived fuzzed connection and what the oracle knows of it."""

    ws: aiohttp.ClientWebSocketResponse
    tok: Tok = ALICE
    rooms: set[str] = field(default_factory=set)
    frames: int = 0


def _good_ref(ref: Any) -> bool:
    return ref is None or (isinstance(ref, str) and len(ref) <= 64) or (type(ref) is int and abs(ref) < 2**53)


@dataclass
class Positions:
    """What the oracle knows of the stream: the user's read position, and the
    stream's last id (only this connection publishes into its stream)."""

    read: int = 0
    last: int = 0


# Escapes read left to right: an escaped backslash, a surrogate pair, a surrogate alone (docs/protocol.md
# 3.2: read as U+FFFD).
_ESCAPES = re.compile(
    rb"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|\\u[dD][89a-fA-F][0-9a-fA-F]{2}"
)


def json_as_read(data: str | bytes) -> Any:
    """A client's or publisher's JSON as the node reads it: orjson's verdict,
    but for a lone surrogate escape (which orjson refuses), read as U+FFFD."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
        mended = _ESCAPES.sub(lambda m: b"\\ufffd" if len(m[0]) == 6 else m[0], raw)
        if mended == raw:
            raise
        return orjson.loads(mended)


def expect_frame(frame: Frame, conn: FuzzConn, read_position: Positions) -> Expect:
    """The documented answer to one frame, updating the oracle's state."""
    size = len(frame.data.encode() if isinstance(frame.data, str) else frame.data)
    if size > MAX_FRAME:
        return Expect("close", frozenset({"1009"}))
    if frame.kind == "binary":
        return Expect("error", frozenset({"bad_frame"}))
    if frame.kind == "text_bytes":
        assert isinstance(frame.data, bytes)
        if _not_utf8(frame.data):
            return Expect("close", frozenset({"1007"}))
        return expect_frame(Frame("text", frame.data.decode()), conn, read_position)
    try:
        cmd = json_as_read(frame.data)  # JSON corner cases (huge numbers, NaN) are the parser's call
    except orjson.JSONDecodeError:
        return Expect("error", frozenset({"bad_frame"}))
    if not isinstance(cmd, dict):
        return Expect("error", frozenset({"bad_frame"}))
    ref = cmd.get("ref")
    if not _good_ref(ref):
        return Expect("error", frozenset({"bad_request"}))
    kind = cmd.get("type")
    if not isinstance(kind, str) or kind not in COMMANDS:
        return Expect("error", frozenset({"unknown_command"}), ref)

    def error(code: str) -> Expect:
        return Expect("error", frozenset({code}), ref)

    def ack(check: Callable[[dict[str, Any]], None] | None = None) -> Expect:
        return Expect("ack", ref=ref, check=check)

    room = cmd.get("room")
    if kind == "ping":
        return Expect("pong", ref=ref)
    if kind in ("subscribe", "unsubscribe", "publish", "presence") and not valid_id(room):
        return error("bad_request")
    if kind == "subscribe":
        if not glob_allows(conn.tok.rooms, room):
            return error("forbidden")
        if cmd.get("since") is not None and not valid_seq(cmd["since"]):
            return error("bad_request")
        if room not in conn.rooms and len(conn.rooms) >= MAX_SUBSCRIPTIONS:
            return error("too_many_subscriptions")
        conn.rooms.add(room)
        return ack(lambda f: _eq(f.get("channel"), f"room:{room}"))
    if kind == "unsubscribe":
        conn.rooms.discard(room)
        return ack(lambda f: _eq(f.get("channel"), f"room:{room}"))
    if kind == "publish":
        if not glob_allows(conn.tok.publish, room):
            return error("forbidden")
        if "data" not in cmd:
            return error("bad_request")
        event = cmd.get("event")
        if event is not None:
            try:
                check_event(event)
            except ValueError:
                return error("bad_request")
        ephemeral = cmd.get("ephemeral") is True
        if not ephemeral:
            read_position.last += 1  # stored: the stream's end moves

        def published(f: dict[str, Any]) -> None:
            _eq(f.get("channel"), f"room:{room}")
            if ephemeral:
                assert "id" not in f, f
            else:
                assert isinstance(f.get("id"), str) and f["id"].isdigit(), f

        return ack(published)
    if kind == "presence":
        if not glob_allows(conn.tok.rooms, room):
            return error("forbidden")

        def members(f: dict[str, Any]) -> None:
            _eq(f.get("room"), room)
            assert isinstance(f.get("users"), list) and all(isinstance(u, str) for u in f["users"]), f

        return Expect("presence", ref=ref, check=members)
    if kind == "read":
        seq = cmd.get("id")
        if not valid_seq(seq):
            return error("bad_request")
        if int(seq) > read_position.last:  # past the stream's end: refused, nothing stored
            return error("bad_request")
        read_position.read = max(read_position.read, int(seq))
        stored = str(read_position.read)
        return ack(lambda f: _eq(f.get("id"), stored))
    # refresh
    text = cmd.get("token")
    if not isinstance(text, str):
        return error("bad_request")
    new = token_of(text)
    if new.user is None or not text:
        return error("bad_token")
    if new.user != conn.tok.user:
        return error("forbidden")
    conn.tok = new
    conn.rooms = {r for r in conn.rooms if glob_allows(new.rooms, r)}
    expected = sorted(["user", "broadcast", *(f"room:{r}" for r in conn.rooms)])
    return ack(lambda f: _eq(f.get("channels"), expected))


def _eq(got: Any, want: Any) -> None:
    assert got == want, f"got {got!r}, expected {want!r}"


def check_server_frame(frame: dict[str, Any]) -> None:
    """Every frame the node sends has the documented shape."""
    kind = frame.get("type")
    if kind == "error":
        assert isinstance(frame.get("code"), str) and isinstance(frame.get("message"), str), frame
        assert frame["code"] in ERROR_CODES, frame
    elif kind == "message":
        assert isinstance(frame.get("channel"), str) and isinstance(frame.get("event"), str) and "data" in frame, frame
        assert "id" not in frame or (isinstance(frame["id"], str) and frame["id"].isdigit()), frame
    elif kind == "reset":
        assert isinstance(frame.get("channel"), str) and isinstance(frame.get("reason"), str), frame
    elif kind in ("join", "leave"):
        assert isinstance(frame.get("room"), str) and isinstance(frame.get("user"), str), frame
    else:
        assert kind in ANSWERS, frame


async def open_fuzz_conn(h: Harness) -> FuzzConn:
    ws = await h.http.ws_connect(h.node.ws_url, params={"token": ALICE.text}, max_msg_size=0)
    msg = await ws.receive(timeout=5)
    assert msg.type is aiohttp.WSMsgType.TEXT, (msg, ws.close_code)
    welcome = orjson.loads(msg.data)
    assert welcome["type"] == "welcome" and welcome["user"] == "alice", welcome
    return FuzzConn(ws)


async def send_frame(ws: aiohttp.ClientWebSocketResponse, frame: Frame) -> None:
    if frame.kind == "text":
        assert isinstance(frame.data, str)
        await ws.send_str(frame.data)
    elif frame.kind == "binary":
        assert isinstance(frame.data, bytes)
        await ws.send_bytes(frame.data)
    else:
        assert isinstance(frame.data, bytes)
        await ws.send_frame(frame.data, aiohttp.WSMsgType.TEXT)


async def read_answers(ws: aiohttp.ClientWebSocketResponse, sync_ref: str | None) -> tuple[list[dict[str, Any]], int]:
    """Frames up to the pong answering ``sync_ref`` (or up to the close: then
    its code); only answers are returned, every frame is shape-checked."""
    answers: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                frame = orjson.loads(msg.data)
                check_server_frame(frame)
                if frame["type"] == "pong" and sync_ref is not None and frame.get("ref") == sync_ref:
                    return answers, 0
                if frame["type"] in ANSWERS:
                    answers.append(frame)
                continue
            if msg.type is aiohttp.WSMsgType.CLOSE:
                return answers, int(msg.data)
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                return answers, ws.close_code or 1006
            raise AssertionError(f"unexpected {msg.type} frame {msg.data!r}")


async def _ws_batch(conn: FuzzConn, batch: list[Frame], read_position: Positions) -> None:
    """Send ``batch``, then a ping to sync on; check every answer against the oracle."""
    expected: list[Expect] = []
    for frame in batch:
        expected.append(expect_frame(frame, conn, read_position))
        await send_frame(conn.ws, frame)
        if expected[-1].kind == "close":
            break
    closing = expected[-1].kind == "close"
    sync = None
    if not closing:
        conn.frames += 1
        sync = f"sync-{conn.frames}"
        await conn.ws.send_json({"type": "ping", "ref": sync})
    answers, close_code = await read_answers(conn.ws, sync)

    want_answers = [e for e in expected if e.kind != "close"]
    if closing:
        # The connection ends at once: answers still queued may be lost, never reordered or wrong.
        assert len(answers) <= len(want_answers), (batch, answers, [e.kind for e in expected])
    else:
        assert len(answers) == len(want_answers), (batch, answers, [e.kind for e in expected])
    for got in answers:
        event(f"answer {got['type']}" + (f" {got['code']}" if got["type"] == "error" else ""))
    if closing:
        event(f"closed {close_code}")
    for frame, want, got in zip(batch, want_answers, answers, strict=False):
        assert got["type"] == want.kind, (frame, want, got)
        assert got.get("ref") == want.ref, (frame, want, got)
        if want.kind == "error":
            assert got["code"] in want.codes, (frame, want, got)
        if want.check is not None:
            want.check(got)
    if closing:
        assert str(close_code) in expected[-1].codes, (batch[len(expected) - 1], close_code)
        assert close_code in WS_CLOSE_CODES | {1007}, close_code
        await conn.ws.close()
    else:
        assert close_code == 0, (batch, close_code)


@pytest.mark.timeout(0)
@FUZZ
@given(batch=frame_lists())
async def test_ws_frames(ws_harness: Harness, batch: list[Frame]) -> None:
    """Any frames on one connection: each answered, in order, by the
    documented ack / pong / presence / error frame with its ref, or the
    connection closed with the documented code (1007 invalid UTF-8, 1009 too
    big); the node and the bystander carry on."""
    h = ws_harness
    async with h.example():
        state = h.state.setdefault("ws", {"conn": None, "read": Positions()})  # kept across examples
        state["read"].last = await h.node.node.broker.history.position()
        conn: FuzzConn | None = state["conn"]
        if conn is None or conn.ws.closed:
            conn = state["conn"] = await open_fuzz_conn(h)
        try:
            await _ws_batch(conn, batch, state["read"])
        except BaseException:
            state["conn"] = None  # a fresh connection (and oracle state) for the next example: failures replay alike
            await conn.ws.close()
            raise
        if conn.ws.closed:
            state["conn"] = None
        await h.end(batch)


# --------------------------------------------------------------------------- 2. stream query strings


query_values = st.one_of(ids, long_values)
query_pairs = st.lists(
    st.one_of(
        st.tuples(st.just("room"), query_values),
        st.tuples(st.just("room"), query_values),
        st.tuples(st.just("since"), st.one_of(seqs, long_values)),
        st.tuples(st.just("token"), tokens.map(lambda t: t.text)),
        st.tuples(st.sampled_from(["Room", "room[]", "rooms", "token ", "tok", "", "since[]", "x"]), ids),
    ),
    max_size=8,
)


@st.composite
def stream_requests(draw: st.DrawFn) -> tuple[str, list[tuple[str, str]], str | None]:
    transport = draw(st.sampled_from(["ws", "sse"]))
    if draw(st.booleans()):
        pairs = draw(query_pairs)
    else:  # plausible: valid rooms and position, and at most one odd value
        pairs = [("room", r) for r in draw(st.lists(st.one_of(st.sampled_from(ROOM_POOL), valid_ids), max_size=5))]
        if draw(st.booleans()):
            pairs.append(("since", draw(valid_seqs.map(str))))
        if draw(st.booleans()):
            pairs.insert(draw(st.integers(0, len(pairs))), draw(query_pairs.filter(bool))[0])
    if not draw(one_in(10)):  # mostly one valid token somewhere, so rooms and since get looked at
        tok = draw(st.sampled_from([ALICE, ALICE, *TOKENS[:6]]))
        pairs.insert(draw(st.integers(0, len(pairs))), ("token", tok.text))
    if draw(one_in(6)):  # many rooms, around max_subscriptions
        pairs += [("room", f"r{i}") for i in range(draw(st.integers(MAX_SUBSCRIPTIONS - 2, MAX_SUBSCRIPTIONS + 2)))]
    last_event_id = None
    if transport == "sse" and draw(st.booleans()):
        last_event_id = "".join(c for c in draw(seqs) if c.isprintable() and c.isascii())
    return transport, pairs, last_event_id


def expect_admission(pairs: list[tuple[str, str]], last_event_id: str | None) -> tuple[int, str | None, list[str]]:
    """(HTTP status, error, channels) the contract gives this request."""
    found = {v for k, v in pairs if k == "token"} - {""}
    if len(found) != 1:
        return 401, "bad_token", []
    tok = token_of(found.pop())
    if tok.user is None:
        return 401, "bad_token", []
    rooms = list(dict.fromkeys(v for k, v in pairs if k == "room"))  # a room named twice is one
    if len(rooms) > MAX_SUBSCRIPTIONS:
        return 400, "too_many_subscriptions", []
    channels = ["user", "broadcast"]
    for room in rooms:
        if not valid_id(room):
            return 400, "bad_request", []
        if not glob_allows(tok.rooms, room):
            return 403, "forbidden", []
        if f"room:{room}" not in channels:
            channels.append(f"room:{room}")
    if last_event_id is not None:
        last_event_id = last_event_id.strip(" \t")  # a header value's surrounding whitespace is not part of it
    since = last_event_id or next((v for k, v in pairs if k == "since"), None)
    if since and not valid_seq(since):
        return 400, "bad_request", []
    return 200, None, channels


def encode_query(pairs: list[tuple[str, str]]) -> str:
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)


async def _peek(resp: aiohttp.ClientResponse) -> bytes:
    """The start of a body that may be an endless stream."""
    with contextlib.suppress(TimeoutError):
        return await asyncio.wait_for(resp.content.read(2000), 2)
    return b"<nothing within 2 s>"


WS_CODE = {400: 4000, 401: 4001, 403: 4003}
MAX_LINE = 8190  # aiohttp's limit on the request target (URL): longer ones never reach Herald


@pytest.mark.timeout(0)
@FUZZ
@given(request=stream_requests())
async def test_stream_query(query_harness: Harness, request: tuple[str, list[tuple[str, str]], str | None]) -> None:
    """``/ws`` and ``/sse`` with any ``room``/``since``/``token`` query: a
    welcome on exactly the valid, allowed rooms (WS; 200 + event stream on
    SSE), or the documented refusal: close 4000/4001/4003 (WS), 400/401/403
    with a JSON body (SSE). An id with a NATS-special character is never let in."""
    h = query_harness
    async with h.example():
        transport, pairs, last_event_id = request
        query = encode_query(pairs)
        status, error, channels = expect_admission(pairs, last_event_id)
        event(f"{transport} {status} {error or ''}")
        url = yarl.URL(f"{h.node.url}/{transport}?{query}", encoded=True)
        if len(f"/{transport}?{query}") > MAX_LINE:
            # Refused by aiohttp's parser before any handler: a 4xx, never a 500.
            async with h.http.get(url) as resp:
                assert resp.status in (400, 414), resp.status
            await h.end(request)
            return
        if transport == "ws":
            async with h.http.ws_connect(url, max_msg_size=0) as ws:
                msg = await ws.receive(timeout=10)
                if msg.type is aiohttp.WSMsgType.TEXT:
                    welcome = orjson.loads(msg.data)
                    assert status == 200, (request, welcome, status, error)
                    assert welcome["type"] == "welcome", welcome
                    assert welcome["channels"] == channels, (welcome, channels)
                    for channel in welcome["channels"]:
                        assert channel in ("user", "broadcast") or valid_id(channel[len("room:") :]), channel
                else:
                    code, _ = await expect_close(ws) if msg.type is not aiohttp.WSMsgType.CLOSE else (msg.data, "")
                    assert msg.type is aiohttp.WSMsgType.CLOSE, (msg, request)
                    assert code == WS_CODE.get(status), (request, code, msg.extra, status, error)
        else:
            headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
            async with h.http.get(url, headers=headers) as resp:
                assert resp.status == status, (request, resp.status, await _peek(resp), status, error)
                if status == 200:
                    assert resp.content_type == "text/event-stream", resp.content_type
                    first = await asyncio.wait_for(resp.content.readline(), 10)
                    assert first.startswith(b"retry:"), first
                else:
                    assert resp.content_type == "application/json", resp.content_type
                    body = await resp.json()
                    assert body.get("error") == error and isinstance(body.get("message"), str), (body, error)
        await h.end(request)


# --------------------------------------------------------------------------- 2b. stream request headers, as raw bytes

header_bytes = st.one_of(
    st.binary(max_size=40).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F)),  # VCHAR / obs-text
    st.text(max_size=30).map(lambda s: s.encode()).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F)),
    st.sampled_from(
        [
            b"",
            b"null",
            b"http://127.0.0.1",
            b"https://evil.example",
            b"http://\xff",
            b"http://h\xc3\xa9.example",
            b"*",
            b"Bearer ",
            b"Bearer \xff",
            b"herald_token=\xff",
            b"herald_token=a; herald_token=b",
            b"1",
            b"\xd9\xa1",
        ]
    ),
)
stream_headers = st.lists(
    st.tuples(
        st.sampled_from([b"Origin", b"Authorization", b"Cookie", b"Last-Event-ID", b"X-Forwarded-For", b"Accept"]),
        header_bytes,
    ),
    max_size=4,
)


@pytest.mark.timeout(0)
@FUZZ
@given(
    transport=st.sampled_from(["/ws", "/sse"]),
    query=st.lists(st.tuples(st.sampled_from(["room", "token", "since"]), ids), max_size=3),
    headers=stream_headers,
)
async def test_stream_headers(
    header_harness: Harness, transport: str, query: list[tuple[str, str]], headers: list[tuple[bytes, bytes]]
) -> None:
    """Stream requests with arbitrary Origin / Authorization / Cookie /
    Last-Event-ID bytes (not UTF-8 included): 101 (WS) or 200 (SSE), or a
    400/401/403 JSON refusal; never a 500."""
    h = header_harness
    async with h.example():
        port = urlsplit(h.node.url).port
        if not any(k == "token" for k, _ in query) and not any(n in (b"Authorization", b"Cookie") for n, _ in headers):
            query = [*query, ("token", ALICE.text)]
        target = f"{transport}?{encode_query(query)}".encode()
        lines = [b"GET " + target + b" HTTP/1.1", b"Host: 127.0.0.1:%d" % port, b"Connection: close"]
        if transport == "/ws":
            lines += [b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="]
            lines += [b"Sec-WebSocket-Version: 13"]
        lines += [name + b": " + value for name, value in headers]
        resp = await raw_http(h.node.url, b"\r\n".join(lines))
        event(f"{transport} {resp.status}")
        ok = {101, 400, 401, 403} if transport == "/ws" else {200, 400, 401, 403}
        assert resp.status in ok, (transport, query, headers, resp)
        if resp.status >= 400:
            assert_json_error(resp, (transport, query, headers))
        await h.end((transport, query, headers))


# --------------------------------------------------------------------------- 3. POST /api/publish

KEY = PUBLISH_KEY.encode()
auth_values = st.one_of(
    st.sampled_from(
        [
            b"Bearer " + KEY,
            b"bearer " + KEY,
            b"BEARER " + KEY,
            b"Bearer  " + KEY,
            b"Bearer " + KEY + b"  ",
            b"Bearer\t" + KEY,
            b"Bearer " + KEY + b"x",
            b"Bearer " + KEY[:-1],
            b"Bearer " + KEY + b" extra",
            b"Bearer",
            b"Bearer ",
            b"Basic " + KEY,
            KEY,
            b"Bearer " + KEY.upper(),
            b"Bearer \xff",
            b"Bearer " + KEY + b"\xff",
            b"Bearer \xc3\xa9",
            "Bearer \u2024".encode(),
        ]
    ),
    header_bytes,
)
channels_ = st.one_of(
    st.sampled_from(["broadcast", "room:lobby", "user:alice", "room:", "user:", "room", "Broadcast", "room:a.b"]),
    st.tuples(st.sampled_from(["room:", "user:", "", "ROOM:", "room::"]), ids).map("".join),
    json_values,
)
publish_docs = st.fixed_dictionaries(
    {},
    optional={
        "channel": channels_,
        "data": json_values,
        "event": events,
        "ref": json_values,
        "ephemeral": st.booleans(),
    },
)
good_channels = st.one_of(
    st.sampled_from(["broadcast", "room:lobby", "user:alice"]),
    st.text(st.sampled_from(ID_CHARS), min_size=1, max_size=12).map(lambda s: "room:" + s),
)
likely_docs = st.builds(
    lambda base, extra: {**extra, **base},
    st.fixed_dictionaries(
        {"channel": st.one_of(good_channels, good_channels, channels_), "data": json_values},
        optional={"event": st.one_of(st.sampled_from(["chat", "notify.v1", "a:b@c+d-e_f"]), events)},
    ),
    st.dictionaries(st.text(max_size=8), json_values, max_size=2),
)
bodies = st.one_of(
    likely_docs.map(lambda d: _dumps(d).encode()),
    likely_docs.map(lambda d: _dumps(d).encode()),
    publish_docs.map(lambda d: _dumps(d).encode()),
    json_values.map(lambda v: _dumps(v).encode()),
    st.binary(max_size=80),
    st.sampled_from(
        [
            b"",
            b"{",
            b'{"channel":"room:lobby","data":1}garbage',
            b'\xef\xbb\xbf{"channel":"room:lobby","data":1}',
            b'{"channel":"room:lobby","data":1e400}',
            b'{"channel":"room:lobby","data":"\\ud800"}',
            b'{"channel":"room:lobby","data":"\xff"}',
            b'{"channel":"room:lobby","data":' + b"[" * 2000 + b"]" * 2000 + b"}",
        ]
    ),
    st.sampled_from([65536, 65537, 70000]).map(lambda n: b'{"channel":"room:lobby","data":"' + b"x" * (n - 35) + b'"}'),
)
header_names = st.sampled_from([b"Content-Type", b"Accept", b"Cookie", b"X-Request-Id", b"Expect", b"Authorization"])
content_types = st.sampled_from(
    [b"application/json", b"text/plain", b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=x", b""]
)
encodings = st.one_of(
    st.none(),
    st.none(),
    st.none(),
    st.sampled_from([b"gzip", b"deflate", b"GZIP", b"br", b"zstd", b"identity", b"x-gzip", b"gzip, deflate", b"bogus"]),
    header_bytes,
)
UNSUPPORTED_ENCODINGS = {"br", "zstd"}  # aiohttp refuses them itself (plain 400) without Brotli / zstd installed


@dataclass
class Publish:
    """The contract's answer to one POST /api/publish."""

    status: int
    error: str | None = None
    undecodable: bool = False  # Content-Encoding gzip/deflate on a body that is not


def content_encoding(encoding: bytes | None) -> str | None:
    """What aiohttp makes of the header: gzip / deflate / br / zstd, or None (taken as is)."""
    if encoding is None or not encoding.strip().isascii():
        return None
    enc = encoding.strip().decode().lower()
    return enc if enc in ("gzip", "deflate", "br", "zstd") else None


def expect_publish(headers: list[tuple[bytes, bytes]], body: bytes, encoding: bytes | None) -> Publish:
    enc = content_encoding(encoding)
    if enc in UNSUPPORTED_ENCODINGS:
        return Publish(400, None)
    plain: bytes | None = None
    if enc is not None:
        try:
            plain = gzip.decompress(body) if enc == "gzip" else zlib.decompress(body)
        except (OSError, EOFError, zlib.error):
            plain = None
    auth = _first_header(headers, b"authorization") or b""
    scheme, _, value = auth.strip().partition(b" ")
    if not (scheme.lower() == b"bearer" and value.strip() == KEY):
        return Publish(401, "unauthorized", undecodable=enc is not None and plain is None)
    if len(body) > 65536 and (enc is None or plain is not None):  # a batch may be larger: read (decoded) first
        return Publish(413, "too_large")
    if enc is not None:
        if plain is None:
            return Publish(400, "bad_request", undecodable=True)
        body = plain
        if len(body) > 65536:
            return Publish(413, "too_large")
    try:
        doc = json_as_read(body)
    except orjson.JSONDecodeError:
        return Publish(400, "bad_request")
    items = doc if isinstance(doc, list) else [doc]  # an array: a batch, checked whole
    if isinstance(doc, list) and not 1 <= len(doc) <= 1000:
        return Publish(400, "bad_request")
    if not all(_publishable(item) for item in items):
        return Publish(400, "bad_request")
    return Publish(200)


def _publishable(doc: Any) -> bool:
    if not isinstance(doc, dict) or "data" not in doc or not doc.keys() <= {"channel", "data", "event"}:
        return False
    channel = doc.get("channel")
    kind, sep, ident = channel.partition(":") if isinstance(channel, str) else ("", "", "")
    if channel != "broadcast" and not (sep and kind in ("room", "user") and valid_id(ident)):
        return False
    if doc.get("event") is not None:
        try:
            check_event(doc["event"])
        except ValueError:
            return False
    return True


@pytest.mark.timeout(0)
@FUZZ
@given(
    auth=st.one_of(st.just([b"Bearer " + KEY]), st.lists(auth_values, max_size=2)),
    extra=st.lists(st.tuples(header_names, st.one_of(content_types, header_bytes)), max_size=3),
    body=bodies,
    encoding=encodings,
    compress=st.booleans(),
    chunked=st.booleans(),
)
async def test_api_publish(
    api_harness: Harness,
    auth: list[bytes],
    extra: list[tuple[bytes, bytes]],
    body: bytes,
    encoding: bytes | None,
    compress: bool,
    chunked: bool,
) -> None:
    """Any body and headers (Content-Encoding included): 200 ``{"id"}``
    exactly for a valid publish with the key, else 400/401/413 with
    ``{"error","message"}``; never a 500."""
    h = api_harness
    async with h.example():
        # A repeated Content-Type is refused by aiohttp's parser (plain 400) before Herald sees it.
        extra = [
            (n, v) for i, (n, v) in enumerate(extra) if n != b"Content-Type" or b"Content-Type" not in dict(extra[:i])
        ]
        extra = [(n, v) for n, v in extra if n != b"Expect"] + [
            (n, b"100-continue") for n, _ in extra if n == b"Expect"
        ]
        headers = [(b"Authorization", a) for a in auth] + extra
        enc = content_encoding(encoding)
        if compress and enc in ("gzip", "deflate"):
            body = gzip.compress(body) if enc == "gzip" else zlib.compress(body)
        if encoding is not None:
            headers.append((b"Content-Encoding", encoding))
        port = urlsplit(h.node.url).port
        lines = [b"POST /api/publish HTTP/1.1", b"Host: 127.0.0.1:%d" % port, b"Connection: close"]
        lines += [n + b": " + v for n, v in headers]
        half = len(body) // 2
        resp = await raw_http(h.node.url, b"\r\n".join(lines), [body[:half], body[half:]] if chunked else body)
        what = (headers, body[:200], len(body), chunked)
        want = expect_publish(headers, body, encoding)
        event(f"status {resp.status}")
        if want.error is None and want.status == 400:  # refused by aiohttp's parser: its own plain 400
            assert resp.status == 400, (what, resp)
        elif want.undecodable and resp.status == 400 and resp.headers.get("content-type", "").startswith("text/"):
            # aiohttp's parser met the bad bytes before any handler ran (it depends on how they
            # arrive): its own plain 400, as for any request it cannot parse.
            h.notes["aiohttp refused an undecodable body itself"] += 1
        else:
            assert resp.status == want.status, (what, resp, want)
            if want.status == 200:
                assert resp.headers.get("content-type", "").startswith("application/json"), resp
                doc = resp.json()
                ids = doc["ids"] if list(doc) == ["ids"] else [doc.get("id")] if list(doc) == ["id"] else None
                assert ids and all(isinstance(i, str) and i.isdigit() for i in ids), doc
            else:
                assert assert_json_error(resp, what)["error"] == want.error, (what, resp)
        await h.end(what)


# --------------------------------------------------------------------------- bugs the fuzzers found
# Each was a 500, a traceback or an altered message before its fix.


def _head(node: RunningNode, method: str, path: str, *headers: bytes) -> bytes:
    port = urlsplit(node.url).port
    return b"\r\n".join([b"%s %s HTTP/1.1" % (method.encode(), path.encode()), b"Host: 127.0.0.1:%d" % port, *headers])


@pytest.mark.parametrize(("method", "path"), [("POST", "/api/publish"), ("GET", "/api/stats")])
async def test_fixed_authorization_not_utf8(node: RunningNode, method: str, path: str) -> None:
    resp = await raw_http(node.url, _head(node, method, path, b"Connection: close", b"Authorization: Bearer \xff"))
    assert resp.status == 401, resp
    assert assert_json_error(resp, path)["error"] == "unauthorized"


@pytest.mark.parametrize("path", ["/sse", "/ws"])
async def test_fixed_origin_not_utf8(node: RunningNode, path: str) -> None:
    headers = [b"Connection: close", b"Origin: http://\xff.example"]
    if path == "/ws":
        headers = [b"Connection: Upgrade", b"Upgrade: websocket", b"Sec-WebSocket-Version: 13"]
        headers += [b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", b"Origin: http://\xff.example"]
    resp = await raw_http(node.url, _head(node, "GET", f"{path}?token={ALICE.text}", *headers))
    assert resp.status == 403, resp
    assert assert_json_error(resp, path)["error"] == "forbidden_origin"


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate"])
async def test_fixed_publish_content_encoding_undecodable(node: RunningNode, encoding: bytes) -> None:
    head = _head(
        node,
        "POST",
        "/api/publish",
        b"Connection: close",
        b"Authorization: Bearer " + KEY,
        b"Content-Encoding: " + encoding,
    )
    resp = await raw_http(node.url, head, b'{"channel":"room:lobby","data":1}')
    assert resp.status == 400, resp
    assert assert_json_error(resp, encoding)["error"] == "bad_request"


async def test_fixed_publish_big_int_altered(node: RunningNode, http: aiohttp.ClientSession) -> None:
    async with http.ws_connect(node.ws_url, params={"token": ALICE.text, "room": "lobby"}) as ws:
        assert orjson.loads((await ws.receive(timeout=5)).data)["type"] == "welcome"
        head = _head(node, "POST", "/api/publish", b"Connection: close", b"Authorization: Bearer " + KEY)
        resp = await raw_http(node.url, head, b'{"channel":"room:lobby","data":{"n":123456789012345678901234567890}}')
        assert resp.status == 200, resp
        msg = await ws.receive(timeout=5)
        assert b'"data":{"n":123456789012345678901234567890}' in msg.data.encode(), msg.data
