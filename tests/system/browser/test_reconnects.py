"""herald.js against real nodes, through reconnects: what README's
"Browser client" section and docs/protocol.md promise, on both transports.

- A `subscribe` the node refuses costs that room only: the room joins the
  client's URL set once acknowledged, so no reconnect is refused for it; a
  stream refused at open (4000, SSE HTTP 400) stops the client.
- Rooms the backend joined (`subscribed`) are re-joined after each reconnect
  from where the stream resumed; a re-join cut short or refused for a passing
  reason is asked again from the same position; `unsubscribe` leaves them.
- Each channel's messages come once, in order: after two reconnects with a
  backend room, and when the page's node is killed, fails over or drains
  while messages keep coming.
- The default transport is "auto"; commands made while reconnecting wait for
  the connection (or their timeout); a token that expires is renewed and the
  rooms kept.
"""

from __future__ import annotations

import asyncio
import re
import signal
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page, WebSocketRoute

from broker.embedded import NatsServer, free_port

from ...helpers import NodeFactory, RunningNode, api_publish, spawn_cluster_node, token, wait_for
from ...relay import Relay
from .test_demo import admin_post

TIMEOUT = 15_000

PAGE = """async ([url, token, transport, rooms, extra]) => {
  const { Herald } = await import("/static/herald.js");
  window.got = []; window.closes = []; window.welcomes = [];
  const opts = { url, token, rooms, minDelay: 50, maxDelay: 200, ...extra };
  if (transport !== null) opts.transport = transport;
  window.c = Herald.connect(opts);
  c.on("message", (m) => got.push(m)).on("close", (e) => closes.push([e.code, e.reason]))
   .on("welcome", (w) => welcomes.push(w));
}"""


@asynccontextmanager
async def client_page(
    browser: Browser,
    node: RunningNode,
    tok: str,
    transport: str | None,
    rooms: list[str],
    wait_open: bool = True,
    setup: Any = None,
    **extra: Any,
) -> AsyncIterator[Page]:
    context = await browser.new_context()
    try:
        page = await context.new_page()
        if setup is not None:
            await setup(page)
        await page.goto(node.url + "/healthz")
        await page.evaluate(PAGE, [node.url, tok, transport, rooms, extra])
        if wait_open:
            await page.wait_for_function("c.state === 'open'", timeout=TIMEOUT)
        yield page
    finally:
        await context.close()


async def publish_while_away(http: aiohttp.ClientSession, node: RunningNode) -> list[str]:
    """A message to the backend's room p9 and one to the URL's lobby: their ids."""
    return [
        await api_publish(http, node, "room:p9", {"n": "p9 while down"}),
        await api_publish(http, node, "room:lobby", {"n": "lobby while down"}),
    ]


async def got_ids(page: Page) -> list[str]:
    ids: list[str] = await page.evaluate("got.filter((m) => m.id).map((m) => m.id)")
    return ids


# ---------------------------------------------------------------------------------------------------------
# Refusals. A room joins the URL of the next streams only once its subscribe is acknowledged: one refused
# there would refuse the whole stream (4003 / 4000, SSE 403 / 400), and the client would stop.


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_refused_subscribe_does_not_cost_the_connection_on_the_next_reconnect(
    transport: str, node: RunningNode, http: aiohttp.ClientSession, browser: Browser
) -> None:
    tok = token("ivy", rooms=["lobby"])
    async with client_page(browser, node, tok, transport, ["lobby"]) as page:
        refusal = await page.evaluate("c.subscribe('secret').then((a) => a, (e) => e)")
        assert refusal["code"] == "forbidden"
        # The backend logs the user out everywhere (4009): herald.js is to back off and reconnect.
        assert (await admin_post("/api/disconnect", node, {"user": "ivy"}))["disconnected"] == 1
        await page.wait_for_function("welcomes.length >= 2 || c.state === 'closed'", timeout=TIMEOUT)
        state, closes = await page.evaluate("[c.state, closes]")
        assert state == "open", f"client stopped after a refused subscribe and a 4009: closes={closes}"
        sent = await api_publish(http, node, "room:lobby", {"n": 1})
        await page.wait_for_function(f"got.some((m) => m.id === '{sent}')", timeout=TIMEOUT)


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_subscribe_with_an_invalid_room_id_does_not_cost_the_connection(
    transport: str, node: RunningNode, browser: Browser
) -> None:
    tok = token("ivo", rooms=["*"])
    async with client_page(browser, node, tok, transport, ["lobby"]) as page:
        refusal = await page.evaluate("c.subscribe('no such/room').then((a) => a, (e) => e)")
        assert refusal["code"] == "bad_request"
        assert (await admin_post("/api/disconnect", node, {"user": "ivo"}))["disconnected"] == 1
        await page.wait_for_function("welcomes.length >= 2 || c.state === 'closed'", timeout=TIMEOUT)
        state, closes = await page.evaluate("[c.state, closes]")
        assert state == "open", f"client not back after a refused subscribe and a 4009: state={state} closes={closes}"


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_a_refused_stream_stops_the_client_on_both_transports(
    transport: str, node: RunningNode, browser: Browser
) -> None:
    """An invalid room id in the URL: WebSocket close 4000, SSE HTTP 400 (docs/protocol.md §8: "stop: fix the
    request"), not a reconnect loop."""
    tok = token("ira", rooms=["*"])
    async with client_page(browser, node, tok, transport, ["no such/room"], wait_open=False) as page:
        await page.wait_for_function("c.state === 'closed' || closes.length >= 4", timeout=TIMEOUT)
        state, closes = await page.evaluate("[c.state, closes.map((e) => e[0])]")
        assert (state, closes[:1]) == ("closed", [4000]), f"state={state} closes={closes}"


# ---------------------------------------------------------------------------------------------------------
# A gate between the page and the node: it refuses new streams while `blocked` (the node is unreachable),
# holds back the subscribe commands the page sends while `hold_subscribes` (they are on their way when
# the connection ends), and the WebSocket commands of type `delay` until `forward()` (a slow path to the node).


class Gate:
    def __init__(self) -> None:
        self.blocked = False
        self.hold_subscribes = False
        self.held: list[Any] = []
        self.delay: str | None = None
        self.delayed: list[tuple[WebSocketRoute, str]] = []
        self.opened = 0  # streams let through

    async def install(self, page: Page) -> None:
        await page.route_web_socket(re.compile(r"/ws\?"), self._ws)
        await page.route(re.compile(r"/sse\?"), self._sse)
        await page.route(re.compile(r"/api/command$"), self._command)

    async def _ws(self, ws: WebSocketRoute) -> None:
        if self.blocked:
            await ws.close(code=1011, reason="node unreachable")
            return
        self.opened += 1
        server = ws.connect_to_server()

        def from_page(message: str | bytes) -> None:
            if self.hold_subscribes and isinstance(message, str) and '"type":"subscribe"' in message:
                self.held.append(message)
                return
            if self.delay is not None and isinstance(message, str) and f'"type":"{self.delay}"' in message:
                self.delayed.append((server, message))
                return
            server.send(message)

        ws.on_message(from_page)

    async def _sse(self, route: Any) -> None:
        if self.blocked:
            await route.fulfill(status=503, json={"error": "unavailable", "message": "node unreachable"})
            return
        self.opened += 1
        await route.continue_()

    async def _command(self, route: Any) -> None:
        body = route.request.post_data_json or {}
        if self.hold_subscribes and body.get("type") == "subscribe":
            self.held.append(route)
            return
        await route.continue_()

    def forward(self) -> None:
        """The delayed WebSocket commands reach the node now, in order."""
        self.delay = None
        for server, message in self.delayed:
            server.send(message)
        self.delayed.clear()

    async def release(self) -> None:
        """Held HTTP commands fail (their connection is gone); held WebSocket frames are forgotten."""
        for held in self.held:
            if not isinstance(held, str):
                await held.abort()
        self.held.clear()


async def serve_room(page: Page, node: RunningNode, http: aiohttp.ClientSession, user: str, room: str) -> str:
    """The backend joins the user's connection to ``room``; returns the id of a first message seen in it."""
    assert (await admin_post("/api/subscribe", node, {"user": user, "room": room}))["subscribed"] == 1
    first = await api_publish(http, node, f"room:{room}", {"first": True})
    await page.wait_for_function(f"got.some((m) => m.id === '{first}')", timeout=TIMEOUT)
    return first


async def bounce(page: Page, node: RunningNode, gate: Gate, user: str, while_down: Any = None) -> None:
    """Close the user's stream (4009) and keep the node unreachable until ``while_down`` ran."""
    welcomes = await page.evaluate("welcomes.length")
    gate.blocked = True
    assert (await admin_post("/api/disconnect", node, {"user": user}))["disconnected"] == 1
    await page.wait_for_function("c.state !== 'open'", timeout=TIMEOUT)
    if while_down is not None:
        await while_down()
    gate.blocked = False
    await page.wait_for_function(f"welcomes.length > {welcomes} && c.state === 'open'", timeout=TIMEOUT)


async def left_for_good(
    page: Page, node: RunningNode, http: aiohttp.ClientSession, gate: Gate, user: str, room: str
) -> None:
    """After a reconnect, ``room`` (left) is not joined again: nothing published to it comes."""
    await bounce(page, node, gate, user)
    after = await api_publish(http, node, f"room:{room}", {"n": "after leaving"})
    marker = await api_publish(http, node, "room:lobby", {"n": "marker"})
    await page.wait_for_function(f"got.some((m) => m.id === '{marker}')", timeout=TIMEOUT)
    await asyncio.sleep(0.3)
    session = node.node.sessions.of_user(user)[0]
    assert f"room:{room}" not in session.channels and after not in await got_ids(page), (
        f"left room joined again: channels={sorted(session.channels)}"
    )


# ---------------------------------------------------------------------------------------------------------
# Rooms the backend joined: re-joined with subscribe {room, since}. Their replay comes after the URL
# channels' replay, with smaller ids, and the resume position moves back with it (protocol §7.1): the next
# resume brings the URL channels' messages again, which the client drops (README: "Nothing is lost or
# repeated").


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_no_message_is_repeated_after_two_reconnects_with_a_backend_room(
    transport: str, node: RunningNode, http: aiohttp.ClientSession, browser: Browser
) -> None:
    gate = Gate()
    tok = token("jay", rooms=["*"])
    async with client_page(browser, node, tok, transport, ["lobby"], setup=gate.install) as page:
        await serve_room(page, node, http, "jay", "p9")
        sent: list[str] = []

        async def publish_while_down() -> None:
            sent.extend(await publish_while_away(http, node))

        await bounce(page, node, gate, "jay", publish_while_down)
        await page.wait_for_function(f"{sent}.every((id) => got.some((m) => m.id === id))", timeout=TIMEOUT)
        await bounce(page, node, gate, "jay")
        marker = await api_publish(http, node, "room:lobby", {"n": "marker"})
        await page.wait_for_function(f"got.some((m) => m.id === '{marker}')", timeout=TIMEOUT)
        ids = await got_ids(page)
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        assert repeated == [], f"messages delivered twice: {repeated} (all: {ids}, sent while down: {sent})"


# ---------------------------------------------------------------------------------------------------------
# A reset for messages no longer held is of the same stream (docs/protocol.md §7.2): the next resume can bring
# the same reset and the same held messages again, which the client drops; only a reset for a position past
# the stream's end starts the channel's count over.


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_a_reset_of_the_same_stream_does_not_hand_messages_out_twice(
    transport: str, node_factory: NodeFactory, http: aiohttp.ClientSession, browser: Browser
) -> None:
    """lobby keeps 2 messages. Away, the client misses P1 (the backend's p9), then L1, L2, L3 (lobby).
    Reconnect 1: a reset of lobby (L1 is gone), L2, L3; p9's re-join replays P1, so the position moves
    back to P1 (§7.1). Reconnect 2 from P1: the reset of lobby again, L2 and L3 again. Every reset used to
    start the channel's repeat check over, so L2 and L3 were handed out twice."""
    node: RunningNode = await node_factory(rooms={"history": ("lobby=2/3600",)})
    gate = Gate()
    tok = token("kai", rooms=["*"])
    async with client_page(browser, node, tok, transport, ["lobby"], setup=gate.install) as page:
        await page.evaluate("window.resets = []; c.on('reset', (r) => resets.push(r.channel))")
        await serve_room(page, node, http, "kai", "p9")
        sent: list[str] = []

        async def publish_while_down() -> None:
            sent.append(await api_publish(http, node, "room:p9", {"n": "p9 while down"}))
            sent.extend([await api_publish(http, node, "room:lobby", {"l": i}) for i in (1, 2, 3)])

        await bounce(page, node, gate, "kai", publish_while_down)
        await page.wait_for_function(f"c.lastId === '{sent[0]}'", timeout=TIMEOUT)  # the re-join's replay came
        await bounce(page, node, gate, "kai")
        marker = await api_publish(http, node, "room:lobby", {"n": "marker"})
        await page.wait_for_function(f"got.some((m) => m.id === '{marker}')", timeout=TIMEOUT)
        lobby = await page.evaluate("got.filter((m) => m.channel === 'room:lobby').map((m) => m.id)")
        assert lobby == [*sent[2:], marker], f"sent while down: {sent}"
        assert await page.evaluate("resets") == ["room:lobby", "room:lobby"]


# ---------------------------------------------------------------------------------------------------------
# A re-join not answered before the connection ends: the next one asks from the same position, not from the
# connection's new one, which the URL channels' replay moved past the room's messages.


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_a_backend_room_rejoin_cut_short_loses_nothing(
    transport: str, node: RunningNode, http: aiohttp.ClientSession, browser: Browser
) -> None:
    gate = Gate()
    tok = token("kim", rooms=["*"])
    async with client_page(browser, node, tok, transport, ["lobby"], setup=gate.install) as page:
        await serve_room(page, node, http, "kim", "p9")
        sent: list[str] = []

        async def publish_while_down() -> None:
            sent.extend(await publish_while_away(http, node))
            gate.hold_subscribes = True  # the re-join is on its way when the connection ends

        await bounce(page, node, gate, "kim", publish_while_down)
        await page.wait_for_function(f"got.some((m) => m.id === '{sent[1]}')", timeout=TIMEOUT)  # the lobby's
        await wait_for(lambda: gate.held, timeout=5)
        gate.hold_subscribes = False
        await gate.release()
        await bounce(page, node, gate, "kim")
        marker = await api_publish(http, node, "room:p9", {"n": "marker"})
        await page.wait_for_function(f"got.some((m) => m.id === '{marker}')", timeout=TIMEOUT)
        ids = await got_ids(page)
        assert sent[0] in ids, f"the backend room's message {sent[0]} published while down never came: {ids}"


# ---------------------------------------------------------------------------------------------------------
# unsubscribe() from a room the backend joined: the next reconnect does not join it again (as the Python
# client: "An unsubscribed frame, or unsubscribe, takes a room out of both").


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_a_backend_room_left_with_unsubscribe_stays_left_after_a_reconnect(
    transport: str, node: RunningNode, http: aiohttp.ClientSession, browser: Browser
) -> None:
    gate = Gate()
    tok = token("lou", rooms=["*"])
    async with client_page(browser, node, tok, transport, ["lobby"], setup=gate.install) as page:
        await serve_room(page, node, http, "lou", "p9")
        ack = await page.evaluate("c.unsubscribe('p9')")
        assert ack["channel"] == "room:p9"
        await left_for_good(page, node, http, gate, "lou", "p9")


# ---------------------------------------------------------------------------------------------------------
# unsubscribe() sent while a subscribe of the room is under way: the node runs the two in order, so the room is
# left, and the subscribe's ack (answered after unsubscribe() was called) must not put it back in the URL.


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_a_room_left_while_its_subscribe_is_under_way_stays_left_after_a_reconnect(
    transport: str, node: RunningNode, http: aiohttp.ClientSession, browser: Browser
) -> None:
    gate = Gate()
    tok = token("una", rooms=["*"])
    async with client_page(browser, node, tok, transport, ["lobby"], setup=gate.install) as page:
        answers = await page.evaluate(
            "Promise.all([c.subscribe('x'), c.unsubscribe('x')]).then((a) => a.map((f) => f.type))"
        )
        assert answers == ["ack", "ack"]
        await left_for_good(page, node, http, gate, "una", "x")


# ---------------------------------------------------------------------------------------------------------
# subscribe(x), unsubscribe(x), subscribe(y), subscribe(x) without waiting: the node runs them in order, and the
# client's rooms end as the node's whatever the last subscribe's answer. The first subscribe's ack used to put x
# back when the last one was refused (that one's count of subscribes under way was taken as its own).


def rooms_on_node(node: RunningNode, user: str) -> list[str]:
    """The rooms of the user's one stream on ``node``, sorted."""
    (session,) = node.node.sessions.of_user(user)
    return sorted(c.removeprefix("room:") for c in session.channels if c.startswith("room:"))


CLIENT_ROOMS = "[...c.rooms, ...c.serverRooms.keys()].sort()"


@pytest.mark.parametrize(
    ("transport", "last"),
    [("ws", "acked"), ("ws", "too_many_subscriptions"), ("ws", "rate_limited"), ("sse", "rate_limited")],
)
async def test_a_subscribe_answered_after_an_unsubscribe_does_not_put_the_room_back(
    transport: str, last: str, node_factory: NodeFactory, browser: Browser
) -> None:
    limits: dict[str, Any] = {"rate_window": 60.0}
    if last == "too_many_subscriptions":
        limits["max_subscriptions"] = 1  # y takes the one place: x is refused
    elif last == "rate_limited":
        limits["command_rate"] = 3  # the fourth command is refused
    node: RunningNode = await node_factory(limits=limits)
    gate = Gate()
    user = "u" + uuid.uuid4().hex[:8]
    async with client_page(browser, node, token(user, rooms=["*"]), transport, [], setup=gate.install) as page:
        answers = await page.evaluate(
            """Promise.allSettled([c.subscribe("x"), c.unsubscribe("x"), c.subscribe("y"), c.subscribe("x")])
                 .then((all) => all.map((r) => (r.status === "fulfilled" ? "acked" : r.reason.code)))"""
        )
        assert answers == ["acked", "acked", "acked", last]
        held = ["x", "y"] if last == "acked" else ["y"]
        assert rooms_on_node(node, user) == held
        assert await page.evaluate(CLIENT_ROOMS) == held
        await bounce(page, node, gate, user)
        assert rooms_on_node(node, user) == held


# An unsubscribe refused rate_limited was not run (docs/protocol.md §11.2): the stream is still in the room, and
# the client keeps it. It used to drop it all the same: out of a room whose messages it got, and out of the next
# stream though the application had been told the unsubscribe failed.


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_an_unsubscribe_the_node_refuses_keeps_the_room(
    transport: str, node_factory: NodeFactory, http: aiohttp.ClientSession, browser: Browser
) -> None:
    node: RunningNode = await node_factory(limits={"command_rate": 3, "rate_window": 60.0})
    gate = Gate()
    user = "u" + uuid.uuid4().hex[:8]
    async with client_page(browser, node, token(user, rooms=["*"]), transport, ["lobby"], setup=gate.install) as page:
        await serve_room(page, node, http, user, "p9")
        refusals = await page.evaluate(
            """(async () => {
                 // The stream's budget is spent (over SSE only commands naming it take from it).
                 for (let i = 0; i < 3; i++) await c.subscribe("lobby");
                 const codes = [];
                 for (const room of ["lobby", "p9"]) {
                   codes.push(await c.unsubscribe(room).then(() => "acked", (e) => e.code));
                 }
                 return codes;
               })()"""
        )
        assert refusals == ["rate_limited", "rate_limited"]
        assert rooms_on_node(node, user) == ["lobby", "p9"]
        assert await page.evaluate(CLIENT_ROOMS) == ["lobby", "p9"]
        await bounce(page, node, gate, user)
        await wait_for(lambda: rooms_on_node(node, user) == ["lobby", "p9"], timeout=5)


# A subscribe (an unsubscribe, refused rate_limited) that reaches the node after the client's timeout: the node
# runs it all the same, and the client's rooms end as the node's. The client used to stop listening at the
# timeout: it counted itself out of a room the node held, and the next stream did not join it (left it).


@pytest.mark.parametrize("command", ["subscribe", "unsubscribe"])
async def test_an_answer_after_the_timeout_still_sets_the_room_set(
    command: str, node_factory: NodeFactory, browser: Browser
) -> None:
    node: RunningNode = await node_factory(limits={"command_rate": 2, "rate_window": 60.0})
    gate = Gate()
    user = "u" + uuid.uuid4().hex[:8]
    start = ["x"] if command == "unsubscribe" else []
    tok = token(user, rooms=["*"])
    async with client_page(browser, node, tok, "ws", start, setup=gate.install, timeout=1000) as page:
        if command == "unsubscribe":
            await page.evaluate("c.ping().then(() => c.ping())")  # the budget is spent: refused, not run
        gate.delay = command
        code = await page.evaluate(f"c.{command}('x').then(() => 'acked', (e) => e.code)")
        assert code == "timeout"
        gate.forward()
        await wait_for(lambda: rooms_on_node(node, user) == ["x"], timeout=5)
        await page.evaluate("c.ping().catch(() => null)")  # answered after it: its answer is in
        assert await page.evaluate(CLIENT_ROOMS) == ["x"], f"node: {rooms_on_node(node, user)}"
        await bounce(page, node, gate, user)
        assert rooms_on_node(node, user) == ["x"]


# refresh with a token that allows fewer rooms: the node leaves the others, and so must the client's room set,
# with the new token for the next streams -- also when the ack comes after the timeout (WebSocket; over SSE a
# timed-out POST is aborted, its answer lost). herald.js had no refresh(); a refresh sent with command() changed
# neither, in time or late: the next stream joined the dropped room again with the old token.


@pytest.mark.parametrize(("transport", "late"), [("ws", True), ("ws", False), ("sse", False)])
async def test_a_refresh_sets_the_token_and_drops_the_rooms_it_no_longer_allows(
    transport: str, late: bool, node: RunningNode, browser: Browser
) -> None:
    gate = Gate()
    user = "u" + uuid.uuid4().hex[:8]
    tok, narrower = token(user, rooms=["x", "y"]), token(user, rooms=["x"], ttl=600)
    async with client_page(browser, node, tok, transport, ["x", "y"], setup=gate.install, timeout=1000) as page:
        if late:
            gate.delay = "refresh"
        code = await page.evaluate("(t) => c.refresh(t).then(() => 'acked', (e) => e.code)", narrower)
        assert code == ("timeout" if late else "acked")
        gate.forward()
        await wait_for(lambda: rooms_on_node(node, user) == ["x"], timeout=5)
        await page.evaluate("c.ping().catch(() => null)")  # answered after it: its answer is in
        assert await page.evaluate(CLIENT_ROOMS) == ["x"], f"node: {rooms_on_node(node, user)}"
        assert await page.evaluate("c.token") == narrower
        await bounce(page, node, gate, user)
        assert rooms_on_node(node, user) == ["x"]


# ---------------------------------------------------------------------------------------------------------
# A command over the node's ws.max_frame: refused by the client (too_large), unsent, the connection kept. A
# 1009 from the node (a client told a larger maxFrame than the node's) stops the client: docs/protocol.md §8
# "stop: fix the client" -- the same frame would be refused again.


async def test_a_command_over_max_frame_is_refused_unsent_and_a_1009_stops_the_client(
    node_factory: NodeFactory, browser: Browser
) -> None:
    node: RunningNode = await node_factory(ws={"max_frame": 2048})
    tok = token("zed", rooms=["*"], publish=["*"])
    big = "c.publish('lobby', 'x'.repeat(4096)).then((a) => a, (e) => e)"
    async with client_page(browser, node, tok, "ws", ["lobby"], maxFrame=2048) as page:
        refusal = await page.evaluate(big)
        assert refusal["code"] == "too_large", refusal
        assert (await page.evaluate("c.ping()"))["type"] == "pong"
        assert await page.evaluate("[welcomes.length, closes]") == [1, []]
    async with client_page(browser, node, tok, "ws", ["lobby"], maxFrame=1 << 20) as page:
        await page.evaluate("window.errors = []; c.on('error', (e) => errors.push(e))")
        lost = await page.evaluate(big)
        assert lost["code"] == "disconnected", lost
        await page.wait_for_function("c.state === 'closed' || welcomes.length >= 2", timeout=TIMEOUT)
        await asyncio.sleep(0.3)  # a reconnect would have come by now (maxDelay 200 ms)
        state, closes, errors = await page.evaluate("[c.state, closes, errors]")
        assert (state, closes) == ("closed", [[1009, "frame too big"]]), f"state={state} closes={closes}"
        assert errors == [{"code": "1009", "message": "frame too big"}]


# ---------------------------------------------------------------------------------------------------------
# The default transport is "auto" (the Options typedef): WebSocket first, SSE when WebSockets cannot open.


async def test_the_default_transport_falls_back_to_sse_when_websockets_are_blocked(
    node: RunningNode, http: aiohttp.ClientSession, browser: Browser
) -> None:
    async def block_websockets(page: Page) -> None:
        async def refuse(ws: WebSocketRoute) -> None:  # a proxy that drops WebSockets
            await ws.close(code=1011, reason="blocked by proxy")

        await page.route_web_socket(re.compile(r"/ws\?"), refuse)

    tok = token("max", rooms=["*"])
    async with client_page(browser, node, tok, None, ["lobby"], wait_open=False, setup=block_websockets) as page:
        await page.wait_for_function("c.state === 'open' || closes.length >= 6", timeout=TIMEOUT)
        state, transport, closes = await page.evaluate("[c.state, c.transport, closes.length]")
        assert (state, transport) == ("open", "sse"), f"state={state} transport={transport} after {closes} closes"


# ---------------------------------------------------------------------------------------------------------
# The page's node is SIGKILLed (or drains) while messages keep being published on four channels: after the
# reconnect -- to the same node restarted, or to another node behind the same address -- every message
# comes once, in order per channel.


@pytest.mark.parametrize(
    ("transport", "scenario"), [("ws", "restart"), ("sse", "failover"), ("ws", "drain"), ("sse", "drain")]
)
async def test_a_node_lost_mid_stream_every_message_comes_once_in_order(
    transport: str,
    scenario: str,
    node_factory: NodeFactory,
    nats_server: NatsServer,
    spawn: Any,
    http: aiohttp.ClientSession,
    browser: Browser,
) -> None:
    tag = "pj" + uuid.uuid4().hex[:10]
    shared: dict[str, dict[str, Any]] = {
        "subject": {"prefix": tag},
        "stream": {"name": tag.upper(), "storage": "memory"},
    }
    # The user channel keeps 50 messages by default: a restart that takes a
    # while would then miss its oldest (with a reset, as documented).
    other = await node_factory(**shared, history={"user_max": 1000})
    port = free_port()
    env = {"HERALD_HISTORY_USER_MAX": "1000"}
    drain_env = {"HERALD_HTTP_DRAIN_DELAY": "0.2", "HERALD_HTTP_RECONNECT_SPREAD": "1", **env}
    proc, _ = await spawn_cluster_node(spawn, http, nats_server.url, shared, port=port, **drain_env)
    proxy = Relay(port)
    await proxy.start()
    front = RunningNode(other.settings, other.runner, f"http://127.0.0.1:{proxy.port}")
    user = "u" + uuid.uuid4().hex[:8]
    channels = ("room:lobby", "room:side", f"user:{user}", "broadcast")
    sent: dict[str, list[str]] = {c: [] for c in channels}
    stop = asyncio.Event()

    async def publisher() -> None:  # through the other node: it stays up
        i = 0
        while not stop.is_set():
            channel = channels[i % len(channels)]
            sent[channel].append(await api_publish(http, other, channel, {"i": i}))
            i += 1
            await asyncio.sleep(0.005)

    tok = token(user, rooms=["lobby", "side"])
    try:
        async with client_page(browser, front, tok, transport, ["lobby", "side"]) as page:
            task = asyncio.create_task(publisher())
            await wait_for(lambda: sum(map(len, sent.values())) >= 60, timeout=20)
            if scenario == "drain":  # SIGTERM: 1012 "reconnect in <ms> ms"; the balancer sends new streams on
                proxy.target = other.runner.addresses[0][1]
                proc.send_signal(signal.SIGTERM)
            else:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                if scenario == "failover":
                    proxy.target = other.runner.addresses[0][1]
                else:
                    await asyncio.sleep(0.5)
                    await spawn_cluster_node(spawn, http, nats_server.url, shared, port=port, **env)
            await page.wait_for_function("welcomes.length >= 2 && c.state === 'open'", timeout=TIMEOUT)
            count = sum(map(len, sent.values()))
            await wait_for(lambda: sum(map(len, sent.values())) >= count + 60, timeout=20)
            stop.set()
            await task
            last = " && ".join(f"got.some((m) => m.id === '{ids[-1]}')" for ids in sent.values() if ids)
            await page.wait_for_function(last, timeout=TIMEOUT)
            got = await page.evaluate("got.map((m) => [m.channel, m.id])")
            for channel in channels:
                name = "user" if channel.startswith("user:") else channel
                mine = [i for c, i in got if c == name]
                assert mine == sent[channel], (
                    f"{channel}: missing {sorted(set(sent[channel]) - set(mine), key=int)}, "
                    f"repeated {sorted({i for i in mine if mine.count(i) > 1}, key=int)}"
                )
    finally:
        stop.set()
        await proxy.stop()


# ---------------------------------------------------------------------------------------------------------
# A re-join refused for a passing reason (rate_limited, with retry_after; likewise unavailable, timeout) is
# asked again, from the same position: the backend's room is not silently missing for the connection.


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_a_rejoin_refused_for_now_is_asked_again(
    transport: str, node_factory: NodeFactory, http: aiohttp.ClientSession, browser: Browser
) -> None:
    node: RunningNode = await node_factory(limits={"command_rate": 2, "rate_window": 4.0})
    gate = Gate()
    tok = token("oda", rooms=["*"])
    async with client_page(browser, node, tok, transport, ["lobby"], setup=gate.install) as page:
        await serve_room(page, node, http, "oda", "p9")

        async def queue_commands() -> None:  # the app joins two rooms while the client is reconnecting
            await page.evaluate("window.queued = [c.subscribe('a1'), c.subscribe('a2')]")

        # On the new connection the two subscribes take its budget: the re-join of p9 is rate_limited.
        await bounce(page, node, gate, "oda", queue_commands)
        answers = await page.evaluate("Promise.all(queued.map((p) => p.then((a) => a.type, (e) => e.code)))")
        assert answers == ["ack", "ack"]
        missed = await api_publish(http, node, "room:p9", {"n": "after the reconnect"})
        await page.wait_for_function(f"got.some((m) => m.id === '{missed}')", timeout=TIMEOUT)
        session = node.node.sessions.of_user("oda")[0]
        assert "room:p9" in session.channels


# ---------------------------------------------------------------------------------------------------------
# Token expiry with rooms joined at runtime and by the backend: renewed through getToken, all kept.


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_token_expiry_keeps_runtime_and_backend_rooms(
    transport: str, node: RunningNode, http: aiohttp.ClientSession, browser: Browser
) -> None:
    context = await browser.new_context()
    try:
        page = await context.new_page()
        minted = 0

        def mint() -> str:  # two short-lived tokens, then long-lived ones
            nonlocal minted
            minted += 1
            return token("quin", rooms=["*"], ttl=3 if minted <= 2 else 3600)

        await page.expose_function("mint", mint)
        await page.goto(node.url + "/healthz")
        await page.evaluate(
            """async ([url, transport]) => {
              const { Herald } = await import("/static/herald.js");
              window.got = []; window.closes = [];
              const getToken = () => window.mint();
              window.c = Herald.connect({ url, getToken, rooms: ["lobby"], transport, minDelay: 50, maxDelay: 200 });
              c.on("message", (m) => got.push(m)).on("close", (e) => closes.push(e.code));
            }""",
            [node.url, transport],
        )
        await page.wait_for_function("c.state === 'open'", timeout=TIMEOUT)
        await page.evaluate("c.subscribe('b')")
        assert (await admin_post("/api/subscribe", node, {"user": "quin", "room": "p9"}))["subscribed"] == 1
        first = [await api_publish(http, node, ch, {"n": 1}) for ch in ("room:lobby", "room:b", "room:p9")]
        await page.wait_for_function(f"{first}.every((id) => got.some((m) => m.id === id))", timeout=TIMEOUT)
        await page.wait_for_function(
            "closes.filter((c) => c === 4001).length >= 2 && c.state === 'open'", timeout=20000
        )
        await wait_for(
            lambda: (
                len(node.node.sessions.of_user("quin")) == 1
                and "room:p9" in node.node.sessions.of_user("quin")[0].channels
            ),
            timeout=5,
        )
        second = [await api_publish(http, node, ch, {"n": 2}) for ch in ("room:lobby", "room:b", "room:p9")]
        await page.wait_for_function(f"{second}.every((id) => got.some((m) => m.id === id))", timeout=TIMEOUT)
        ids = await got_ids(page)
        assert sorted(ids, key=int) == sorted(first + second, key=int), ids
    finally:
        await context.close()


# ---------------------------------------------------------------------------------------------------------
# Commands made while reconnecting are sent once the connection is back (README), on both transports:
# reconnect attempts that fail meanwhile do not reject them ("disconnected" is for commands sent on a
# connection that then closed).


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_commands_made_while_reconnecting_are_sent_once_the_connection_is_back(
    transport: str, node: RunningNode, http: aiohttp.ClientSession, browser: Browser
) -> None:
    gate = Gate()
    tok = token("rae", rooms=["*"], publish=["*"])
    async with client_page(browser, node, tok, transport, ["lobby"], setup=gate.install, timeout=10000) as page:
        gate.blocked = True  # the node restarts: a few attempts fail
        assert (await admin_post("/api/disconnect", node, {"user": "rae"}))["disconnected"] == 1
        await page.wait_for_function("c.state !== 'open'", timeout=TIMEOUT)
        await page.evaluate(
            """window.later = [c.publish("lobby", 2), c.presence("lobby"), c.ping()]
                 .map((p) => p.then((a) => ["ok", a.type], (e) => ["err", e.code]))"""
        )
        closes = await page.evaluate("closes.length")
        await page.wait_for_function(f"closes.length >= {closes + 2}", timeout=TIMEOUT)  # two more attempts fail
        gate.blocked = False
        await page.wait_for_function("c.state === 'open'", timeout=TIMEOUT)
        answers = await page.evaluate("Promise.all(later)")
        assert answers == [["ok", "ack"], ["ok", "presence"], ["ok", "pong"]], answers


# ---------------------------------------------------------------------------------------------------------
# Commands while the node is unreachable for longer than their timeout: each settles, none hangs.


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_commands_while_disconnected_settle(
    transport: str, node: RunningNode, http: aiohttp.ClientSession, browser: Browser
) -> None:
    gate = Gate()
    tok = token("ray", rooms=["*"], publish=["*"])
    async with client_page(browser, node, tok, transport, ["lobby"], setup=gate.install, timeout=2000) as page:
        gate.blocked = True
        assert (await admin_post("/api/disconnect", node, {"user": "ray"}))["disconnected"] == 1
        await page.wait_for_function("c.state !== 'open'", timeout=TIMEOUT)
        lost = await page.evaluate(
            """Promise.all([c.publish("lobby", 1), c.presence("lobby"), c.history("lobby"), c.ping(), c.subscribe("x")]
                 .map((p) => p.then((a) => ["ok", a], (e) => ["err", e.code])))"""
        )
        assert all(r[0] == "err" and r[1] in ("timeout", "disconnected") for r in lost), lost
        gate.blocked = False
        await page.wait_for_function("c.state === 'open'", timeout=TIMEOUT)
        assert (await page.evaluate("c.ping()"))["type"] == "pong"
