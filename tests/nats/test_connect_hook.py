"""The connect hook (``auth.mode = "hook" | "either"``) and trusted proxies,
against real nodes and a stand-in for the app: an aiohttp app on loopback
that knows sessions by cookie, as a web app's login does."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from broker.embedded import free_port
from gateway.client import HeraldClient

from ..helpers import (
    ADMIN_KEY,
    NodeFactory,
    RunningNode,
    SseClient,
    api_publish,
    expect_close,
    recv_json,
    recv_until,
    scrape,
    token,
    wait_for,
)
from .test_fuzz import raw_http

CONNECT_SECRET = "connect-secret-0123456789"


# The receiver's verifier, exactly as README ("Webhooks") gives it.
def verify(secret: str, header: str, body: bytes, tolerance: float = 300) -> bool:
    fields = [part.partition("=") for part in header.split(",")]
    stamps = [v for k, _, v in fields if k == "t"]
    if len(stamps) != 1 or not stamps[0].isdigit() or abs(time.time() - int(stamps[0])) > tolerance:
        return False  # no timestamp, or a replay
    expected = hmac.new(secret.encode(), stamps[0].encode() + b"." + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, v) for k, _, v in fields if k == "v1")


@dataclass
class App:
    """The app: ``sessions`` maps a ``sid`` cookie to the answer for its user
    (403 for any other); ``answer`` overrides that with (status, raw body), or
    "hang"."""

    url: str = ""
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    answer: tuple[int, bytes] | str | None = None
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    held: asyncio.Event | None = None  # set: answers wait for it (an ask under way)

    def login(self, sid: str, user: str, rooms: list[str], ttl: float = 3600, **extra: Any) -> str:
        self.sessions[sid] = {"user": user, "rooms": rooms, "publish": rooms, "expires": time.time() + ttl, **extra}
        return f"theme=dark; sid={sid}"

    def bodies(self) -> list[dict[str, Any]]:
        return [orjson.loads(body) for _, body in self.requests]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((dict(request.headers), body))
        if self.answer == "hang":
            await asyncio.sleep(3600)
        # Who the cookie is, decided on arrival (as an app reads its session store), then maybe slow to answer.
        cookie = orjson.loads(body)["headers"]["cookie"] or ""
        sid = dict(part.strip().partition("=")[::2] for part in cookie.split(";")).get("sid", "")
        session = self.sessions.get(sid)
        if self.held is not None:
            await self.held.wait()
        if isinstance(self.answer, tuple):
            status, raw = self.answer
            return web.Response(status=status, body=raw, content_type="application/json")
        if session is None:
            return web.json_response({"error": "not logged in"}, status=403)
        return web.Response(body=orjson.dumps(session), content_type="application/json")


@pytest.fixture
async def app() -> AsyncIterator[App]:
    stand_in = App()
    web_app = web.Application()
    web_app.router.add_post("/herald/connect", stand_in.handle)
    runner = web.AppRunner(web_app, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stand_in.url = f"http://127.0.0.1:{port}/herald/connect"
    yield stand_in
    await runner.cleanup()


def auth(url: str, mode: str = "hook", **extra: Any) -> dict[str, Any]:
    return {"mode": mode, "connect_url": url, "connect_secret": CONNECT_SECRET, "connect_timeout": 1.0, **extra}


@pytest.fixture
async def sse_streams() -> AsyncIterator[list[aiohttp.ClientResponse]]:
    streams: list[aiohttp.ClientResponse] = []
    yield streams
    for resp in streams:
        resp.close()


async def open_ws(
    http: aiohttp.ClientSession, node: RunningNode, cookie: str | None, *, rooms: tuple[str, ...] = (), **params: str
) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    headers = {"Cookie": cookie} if cookie else {}
    ws = await http.ws_connect(node.ws_url, params=[("room", r) for r in rooms] + list(params.items()), headers=headers)
    first = await recv_json(ws)
    assert first["type"] == "welcome", first
    return ws, first


async def ws_close(
    http: aiohttp.ClientSession, node: RunningNode, cookie: str | None, **params: str
) -> tuple[int | None, str]:
    headers = {"Cookie": cookie} if cookie else {}
    async with http.ws_connect(node.ws_url, params=params, headers=headers) as ws:
        return await expect_close(ws, timeout=5.0)


async def sse_status(
    http: aiohttp.ClientSession, node: RunningNode, cookie: str | None, **params: str
) -> tuple[int, dict[str, Any]]:
    headers = {"Cookie": cookie} if cookie else {}
    async with http.get(node.url + "/sse", params=params, headers=headers) as resp:
        assert resp.content_type == "application/json", (resp.status, resp.content_type)
        return resp.status, await resp.json()


async def command(
    http: aiohttp.ClientSession, node: RunningNode, cookie: str | None, cmd: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    headers = {"Cookie": cookie} if cookie else {}
    async with http.post(node.url + "/api/command", json=cmd, headers=headers) as resp:
        return resp.status, await resp.json()


# -- admitted as the user the app names -------------------------------------------


async def test_cookie_admits_the_user_it_names_with_its_rooms(
    node_factory: NodeFactory, app: App, http: aiohttp.ClientSession, sse_streams: list[aiohttp.ClientResponse]
) -> None:
    node = await node_factory(auth=auth(app.url))
    cookie = app.login("s-alice", "alice", ["lobby", "chat-*"])
    origin = node.url
    ws = await http.ws_connect(
        node.ws_url, params={"room": "lobby"}, headers={"Cookie": cookie, "Origin": origin, "User-Agent": "test/1"}
    )
    welcome = await recv_json(ws)
    assert (welcome["type"], welcome["user"]) == ("welcome", "alice")
    assert set(welcome["channels"]) == {"user", "broadcast", "room:lobby"}

    # What the app was asked, and that the README's verifier accepts its signature.
    [(headers, body)] = app.requests
    assert verify(CONNECT_SECRET, headers["Herald-Signature"], body)
    assert not verify("another-secret", headers["Herald-Signature"], body)
    assert orjson.loads(body) == {
        "transport": "ws",
        "headers": {"cookie": cookie, "origin": origin, "user-agent": "test/1"},
        "query": "room=lobby",
        "remote": "127.0.0.1",
    }
    assert headers["Content-Type"] == "application/json"

    # Its user channel, and only the rooms the app allows.
    msg_id = await api_publish(http, node, "user:alice", {"n": 1})
    assert (await recv_until(ws, "message"))["id"] == msg_id
    await ws.send_json({"type": "subscribe", "room": "chat-7", "ref": "1"})
    assert (await recv_json(ws))["type"] == "ack"
    await ws.send_json({"type": "subscribe", "room": "secret", "ref": "2"})
    assert (await recv_json(ws))["code"] == "forbidden"
    assert await ws_close(http, node, cookie, room="secret") == (4003, "token does not allow room secret")

    # SSE the same way.
    resp = await http.get(node.url + "/sse", params={"room": "chat-1"}, headers={"Cookie": cookie})
    sse_streams.append(resp)
    assert resp.status == 200
    sse = SseClient(resp)
    msg_id = await api_publish(http, node, "room:chat-1", {"n": 2})
    assert [(await sse.next()).id for _ in range(2)] == ["1", msg_id]  # alice's unread inbox first
    assert sse.welcome is not None and sse.welcome["user"] == "alice"
    assert len(app.requests) == 1  # the same cookie: its answer was kept
    await ws.close()


async def test_the_app_refusing_is_a_bad_token(
    node_factory: NodeFactory, app: App, http: aiohttp.ClientSession
) -> None:
    node = await node_factory(auth=auth(app.url))
    assert await ws_close(http, node, "sid=unknown") == (4001, "refused by the app (connect hook: HTTP 403)")
    assert await ws_close(http, node, None) == (4001, "refused by the app (connect hook: HTTP 403)")
    status, body = await sse_status(http, node, "sid=unknown")
    assert (status, body["error"]) == (401, "bad_token")
    app.answer = (401, b"")
    assert (await ws_close(http, node, "sid=x"))[0] == 4001
    assert (await sse_status(http, node, "sid=x"))[0] == 401
    metrics = await scrape(http, node.url)
    assert metrics['herald_connect_hook_total{result="refused"}'] == 5
    assert metrics['herald_connect_hook_total{result="admitted"}'] == 0
    assert metrics["herald_connect_hook_seconds_count"] == 5
    await wait_for(lambda: not node.node.sessions)


# -- no answer: 503, never admitted ------------------------------------------------


async def test_app_down_refuses_with_503_and_warns_once(
    node_factory: NodeFactory, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    down = f"http://127.0.0.1:{free_port()}/herald/connect"  # nothing listens there
    node = await node_factory(auth=auth(down))
    caplog.set_level(logging.WARNING, logger="herald.connect_hook")
    for _ in range(3):
        status, body = await sse_status(http, node, "sid=s-alice")
        assert (status, body) == (503, {"error": "unavailable", "message": "connect hook unavailable: try again"})
        assert await ws_close(http, node, "sid=s-alice") == (1013, "connect hook unavailable: try again")
    warnings = [r for r in caplog.records if r.name == "herald.connect_hook"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert down in warnings[0].getMessage() and "503" in warnings[0].getMessage()
    metrics = await scrape(http, node.url)
    assert metrics['herald_connect_hook_total{result="unreachable"}'] == 6
    assert metrics['herald_connections_closed_total{reason="unavailable",transport="ws"}'] == 0  # never opened
    assert not node.node.sessions


@pytest.mark.parametrize("answer", ["hang", (500, b"{}"), (502, b""), (302, b""), (404, b"")])
async def test_no_usable_answer_refuses_with_503(
    answer: Any, node_factory: NodeFactory, app: App, http: aiohttp.ClientSession
) -> None:
    node = await node_factory(auth=auth(app.url, connect_timeout=0.3))
    app.answer = answer
    app.login("s-alice", "alice", ["*"])
    started = time.monotonic()
    status, body = await sse_status(http, node, "sid=s-alice")
    assert (status, body["error"]) == (503, "unavailable")
    assert time.monotonic() - started < 2
    assert (await ws_close(http, node, "sid=s-alice"))[0] == 1013
    result = "timeout" if answer == "hang" else "error_status"
    assert (await scrape(http, node.url))[f'herald_connect_hook_total{{result="{result}"}}'] == 2
    assert not node.node.sessions


BAD_ANSWERS = {
    "not_json": b"<html>hello</html>",
    "not_object": b'["alice"]',
    "user_dot": b'{"user":"a.b","rooms":[],"publish":[],"expires":EXP}',
    "user_star": b'{"user":"*","rooms":[],"publish":[],"expires":EXP}',
    "user_gt": b'{"user":">","rooms":[],"publish":[],"expires":EXP}',
    "user_missing": b'{"rooms":[],"publish":[],"expires":EXP}',
    "user_number": b'{"user":7,"rooms":[],"publish":[],"expires":EXP}',
    "rooms_string": b'{"user":"alice","rooms":"lobby","publish":[],"expires":EXP}',
    "rooms_numbers": b'{"user":"alice","rooms":[1],"publish":[],"expires":EXP}',
    "rooms_wildcard": b'{"user":"alice","rooms":["lobby.>"],"publish":[],"expires":EXP}',
    "publish_object": b'{"user":"alice","rooms":[],"publish":{"a":1},"expires":EXP}',
    "expires_missing": b'{"user":"alice","rooms":[],"publish":[]}',
    "expires_past": b'{"user":"alice","rooms":[],"publish":[],"expires":1000}',
    "expires_string": b'{"user":"alice","rooms":[],"publish":[],"expires":"EXP"}',
    "expires_ms": b'{"user":"alice","rooms":[],"publish":[],"expires":EXP000}',
    "unknown_field": b'{"user":"alice","rooms":[],"publish":[],"expires":EXP,"admin":true}',
    "too_large": b'{"user":"alice","rooms":["' + b"a" * 70000 + b'"],"publish":[],"expires":EXP}',
}


@pytest.mark.parametrize("kind", list(BAD_ANSWERS))
async def test_bad_answers_refuse_with_503_and_admit_nothing(
    kind: str, node_factory: NodeFactory, app: App, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    node = await node_factory(auth=auth(app.url))
    caplog.set_level(logging.WARNING, logger="herald.connect_hook")
    app.answer = (200, BAD_ANSWERS[kind].replace(b"EXP", str(int(time.time()) + 3600).encode()))
    status, body = await sse_status(http, node, "sid=s-alice")
    assert (status, body["error"]) == (503, "unavailable")
    assert (await ws_close(http, node, "sid=s-alice"))[0] == 1013
    assert (await command(http, node, "sid=s-alice", {"type": "ping"}))[0] == 503
    assert len(app.requests) == 3  # a bad answer is not kept
    metrics = await scrape(http, node.url)
    assert metrics['herald_connect_hook_total{result="bad_answer"}'] == 3
    assert metrics['herald_connect_hook_total{result="admitted"}'] == 0
    assert not node.node.sessions
    lines = [r.getMessage() for r in caplog.records if r.name == "herald.connect_hook"]
    assert len(lines) == 1 and "bad answer" in lines[0], lines


# -- expiry ------------------------------------------------------------------------


async def test_expires_closes_the_stream_and_the_reconnect_asks_again(
    node_factory: NodeFactory, app: App, http: aiohttp.ClientSession, sse_streams: list[aiohttp.ClientResponse]
) -> None:
    node = await node_factory(auth=auth(app.url))
    cookie = app.login("s-alice", "alice", ["lobby"], ttl=2.0)
    started = time.time()
    ws, _ = await open_ws(http, node, cookie)
    resp = await http.get(node.url + "/sse", params={"envelope": "1"}, headers={"Cookie": cookie})
    sse_streams.append(resp)
    assert resp.status == 200
    assert len(app.requests) == 1  # the SSE stream's answer came from the cache

    assert await expect_close(ws, timeout=4.0) == (4001, "token expired")
    events = await SseClient(resp).read_to_end(timeout=4.0)
    assert [e.json() for e in events if e.event == "close"] == [
        {"type": "close", "code": 4001, "reason": "token expired"}
    ]
    assert time.time() - started >= 1.5

    # The app logged the session in again: the reconnect asks it (the cached answer expired with it).
    app.login("s-alice", "alice", ["lobby"], ttl=3600)
    ws, welcome = await open_ws(http, node, cookie)
    assert welcome["user"] == "alice"
    assert len(app.requests) == 2
    metrics = await scrape(http, node.url)
    assert metrics['herald_connections_closed_total{reason="token_expired",transport="ws"}'] == 1
    assert metrics['herald_connect_hook_total{result="admitted"}'] == 2
    assert metrics['herald_connect_hook_total{result="cached"}'] == 1
    await ws.close()


async def test_answers_are_kept_per_cookie_until_the_ttl(
    node_factory: NodeFactory, app: App, http: aiohttp.ClientSession
) -> None:
    node = await node_factory(auth=auth(app.url, connect_cache_ttl=1.0))
    alice = app.login("s-alice", "alice", ["*"])
    bob = app.login("s-bob", "bob", ["*"])
    # A burst of connections with one cookie asks the app once.
    opened = await asyncio.gather(*(open_ws(http, node, alice) for _ in range(5)))
    assert {welcome["user"] for _, welcome in opened} == {"alice"}
    assert len(app.requests) == 1
    _, welcome = await open_ws(http, node, bob)
    assert welcome["user"] == "bob" and len(app.requests) == 2
    # A logout at the app is seen once the kept answer is older than the ttl.
    del app.sessions["s-alice"]
    await asyncio.sleep(1.1)
    assert (await ws_close(http, node, alice))[0] == 4001
    for ws, _ in opened:
        await ws.close()


async def test_a_disconnect_by_the_backend_drops_the_kept_answers_on_every_node(
    node_factory: NodeFactory, app: App, http: aiohttp.ClientSession
) -> None:
    """After POST /api/disconnect (a logout, a permission change) the user's
    reconnects ask the app again, on each node, instead of being admitted on
    the answer kept from before."""
    tag = "ch" + uuid.uuid4().hex[:8]
    shared: dict[str, Any] = {"subject": {"prefix": tag}, "stream": {"name": tag.upper(), "storage": "memory"}}
    a, b = [await node_factory(auth=auth(app.url), **shared) for _ in range(2)]
    alice = app.login("s-alice", "alice", ["lobby"])
    on_a, _ = await open_ws(http, a, alice)
    on_b, _ = await open_ws(http, b, alice)
    await (await open_ws(http, a, alice))[0].close()  # kept: not asked again
    assert len(app.requests) == 2  # once per node
    async with http.post(
        b.url + "/api/disconnect", json={"user": "alice"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as resp:
        assert resp.status == 200 and (await resp.json())["disconnected"] == 2
    assert (await expect_close(on_a))[0] == 4009 and (await expect_close(on_b))[0] == 4009
    app.sessions["s-alice"]["rooms"] = []  # the app changed what alice may join
    for node in (a, b):
        ws, welcome = await open_ws(http, node, alice)
        assert welcome["user"] == "alice"
        await ws.close()
    assert len(app.requests) == 4
    assert app.bodies()[-1]["headers"]["cookie"] == alice


async def test_an_answer_asked_for_before_a_disconnect_is_used_but_not_kept(
    node_factory: NodeFactory, app: App, http: aiohttp.ClientSession
) -> None:
    node = await node_factory(auth=auth(app.url))
    alice = app.login("s-alice", "alice", ["lobby"])
    app.held = asyncio.Event()
    opening = asyncio.create_task(open_ws(http, node, alice))
    await wait_for(lambda: len(app.requests) == 1)
    async with http.post(
        node.url + "/api/disconnect", json={"user": "alice"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as resp:
        assert resp.status == 200
    app.held.set()
    ws, welcome = await opening  # admitted on the answer it waited for
    assert welcome["user"] == "alice"
    await ws.close()
    await (await open_ws(http, node, alice))[0].close()
    assert len(app.requests) == 2  # that answer was not kept


async def test_a_reconnect_after_a_disconnect_asks_again_while_an_older_ask_is_under_way(
    node_factory: NodeFactory, app: App, http: aiohttp.ClientSession
) -> None:
    """protocol 2.4: the reconnects a disconnect causes ask the app again. One
    arriving while an ask from before the logout is under way for the same
    cookie did not: it waited for that ask and was admitted on its answer."""
    node = await node_factory(auth=auth(app.url))
    alice = app.login("s-alice", "alice", ["lobby"])
    app.held = asyncio.Event()
    before = asyncio.create_task(open_ws(http, node, alice))  # another tab, its answer decided: alice
    await wait_for(lambda: len(app.requests) == 1)
    del app.sessions["s-alice"]  # the app logs alice out, then tells Herald
    async with http.post(
        node.url + "/api/disconnect", json={"user": "alice"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as resp:
        assert resp.status == 200
    after = asyncio.create_task(ws_close(http, node, alice))
    await wait_for(lambda: len(app.requests) == 2)
    app.held.set()
    ws, welcome = await before  # admitted on the answer it waited for
    assert welcome["user"] == "alice"
    await ws.close()
    assert (await after)[0] == 4001


async def test_a_stream_admitted_once_the_node_drains_is_refused(
    node_factory: NodeFactory, app: App, http: aiohttp.ClientSession
) -> None:
    """The node began draining (and told its sessions to go) while the hook
    was asked: the stream is refused as draining — WS 1012, SSE 503 — not
    welcomed and then dropped at exit without a word."""
    node = await node_factory(auth=auth(app.url), http={"drain_delay": 0, "shutdown_grace": 1})
    alice, bob = app.login("s-alice", "alice", ["lobby"]), app.login("s-bob", "bob", ["lobby"])
    app.held = asyncio.Event()
    ws_close_task = asyncio.create_task(ws_close(http, node, alice))
    sse_task = asyncio.create_task(sse_status(http, node, bob))
    await wait_for(lambda: len(app.requests) == 2)
    await node.node.shutdown()
    app.held.set()
    assert (await ws_close_task)[0] == 1012
    status, body = await sse_task
    assert (status, body["error"]) == (503, "draining")


# -- modes -------------------------------------------------------------------------


async def test_either_mode_a_token_wins_and_the_hook_is_asked_only_without_one(
    node_factory: NodeFactory, app: App, http: aiohttp.ClientSession
) -> None:
    node = await node_factory(auth=auth(app.url, mode="either"))
    cookie = app.login("s-bob", "bob", ["*"])
    ws, welcome = await open_ws(http, node, cookie, token=token("alice"))
    assert welcome["user"] == "alice"
    # A bad token is refused as one: the hook does not get a second say.
    assert (await ws_close(http, node, cookie, token="not-a-jwt"))[0] == 4001
    assert (await sse_status(http, node, cookie, token="not-a-jwt"))[0] == 401
    assert app.requests == []
    # Without a token (herald.js sends an empty one) the hook decides.
    ws2, welcome = await open_ws(http, node, cookie, token="")
    assert welcome["user"] == "bob"
    assert len(app.requests) == 1
    # refresh still works for the token user.
    await ws.send_json({"type": "refresh", "token": token("alice", ttl=60), "ref": "r"})
    assert (await recv_json(ws))["type"] == "ack"
    await ws.close()
    await ws2.close()


async def test_hook_mode_ignores_tokens(node_factory: NodeFactory, app: App, http: aiohttp.ClientSession) -> None:
    node = await node_factory(auth=auth(app.url))
    cookie = app.login("s-bob", "bob", ["*"])
    # A valid token is not looked at: without the app's cookie the client is refused.
    assert await ws_close(http, node, None, token=token("alice")) == (
        4001,
        "refused by the app (connect hook: HTTP 403)",
    )
    # With it the app's user is the one admitted, whatever the token says (two tokens are no conflict here).
    ws, welcome = await open_ws(http, node, cookie + "; herald_token=x", token=token("alice"))
    assert welcome["user"] == "bob"
    assert [b["query"].startswith("token=") for b in app.bodies()] == [True, True]
    await ws.close()


async def test_commands_are_identified_by_the_hook_too(
    node_factory: NodeFactory, app: App, http: aiohttp.ClientSession, sse_streams: list[aiohttp.ClientResponse]
) -> None:
    shared = {"subject": {"prefix": f"hookcmd{free_port()}"}, "stream": {"name": f"HOOKCMD{free_port()}"}}
    a = await node_factory(auth=auth(app.url), **shared)
    b = await node_factory(auth=auth(app.url), **shared)
    cookie = app.login("s-alice", "alice", ["lobby", "chat-*"])
    resp = await http.get(a.url + "/sse", params={"envelope": "1"}, headers={"Cookie": cookie})
    sse_streams.append(resp)
    welcome = (await SseClient(resp)._next(5.0)).json()  # the raw first event
    assert (welcome["type"], welcome["user"]) == ("welcome", "alice")
    conn = welcome["conn"]

    status, ack = await command(http, a, cookie, {"type": "subscribe", "room": "chat-1", "conn": conn})
    assert (status, ack) == (200, {"type": "ack", "channel": "room:chat-1"})
    assert (await command(http, a, cookie, {"type": "subscribe", "room": "secret", "conn": conn}))[0] == 403
    # Posted to another node: forwarded with what the hook is asked, and identified there again.
    status, ack = await command(http, b, cookie, {"type": "unsubscribe", "room": "chat-1", "conn": conn})
    assert (status, ack) == (200, {"type": "ack", "channel": "room:chat-1"})
    assert {body["transport"] for body in app.bodies()} <= {"sse", "command"}
    # Without the cookie: refused like a missing token; another user's cookie: not their stream.
    status, err = await command(http, a, None, {"type": "ping"})
    assert (status, err["code"]) == (401, "bad_token")
    bob = app.login("s-bob", "bob", ["*"])
    status, err = await command(http, b, bob, {"type": "unsubscribe", "room": "lobby", "conn": conn})
    assert (status, err["code"]) == (403, "forbidden")


# -- trusted proxies ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("proxies", "forwarded", "seen"),
    [
        (["127.0.0.1/32"], "203.0.113.9", "203.0.113.9"),
        ([], "203.0.113.9", "127.0.0.1"),
        (["10.0.0.0/8"], "203.0.113.9", "127.0.0.1"),  # the direct peer is no trusted proxy: a spoof
        (["127.0.0.1/32"], "198.51.100.1, 203.0.113.9", "203.0.113.9"),  # what the client wrote is left of it
        (["127.0.0.0/8", "10.0.0.0/8"], "203.0.113.9, 10.1.2.3", "203.0.113.9"),  # two proxies deep
        (["127.0.0.1/32"], "not-an-address", "127.0.0.1"),
    ],
)
async def test_the_client_address_behind_trusted_proxies(
    proxies: list[str],
    forwarded: str,
    seen: str,
    node_factory: NodeFactory,
    app: App,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    node = await node_factory(auth=auth(app.url, mode="either"), http={"trusted_proxies": proxies})
    cookie = app.login("s-alice", "alice", ["*"])
    ws = await http.ws_connect(node.ws_url, headers={"Cookie": cookie, "X-Forwarded-For": forwarded})
    assert (await recv_json(ws))["type"] == "welcome"
    await ws.close()
    assert app.bodies()[0]["remote"] == seen
    # Logs of refused tokens name the same address.
    caplog.set_level(logging.WARNING, logger="herald.node")
    headers = {"X-Forwarded-For": forwarded}
    async with http.ws_connect(node.ws_url, params={"token": "not-a-jwt"}, headers=headers) as refused:
        assert (await expect_close(refused))[0] == 4001
    refusals = [r.getMessage() for r in caplog.records if "refused token" in r.getMessage()]
    assert refusals and f"from {seen}:" in refusals[-1], refusals


async def test_the_python_client_connects_with_the_session_cookie(node_factory: NodeFactory, app: App) -> None:
    """HeraldClient with the app's session cookie as a header, no token: the
    hook names the user, and the client publishes (its messages are ``from``
    that user) and receives as that user.
    When the app's answer expires (4001), it connects again and the app is
    asked again."""
    node = await node_factory(auth=auth(app.url))
    cookie = app.login("s-py", "py-user", ["lobby"], ttl=2.0)
    client = HeraldClient(node.url, headers={"Cookie": cookie}, rooms=["lobby"], timeout=5.0, min_delay=0.05)
    async with client:
        msg_id = await client.publish("lobby", {"n": 1})
        async with asyncio.timeout(5):
            async for message in client:
                if message.id == msg_id:
                    break
        assert message.sender == "py-user"  # the hook's user is the one its messages are from
        first = client.welcome
        assert first is not None and first.user == "py-user"
        app.login("s-py", "py-user", ["lobby"])  # the session goes on: the app will say so again
        await wait_for(lambda: client.welcome is not None and client.welcome.conn != first.conn, timeout=10)
        assert await client.publish("lobby", {"n": 2})
    assert [orjson.loads(body)["headers"]["cookie"] for _, body in app.requests] == [cookie, cookie]


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (b"Cookie: theme=dark; sid=s-\xe9t\xe9", 401),  # no such session: the app refuses
        (b"Cookie: sid=s-alice\r\nUser-Agent: caf\xe9", 200),
    ],
)
async def test_headers_that_are_not_utf8_are_sent_to_the_app_replaced(
    header: bytes, status: int, node_factory: NodeFactory, app: App
) -> None:
    """Bytes that are not UTF-8 in a header the app is sent (Latin-1 clients,
    bots) made the node fail to write the request: 500 for a stream (1011 on
    WebSocket), for every request of that client. They reach the app as U+FFFD."""
    node = await node_factory(auth=auth(app.url))
    app.login("s-alice", "alice", ["lobby"])
    head = b"GET /sse HTTP/1.1\r\nHost: " + node.url.removeprefix("http://").encode() + b"\r\n" + header
    answer = await raw_http(node.url, head)
    assert (answer.status, len(app.requests)) == (status, 1), answer
    sent = app.bodies()[0]["headers"]
    assert "\ufffd" in "".join(v for v in sent.values() if v), sent
    command = b"POST /api/command HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + header
    answer = await raw_http(node.url, command, b'{"type":"ping"}')
    assert answer.status == status, answer
