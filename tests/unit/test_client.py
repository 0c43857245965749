"""The Python client (gateway.client.HeraldClient) against a scripted fake
node on loopback: the close-code rules and backoff of herald.js, URL
rotation, resume positions, commands matched by ref. Against real nodes:
tests/nats/test_client.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import WSMsgType, web

from gateway.client import (
    CommandError,
    CommandTimeout,
    HeraldClient,
    Message,
    Reset,
    Stopped,
    Subscribed,
    Unsubscribed,
    Welcome,
)
from gateway.client.calls import Calls
from gateway.client.events import event_of
from gateway.client.feed import Feed
from gateway.client.reconnect import Endpoints, Reconnect, Step, refused_code, ws_url
from gateway.client.rooms import Rooms
from gateway.frames import loads_exact

# --- the rules alone ------------------------------------------------------------------------------


def test_ws_url_derives_the_endpoint() -> None:
    assert ws_url("http://h:8080") == "ws://h:8080/ws"
    assert ws_url("https://h/") == "wss://h/ws"
    assert ws_url("ws://h:1/ws") == "ws://h:1/ws"
    assert ws_url("https://example.com/herald") == "wss://example.com/herald/ws"
    for bad in ("ftp://h", "h:8080", "http://"):
        with pytest.raises(ValueError):
            ws_url(bad)


def test_endpoints_are_tried_in_turn() -> None:
    ends = Endpoints(["http://a", "http://b"])
    assert [ends.next() for _ in range(5)] == ["ws://a/ws", "ws://b/ws", "ws://a/ws", "ws://b/ws", "ws://a/ws"]
    assert Endpoints("http://a").next() == "ws://a/ws"
    with pytest.raises(ValueError):
        Endpoints([])


def test_close_codes_decide_as_herald_js_does() -> None:
    r = Reconnect(0.5, 30.0, rand=lambda: 0.5)
    assert r.after(4003, "token does not allow room x", True) == Step(stop=True)
    assert r.after(4000, "invalid room id", True) == Step(stop=True)
    assert r.after(4403, "disconnected by the server: do not reconnect", True) == Step(stop=True)
    assert r.after(4009, "disconnected by the server: reconnect", True) == Step(0.25)  # backs off
    assert r.after(4029, "too many connections: this was the user's oldest", True) == Step(stop=True)
    assert r.after(4029, "replaced by the client's new connection (replaces=)", True) == Step(stop=True)
    for broken in (1002, 1007, 1009):  # a frame of ours the node cannot take: §8 "stop: fix the client"
        assert r.after(broken, "frame too big", True) == Step(stop=True)
    assert r.after(4008, "slow consumer: reconnect with since=<last id>", True) == Step(0.0)
    assert r.after(1012, "node restarting: reconnect in 734 ms", True) == Step(0.734)
    assert r.after(1012, "node restarting: reconnect", True) == Step(0.5)  # random <= 1 s
    assert r.after(1012, "node restarting: reconnect in 99999999 ms", True) == Step(30.0)  # capped
    # 4001: a new token once; again before a welcome: stop; without get_token: stop.
    assert r.after(4001, "token expired", True) == Step(new_token=True)
    assert r.after(4001, "malformed token", True) == Step(stop=True)
    r.opened()
    assert r.after(4001, "token expired", True) == Step(new_token=True)
    assert Reconnect().after(4001, "token expired", False) == Step(stop=True)
    # Admitted by a cookie (the connect hook; no token): the app is asked again once, after a backoff.
    r = Reconnect(0.5, 30.0, rand=lambda: 0.5)
    assert r.after(4001, "token expired", False, by_hook=True) == Step(0.25)
    assert r.after(4001, "refused by the app", False, by_hook=True) == Step(stop=True)
    # An upgrade refused with an HTTP status: the close code of that status (herald.js reads SSE's so).
    statuses = (400, 401, 403, 404, 426, 429, 500, 502, 503)
    assert [refused_code(s) for s in statuses] == [4000, 4001, 4003, 4000, 4000, 4029, 1011, 1013, 1013]
    # A proxy's or a wrong URL's: a 4xx the same request would get again stops as 4000 (herald.js too);
    # 408 and every 5xx back off and retry (None: as a dropped connection; 1013).
    others = (405, 410, 414, 431, 408, 421, 502, 504, 599, 200, 302)
    assert [refused_code(s) for s in others] == [4000, 4000, 4000, 4000, None, None, 1013, 1013, 1013, None, None]
    assert Reconnect().after(refused_code(414), "upgrade refused: HTTP 414", True) == Step(stop=True)
    assert not Reconnect().after(refused_code(502), "upgrade refused: HTTP 502", True).stop


def test_backoff_is_full_jitter_doubling_up_to_the_cap_and_reset_by_a_welcome() -> None:
    r = Reconnect(0.5, 4.0, rand=lambda: 0.999)
    bounds = [round(r.after(None if i % 2 else 1011, "", True).delay / 0.999, 6) for i in range(6)]
    assert bounds == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert r.after(4029, "rate limited", True).delay == pytest.approx(4.0 * 0.999)  # not the oldest: backs off
    r.opened()
    assert r.backoff() == pytest.approx(0.5 * 0.999)
    zero = Reconnect(0.5, 4.0, rand=lambda: 0.0)
    assert zero.backoff() == 0.0
    for _ in range(200):  # no overflow however long it fails
        zero.backoff()
    with pytest.raises(ValueError):
        Reconnect(0, 1)


async def test_feed_keeps_the_resume_position_and_drops_what_came_already() -> None:
    feed = Feed(10, since="5")
    feed.welcomed(Welcome("n:1", "alice", "n", ("user",), 0, "40"))
    assert feed.since == "5"  # started from 5: the welcome's position would skip the replay
    await feed.put(Message("room:a", "7", "m", 1))
    await feed.put(Message("room:b", "9", "m", 2))
    await feed.put(Message("room:a", "8", "m", 3))  # a repaired gap: smaller than b's, new on a
    await feed.put(Message("room:b", "9", "m", 2))  # the same again after a reconnect
    await feed.put(Message("room:a", None, "typing", 4))  # ephemeral
    assert feed.since == "9" and feed.duplicates == 1
    got = [await feed.get() for _ in range(4)]
    assert [(m.channel, m.id) for m in got if isinstance(m, Message)] == [
        ("room:a", "7"),
        ("room:b", "9"),
        ("room:a", "8"),
        ("room:a", None),
    ]
    replay = feed.rewind("room:a", "6")  # subscribe(room, since=6): its replay is wanted
    await feed.put(Message("room:a", "7", "m", 1))
    assert (await feed.get()) == Message("room:a", "7", "m", 1)
    again = feed.rewind("room:a", "6")  # another one, before the first is answered
    feed.rewound("room:a", replay)  # the first's answer leaves the second's window open
    await feed.put(Message("room:a", "7", "m", 1))
    assert (await feed.get()) == Message("room:a", "7", "m", 1)
    feed.rewound("room:a", again)
    await feed.put(Message("room:a", "7", "m", 1))
    assert len(feed) == 0 and feed.duplicates == 2
    fresh = Feed(10)
    fresh.welcomed(Welcome("n:1", "alice", "n", ("user",), None, "40"))
    assert fresh.since == "40"  # nothing received: resume from the welcome's position
    fresh.end(Stopped(4003, "no"))
    with pytest.raises(Stopped):
        await fresh.get()


async def test_a_reset_starts_the_channels_count_over_only_past_the_streams_end() -> None:
    """docs/protocol.md §7.2. A reset for messages no longer held (or lost in
    transit) is of the same stream: its ids go on, and the count of what was
    handed out stays. Every reset used to start it over, so a later resume
    that brought the channel's held messages again (with its reset again)
    handed them out twice. Only a reset for a position past the stream's end
    (above the welcome's position) means ids start over."""
    feed = Feed(10, since="50")
    feed.welcomed(Welcome("n:1", "alice", "n", ("room:a",), None, "60"))
    await feed.put(Reset("room:a", "messages missed are no longer held"))
    for seq in ("55", "58", "55", "58", "61"):  # 55 and 58 again: the next resume's replay
        await feed.put(Message("room:a", seq, "m", seq))
    feed.welcomed(Welcome("n:2", "alice", "n", ("room:a",), None, "3"))  # from 61: a recreated stream
    await feed.put(Reset("room:a", "messages missed are no longer held"))
    await feed.put(Message("room:a", "2", "m", "2"))
    # subscribe(room, since) from a position past the end: the live messages
    # that come before its reset are new, and so are those after it.
    replay = feed.rewind("room:a", "999")
    await feed.put(Message("room:a", "4", "m", "4"))
    await feed.put(Reset("room:a", "messages missed are no longer held"))
    await feed.put(Message("room:a", "5", "m", "5"))
    feed.rewound("room:a", replay)
    got = [await feed.get() for _ in range(len(feed))]
    handed = [e.id if isinstance(e, Message) else "reset" for e in got]
    assert handed == ["reset", "55", "58", "61", "reset", "2", "4", "reset", "5"]


async def test_feed_holds_the_reader_when_full_and_lets_go_on_abort() -> None:
    feed = Feed(2)
    for i in range(2):
        await feed.put(Message("user", str(i + 1), "m", i))
    blocked = asyncio.create_task(feed.put(Message("user", "3", "m", 3)))
    await asyncio.sleep(0.02)
    assert not blocked.done() and len(feed) == 2
    await feed.get()
    await asyncio.wait_for(blocked, 1)
    assert len(feed) == 2
    feed.abort()
    assert await feed.get() is None


async def test_calls_match_answers_by_ref() -> None:
    calls = Calls()
    ref, fut = calls.open("c1")
    ref2, fut2 = calls.open("c2")
    assert ref != ref2
    assert not calls.answer({"type": "ack", "ref": "nope"})
    assert calls.answer({"type": "error", "code": "rate_limited", "message": "slow", "retry_after": 1.5, "ref": ref})
    with pytest.raises(CommandError) as refused:
        await fut
    assert (refused.value.code, refused.value.retry_after) == ("rate_limited", 1.5)
    calls.fail(CommandError("disconnected", "gone"), "c2")
    with pytest.raises(CommandError, match="disconnected"):
        await fut2
    assert len(calls) == 0


def test_frames_become_typed_events() -> None:
    assert event_of({"type": "message", "channel": "user", "id": "3", "event": "n", "data": [1]}) == Message(
        "user", "3", "n", [1]
    )
    assert event_of({"type": "message", "channel": "room:a", "event": "t", "data": None}) == Message(
        "room:a", None, "t", None
    )
    welcome = event_of({"type": "welcome", "conn": "n:1", "user": "u", "node": "n", "channels": ["user"], "x": 1})
    assert welcome == Welcome("n:1", "u", "n", ("user",), None, None)
    assert event_of({"type": "reset", "channel": "user", "reason": "r"}) == Reset("user", "r")
    assert event_of({"type": "subscribed", "room": "p"}) == Subscribed("p")
    assert event_of({"type": "unsubscribed", "room": "p"}) == Unsubscribed("p")
    assert event_of({"type": "subscribed"}) is None
    assert event_of({"type": "something-new"}) is None


def test_rooms_asked_go_in_the_url_and_granted_are_rejoined() -> None:
    rooms = Rooms(["a", "b"])
    rooms.granted("p")
    rooms.granted("a")  # already asked for: stays in the URL
    assert rooms.in_url() == ("a", "b") and rooms.all() == ("a", "b", "p")
    assert rooms.to_rejoin(["user", "room:a", "room:b"], "10") == (("p", "10"),)
    # Not answered (the connection ended): the next connection asks from 10
    # again, though it resumed from further on (other channels' messages).
    assert rooms.to_rejoin(["user"], "25") == (("p", "10"),)
    rooms.rejoined("p")
    assert rooms.to_rejoin(["user"], "30") == (("p", "30"),)
    assert rooms.to_rejoin(["room:p"], "31") == ()
    rooms.joined("p")  # subscribe acknowledged: in the URL from now on
    assert rooms.in_url() == ("a", "b", "p") and rooms.to_rejoin([], None) == ()
    rooms.unsubscribing("x")  # sent after a subscribe of x: out of the set at once
    rooms.joined("x")  # the subscribe's ack, answered before the unsubscribe's
    assert rooms.in_url() == ("a", "b", "p")
    rooms.unsubscribed("x", left=True)  # the node ran it after: x is left
    assert rooms.in_url() == ("a", "b", "p")
    rooms.unsubscribing("b")
    assert rooms.in_url() == ("a", "p")
    rooms.unsubscribed("b", left=False)  # refused, not run: b is kept
    assert rooms.in_url() == ("a", "b", "p")
    rooms.granted("q")
    rooms.left("a")
    rooms.left("q")
    assert rooms.all() == ("b", "p")
    rooms.granted("q")
    rooms.keep_only(["p", "q"])
    assert rooms.all() == ("p", "q")


# --- a scripted node ------------------------------------------------------------------------------

Script = Callable[[web.WebSocketResponse, "Visit"], Awaitable[None]]


@dataclass
class Visit:
    """One connection the fake node accepted."""

    at: float
    query: list[tuple[str, str]]
    token: str
    cookie: str = ""
    sent: list[dict[str, Any]] = field(default_factory=list)

    def param(self, name: str) -> str | None:
        return next((v for k, v in self.query if k == name), None)


@dataclass
class FakeNode:
    url: str
    scripts: list[Script]
    visits: list[Visit] = field(default_factory=list)
    refusals: list[int] = field(default_factory=list)  # HTTP statuses of the next upgrades, refused


def welcome(n: int = 1, position: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "welcome", "conn": f"fake:{n}", "user": "alice", "node": "fake", "channels": []}
    if position is not None:
        frame["position"] = position
    return frame


def closes(code: int, reason: str = "", frames: tuple[dict[str, Any], ...] = (), welcomed: bool = True) -> Script:
    """Welcome (unless refused at open), ``frames``, then a close with ``code``."""

    async def script(ws: web.WebSocketResponse, visit: Visit) -> None:
        if welcomed:
            await ws.send_json(welcome())
        for frame in frames:
            await ws.send_json(frame)
        await ws.close(code=code, message=reason.encode())

    return script


async def serves(ws: web.WebSocketResponse, visit: Visit) -> None:
    """Welcome, then answer commands."""
    await ws.send_json(welcome(len(visit.sent)))
    await answers(ws, visit)


async def answers(ws: web.WebSocketResponse, visit: Visit) -> None:
    """Answer commands (an error for "publish" into "secret")."""
    async for msg in ws:
        if msg.type is not WSMsgType.TEXT:
            continue
        cmd = loads_exact(msg.data)
        visit.sent.append(cmd)
        kind, ref = cmd["type"], cmd.get("ref")
        if kind == "publish" and cmd["room"] == "secret":
            await ws.send_json({"type": "error", "code": "forbidden", "message": "no", "ref": ref})
        elif kind == "history":
            data = [{"type": "message", "channel": "room:a", "id": "4", "event": "e", "data": 1}]
            await ws.send_json({"type": "history", "channel": "room:a", "messages": data, "ref": ref})
        elif kind == "hang":
            continue
        elif kind == "ping":
            await ws.send_json({"type": "pong", "ref": ref})
        else:
            await ws.send_json({"type": "ack", "id": "9", "ref": ref})


@pytest.fixture
async def fake_node() -> AsyncIterator[FakeNode]:
    node = FakeNode("", [])

    async def handler(request: web.Request) -> web.StreamResponse:
        headers = request.headers
        visit = Visit(
            time.monotonic(), list(request.query.items()), headers.get("Authorization", ""), headers.get("Cookie", "")
        )
        node.visits.append(visit)
        if node.refusals:
            return web.json_response({"error": "refused", "message": "no"}, status=node.refusals.pop(0))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        script = node.scripts.pop(0) if node.scripts else serves
        await script(ws, visit)
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    node.url = f"http://{host}:{port}"
    yield node
    await runner.cleanup()


def fast(url: str | list[str], **kwargs: Any) -> HeraldClient:
    kwargs.setdefault("token", "t0")
    return HeraldClient(url, min_delay=0.01, max_delay=0.05, timeout=2.0, **kwargs)


async def test_1012_waits_the_hinted_delay_then_resumes(fake_node: FakeNode) -> None:
    msg = {"type": "message", "channel": "user", "id": "17", "event": "n", "data": {}}
    fake_node.scripts = [closes(1012, "node restarting: reconnect in 600 ms", (msg,))]
    async with HeraldClient(fake_node.url, token="t0", rooms=["a", "b"], min_delay=0.01, max_delay=5) as client:
        await client.ping()
        first, second = fake_node.visits
    gap = second.at - first.at
    assert 0.6 <= gap < 1.2, gap
    assert first.query == [("room", "a"), ("room", "b")] and first.token == "Bearer t0"
    assert second.param("since") == "17"


async def test_4008_reconnects_at_once_and_1011_backs_off(fake_node: FakeNode) -> None:
    fake_node.scripts = [closes(4008, "slow consumer"), closes(1011, "internal error")]
    async with HeraldClient(fake_node.url, token="t", min_delay=0.3, max_delay=0.3) as client:
        await client.ping()
    a, b, c = fake_node.visits
    assert b.at - a.at < 0.2
    assert c.at - b.at < 0.35  # full jitter: anywhere within min_delay


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (4003, "token does not allow room x"),
        (4000, "invalid room id"),
        (4029, "this was the user's oldest"),
        (4403, "disconnected by the server: do not reconnect"),
        (1009, "frame too big"),
    ],
)
async def test_stopping_codes_end_the_iterator_with_stopped(fake_node: FakeNode, code: int, reason: str) -> None:
    msg = {"type": "message", "channel": "user", "id": "1", "event": "n", "data": 1}
    fake_node.scripts = [closes(code, reason, (msg,))]
    async with fast(fake_node.url) as client:
        got = []
        with pytest.raises(Stopped) as stopped:
            async for message in client:
                got.append(message)
        assert (stopped.value.code, stopped.value.reason) == (code, reason)
        assert got == [Message("user", "1", "n", 1)]  # what came before the close is not lost
        with pytest.raises(Stopped):
            await client.ping()  # commands fail at once, not after the timeout
    assert len(fake_node.visits) == 1


async def test_4001_asks_get_token_once(fake_node: FakeNode) -> None:
    asked: list[int] = []

    async def get_token() -> str:
        asked.append(1)
        return f"t{len(asked)}"

    # Expired while open: a new token (t2), and again after t2's welcome (t3); t3 refused at open: stop.
    fake_node.scripts = [closes(4001, "token expired"), closes(4001, "token expired")]
    fake_node.scripts += [closes(4001, "malformed token", welcomed=False)]
    async with HeraldClient(fake_node.url, get_token=get_token, min_delay=0.01) as client:
        with pytest.raises(Stopped) as stopped:
            async for _ in client:
                pass
    assert (stopped.value.code, stopped.value.reason) == (4001, "malformed token")
    assert [v.token for v in fake_node.visits] == ["Bearer t1", "Bearer t2", "Bearer t3"]


async def test_urls_are_tried_in_turn_and_refused_upgrades_back_off(fake_node: FakeNode) -> None:
    dead = "http://127.0.0.1:9"  # discard port: refused
    async with fast([dead, fake_node.url]) as client:
        await client.ping()
        assert client.connected and client.welcome is not None


async def test_commands_answer_by_ref_and_errors_raise(fake_node: FakeNode) -> None:
    async with fast(fake_node.url) as client:
        assert await client.publish("lobby", {"x": 1}, event="chat") == "9"
        with pytest.raises(CommandError) as refused:
            await client.publish("secret", 1, ephemeral=True)
        assert refused.value.code == "forbidden"
        page = await client.history(room="a", limit=5, before="10")
        assert page == [Message("room:a", "4", "e", 1)]
        await client.history(channel="user")
        with pytest.raises(ValueError):
            await client.history()
        await client.subscribe("b", since="3")
        await client.subscribe("b", since="\u00b2")  # not an id: the node's to refuse, no ValueError here
        assert client.rooms == ("b",)
        await client.unsubscribe("b")
        assert client.rooms == ()
        assert await client.read("9") == "9"
        sent = [{k: v for k, v in c.items() if k != "ref"} for c in fake_node.visits[0].sent]
    assert sent == [
        {"type": "publish", "room": "lobby", "data": {"x": 1}, "event": "chat"},
        {"type": "publish", "room": "secret", "data": 1, "ephemeral": True},
        {"type": "history", "room": "a", "limit": 5, "before": "10"},
        {"type": "history", "channel": "user", "limit": 50},
        {"type": "subscribe", "room": "b", "since": "3"},
        {"type": "subscribe", "room": "b", "since": "\u00b2"},
        {"type": "unsubscribe", "room": "b"},
        {"type": "read", "id": "9"},
    ]
    assert len({c["ref"] for c in fake_node.visits[0].sent}) == len(sent)


async def test_a_command_times_out_and_a_dropped_one_fails(fake_node: FakeNode) -> None:
    async def drops(ws: web.WebSocketResponse, visit: Visit) -> None:
        await ws.send_json(welcome())
        await ws.receive()  # the command: then the connection drops
        await ws.close(code=1011, message=b"internal error")

    fake_node.scripts = [drops]
    async with HeraldClient(fake_node.url, token="t", timeout=0.3, min_delay=0.5, max_delay=0.5) as client:
        with pytest.raises(CommandError) as dropped:
            await client.publish("lobby", 1)
        assert dropped.value.code == "disconnected"
        with pytest.raises(CommandTimeout):
            await client._command("hang", {})
        with pytest.raises(TimeoutError):  # CommandTimeout is a TimeoutError too
            await client._command("hang", {})


async def test_the_welcome_position_is_the_resume_point_and_close_is_clean(fake_node: FakeNode) -> None:
    closed: list[int | None] = []

    async def positioned(ws: web.WebSocketResponse, visit: Visit) -> None:
        await ws.send_json(welcome(position="1234"))
        await ws.close(code=1013, message=b"broker unavailable: try again")

    async def records(ws: web.WebSocketResponse, visit: Visit) -> None:
        await ws.send_json(welcome())
        async for _ in ws:
            pass
        closed.append(ws.close_code)

    fake_node.scripts = [positioned, records]
    client = fast(fake_node.url, since=None)
    async with client:
        kinds = []
        async for event in client.events():
            kinds.append(type(event).__name__)
            if len(kinds) == 2:
                break
        assert kinds == ["Welcome", "Welcome"]
        assert fake_node.visits[1].param("since") == "1234"
        assert client.position == "1234"
    assert closed == [1000]  # closed with a close frame, not dropped
    with pytest.raises(CommandError, match="closed"):
        await client.ping()


async def test_resets_go_to_on_reset_in_order(fake_node: FakeNode) -> None:
    seen: list[str] = []

    async def on_reset(reset: Reset) -> None:
        seen.append(f"reset {reset.channel}")

    frames = (
        {"type": "message", "channel": "room:a", "id": "1", "event": "m", "data": 1},
        {"type": "reset", "channel": "room:a", "reason": "messages missed are no longer held"},
        {"type": "join", "room": "a", "user": "bob"},
        {"type": "message", "channel": "room:a", "id": "5", "event": "m", "data": 5},
    )
    fake_node.scripts = [closes(4003, "forbidden", frames)]
    async with fast(fake_node.url, on_reset=on_reset) as client:
        with pytest.raises(Stopped):
            async for message in client:
                seen.append(f"message {message.id}")
    assert seen == ["message 1", "reset room:a", "message 5"]


async def test_rooms_the_backend_joined_are_asked_for_again_after_a_reconnect(fake_node: FakeNode) -> None:
    frames = (
        {"type": "subscribed", "room": "project-9"},
        {"type": "subscribed", "room": "gone"},
        {"type": "message", "channel": "room:project-9", "id": "12", "event": "m", "data": 1},
        {"type": "unsubscribed", "room": "gone"},
    )

    async def refuses(ws: web.WebSocketResponse, visit: Visit) -> None:
        await ws.send_json(welcome())
        async for msg in ws:
            cmd = orjson.loads(msg.data)
            visit.sent.append(cmd)
            await ws.send_json({"type": "error", "code": "forbidden", "message": "no", "ref": cmd["ref"]})

    async def acks_once(ws: web.WebSocketResponse, visit: Visit) -> None:
        await ws.send_json(welcome())
        cmd = orjson.loads((await ws.receive()).data)
        visit.sent.append(cmd)
        await ws.send_json({"type": "ack", "channel": f"room:{cmd['room']}", "ref": cmd["ref"]})
        await ws.close(code=1011, message=b"internal error")

    fake_node.scripts = [closes(1011, "internal error", frames), acks_once, refuses]
    async with fast(fake_node.url, rooms=["lobby"]) as client:
        kinds = []
        async for event in client.events():
            kinds.append(type(event).__name__)
            if len(kinds) == 6:
                break
        assert kinds == ["Welcome", "Subscribed", "Subscribed", "Message", "Unsubscribed", "Welcome"]
        assert client.rooms == ("lobby", "project-9")
        await wait_until(lambda: len(fake_node.visits) == 3 and len(fake_node.visits[2].sent) == 1)
        await wait_until(lambda: client.rooms == ("lobby",))  # the token no longer allows it: given up
    first, second, third = fake_node.visits[:3]
    assert first.query == second.query[:1] == [("room", "lobby")]  # never in the URL
    assert second.param("since") == "12"
    assert [{k: v for k, v in c.items() if k != "ref"} for c in second.sent] == [
        {"type": "subscribe", "room": "project-9", "since": "12"}
    ]
    assert third.sent[0]["type"] == "subscribe"


async def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def test_needs_a_token_or_headers_and_async_with() -> None:
    with pytest.raises(ValueError):
        HeraldClient("http://h")
    HeraldClient("http://h", headers={"Cookie": "sid=1"})  # a connect hook decides
    with pytest.raises(RuntimeError, match="async with"):
        HeraldClient("http://h", token="t").__aiter__()


async def test_headers_go_with_every_connect_and_a_refused_cookie_stops(fake_node: FakeNode) -> None:
    """A session cookie instead of a token (a node whose connect hook decides):
    sent on each connect, no Authorization. A 4001 (the app's answer
    expired) connects again so the app is asked again; refused again before a
    welcome, the client stops."""
    fake_node.scripts = [
        closes(4008, "slow consumer"),
        closes(4001, "token expired"),
        closes(4001, "refused by the app", welcomed=False),
    ]
    client = fast(fake_node.url, token=None, headers={"Cookie": "sid=abc"})
    async with client:
        with pytest.raises(Stopped) as stopped:
            async for _ in client:
                pass
    assert stopped.value.code == 4001
    assert [(v.token, v.cookie) for v in fake_node.visits] == [("", "sid=abc")] * 3


# --- refusals: before the upgrade, too large, for now ---------------------------------------------


@pytest.mark.parametrize(("status", "code"), [(400, 4000), (403, 4003), (401, 4001)])
async def test_an_upgrade_refused_for_good_stops_the_client(fake_node: FakeNode, status: int, code: int) -> None:
    """An upgrade refused with 400, 403 (forbidden_origin) or 401 (no
    get_token to ask) is read as its close code (docs/protocol.md §8): the
    client stops. It used to retry such refusals forever."""
    fake_node.refusals = [status] * 100
    async with fast(fake_node.url) as client:
        with pytest.raises(Stopped) as stopped:
            async with asyncio.timeout(2):
                async for _ in client:
                    pass
    assert stopped.value.code == code and f"HTTP {status}" in stopped.value.reason
    assert len(fake_node.visits) == 1


@pytest.mark.parametrize("status", [503, 429, 500, 502])
async def test_an_upgrade_refused_for_now_is_retried(fake_node: FakeNode, status: int) -> None:
    fake_node.refusals = [status, status]
    async with fast(fake_node.url) as client:
        await client.ping()
    assert len(fake_node.visits) == 3


async def test_a_command_over_max_frame_is_refused_unsent(fake_node: FakeNode) -> None:
    """A command over the node's ws.max_frame would close the connection
    1009: it used to be sent, and failed with ``disconnected`` ("may or may
    not have run") though it certainly did not run. It is refused before it
    is sent; the connection stays."""
    async with fast(fake_node.url) as client:
        await client.ping()
        with pytest.raises(CommandError) as refused:
            await client.publish("lobby", "x" * 70_000)  # over the default: 64 KiB
        assert refused.value.code == "too_large"
        await client.publish("lobby", "x" * 60_000)
    async with fast(fake_node.url, max_frame=1000) as client:  # a node with a smaller ws.max_frame
        with pytest.raises(CommandError, match="too_large"):
            await client.publish("lobby", "x" * 1000)
    assert [c["type"] for c in fake_node.visits[0].sent] == ["ping", "publish"]
    assert all(visit.sent == [] for visit in fake_node.visits[1:])


async def test_integers_past_64_bits_are_exact_both_ways(fake_node: FakeNode) -> None:
    """docs/protocol.md §3.2: data's integers are exact at any size. The
    client read them as floats, and could not send them (orjson refuses)."""
    big = 123456789012345678901234567890

    async def sends_big(ws: web.WebSocketResponse, visit: Visit) -> None:
        await ws.send_json(welcome())
        await ws.send_str(f'{{"type":"message","channel":"user","id":"5","event":"m","data":{{"n":{big}}}}}')
        await answers(ws, visit)

    fake_node.scripts = [sends_big]
    async with fast(fake_node.url) as client:
        message = await anext(aiter(client))
        assert message.data == {"n": big}
        await client.publish("lobby", {"n": -big})
        assert fake_node.visits[0].sent[-1]["data"] == {"n": -big}


async def test_malformed_messages_and_resets_are_ignored(fake_node: FakeNode) -> None:
    frames = (
        {"type": "message", "channel": "user", "id": "1e3", "event": "m", "data": 1},  # no id to resume from
        {"type": "reset", "reason": "no channel"},
        {"type": "message", "channel": "user", "id": "7", "event": "m", "data": 2},
    )
    fake_node.scripts = [closes(4003, "forbidden", frames)]
    async with fast(fake_node.url) as client:
        events = []
        with pytest.raises(Stopped):
            async for event in client.events():
                events.append(event)
    assert [e for e in events if not isinstance(e, Welcome)] == [Message("user", "7", "m", 2)]
    assert client.position == "7"


# --- the room set: re-joins, and leaving while joining ---------------------------------------------


def granted(*rooms: str) -> Script:
    """A connection on which the backend joins ``rooms``, then drops (1011)."""
    return closes(1011, "internal error", tuple({"type": "subscribed", "room": r} for r in rooms))


def subscribes(visit: Visit) -> list[str]:
    return [c["room"] for c in visit.sent if c["type"] == "subscribe"]


async def test_a_rejoin_refused_for_now_is_asked_again_on_the_same_connection(fake_node: FakeNode) -> None:
    """A re-join refused rate_limited is asked again after retry_after, on
    the same connection, and the rooms after it are asked for too (as
    herald.js does). It used to end the re-join: that room and the next ones
    stayed out until the next reconnect."""

    async def limits_once(ws: web.WebSocketResponse, visit: Visit) -> None:
        await ws.send_json(welcome())
        async for msg in ws:
            cmd = orjson.loads(msg.data)
            visit.sent.append(cmd)
            if subscribes(visit) == ["p1"]:
                error = {"type": "error", "code": "rate_limited", "message": "slow down", "retry_after": 0.1}
                await ws.send_json({**error, "ref": cmd["ref"]})
            else:
                await ws.send_json({"type": "ack", "channel": f"room:{cmd['room']}", "ref": cmd["ref"]})

    fake_node.scripts = [granted("p1", "p2"), limits_once]
    async with fast(fake_node.url) as client:
        await wait_until(lambda: len(fake_node.visits) == 2 and len(fake_node.visits[1].sent) == 3)
        await asyncio.sleep(0.2)
        assert client.rooms == ("p1", "p2")
    second = fake_node.visits[1]
    assert sorted(subscribes(second)) == ["p1", "p1", "p2"] and subscribes(second)[-1] == "p1"
    assert len(fake_node.visits) == 2


async def test_unsubscribe_is_not_undone_by_a_rejoin_under_way(fake_node: FakeNode) -> None:
    """The application leaves b right after a reconnect's welcome, while the
    re-join of a and b is under way. The re-join used to take its list of
    rooms at the welcome, and ask for b after the unsubscribe (the
    connection was in b again); a room is now asked for only while wanted,
    also when its re-join was refused for now and waits to ask again."""

    async def holds_a(ws: web.WebSocketResponse, visit: Visit) -> None:
        await ws.send_json(welcome(2))
        held: list[dict[str, Any]] = []
        async for msg in ws:
            cmd = orjson.loads(msg.data)
            visit.sent.append(cmd)
            if cmd["type"] == "subscribe" and cmd["room"] == "a":
                held.append(cmd)  # answered once b is left
                continue
            if cmd["type"] == "subscribe":
                error = {"type": "error", "code": "rate_limited", "message": "slow down", "retry_after": 0.2}
                await ws.send_json({**error, "ref": cmd["ref"]})
                continue
            for answered in [*held, cmd]:
                await ws.send_json({"type": "ack", "ref": answered["ref"]})
            held.clear()

    fake_node.scripts = [granted("a", "b"), holds_a]
    async with fast(fake_node.url) as client:
        events = client.events()
        async with asyncio.timeout(2):
            while await anext(events) != Welcome("fake:2", "alice", "fake", (), None, None):
                pass
        await client.unsubscribe("b")
        assert client.rooms == ("a",)
        await asyncio.sleep(0.4)  # b's retry would be due
    sent = [(c["type"], c["room"]) for c in fake_node.visits[1].sent]
    assert sent[sent.index(("unsubscribe", "b")) :] == [("unsubscribe", "b")], sent


async def test_unsubscribe_right_after_subscribe_leaves_the_room(fake_node: FakeNode) -> None:
    """subscribe(x) then unsubscribe(x) without waiting (a UI toggled
    twice): the node joins then leaves. The subscribe's ack used to put x
    back in the room set after unsubscribe took it out, so every reconnect
    joined x again."""
    async with fast(fake_node.url) as client:
        await client.ping()
        joining = asyncio.create_task(client.subscribe("x"))
        await asyncio.sleep(0)  # sent
        await client.unsubscribe("x")
        await joining
        assert client.rooms == ()
        await client.subscribe("x")  # and joined again
        assert client.rooms == ("x",)
    assert [(c["type"], c.get("room")) for c in fake_node.visits[0].sent][1:] == [
        ("subscribe", "x"),
        ("unsubscribe", "x"),
        ("subscribe", "x"),
    ]
