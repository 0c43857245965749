"""The demo page and herald.js in Debian's chromium, against real nodes on real NATS.

Two users chat with presence, typing and notifications; the page survives a
killed node and an expiring token; ``auto`` falls back to SSE when WebSockets
are blocked; a room's history shows above its live messages, pages back as the
list is scrolled up, and is reloaded after a reset. Each on both transports,
as is herald.js's own command set (history pages included).
"""

from __future__ import annotations

import asyncio
import re
import signal
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from playwright.async_api import Browser, Page, Route, WebSocketRoute, expect

import gateway
from broker.embedded import NatsServer, free_port
from broker.publisher import NatsPublisher

from ...browser import ConsoleWatch, screenshot_path
from ...helpers import (
    ADMIN_KEY,
    PUBLISH_HEADERS,
    PUBLISH_KEY,
    NodeFactory,
    RunningNode,
    api_publish,
    spawn_cluster_node,
    token,
    wait_for,
)

# A node in a process of its own serves the static files of the gateway package this test imports (a
# worktree's, with PYTHONPATH), not of the one the venv has installed.
OWN_GATEWAY = {"PYTHONPATH": str(Path(gateway.__file__).resolve().parent.parent)}
DEMO = {"http": {"dev_tokens": True}, "rooms": {"join_leave": ("*",)}}
TIMEOUT = 15_000  # ms, for expectations that wait on a reconnect


@asynccontextmanager
async def demo_page(browser: Browser, base: str, **query: str) -> AsyncIterator[tuple[Page, ConsoleWatch]]:
    """A fresh browser context (its own storage: one user) on the demo, signed in by query."""
    context = await browser.new_context()
    try:
        page = await context.new_page()
        watch = ConsoleWatch(page)
        await page.goto(f"{base}/?" + "&".join(f"{k}={v}" for k, v in query.items()))
        await expect(page.locator("#status")).to_have_attribute("data-state", "open", timeout=TIMEOUT)
        yield page, watch
    finally:
        await context.close()


async def publish_batch(http: aiohttp.ClientSession, base: str, channel: str, texts: list[str]) -> list[str]:
    """Publish one message per text (``{"user": "srv", "text"}``) in one batch; returns their ids."""
    batch = [{"channel": channel, "event": "chat", "data": {"user": "srv", "text": t}} for t in texts]
    async with http.post(base + "/api/publish", json=batch, headers=PUBLISH_HEADERS) as resp:
        body = await resp.json(content_type=None)
        assert resp.status == 200, body
        return [str(i) for i in body["ids"]]


async def shown_ids(page: Page) -> list[str]:
    ids: list[str] = await page.locator("#messages li[data-id]").evaluate_all("els => els.map(e => e.dataset.id)")
    return ids


def page_errors(watch: ConsoleWatch) -> list[str]:
    """Uncaught exceptions only (a killed node makes the browser log refused connections)."""
    return [e for e in watch.errors if e.startswith("pageerror")]


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_two_users_chat_with_presence_typing_and_notifications(
    transport: str, node_factory: NodeFactory, nats_server: NatsServer, browser: Browser
) -> None:
    node: RunningNode = await node_factory(**DEMO)
    async with (
        demo_page(browser, node.url, user="alice", room="lobby", transport=transport) as (alice, alice_watch),
        demo_page(browser, node.url, user="bob", room="lobby", transport=transport) as (bob, bob_watch),
    ):
        for page in (alice, bob):  # presence lists both, cluster-wide, on either page
            await expect(page.locator("#presence li")).to_have_count(2)
            await expect(page.locator("#presence")).to_contain_text("alice")
            await expect(page.locator("#presence")).to_contain_text("bob")

        await alice.locator("#text").press_sequentially("hello bob")
        await expect(bob.locator("#typing")).to_have_text("alice is typing…")
        await alice.locator("#text").press("Enter")
        line = bob.locator("#messages li").filter(has_text="hello bob")
        await expect(line).to_contain_text("alice")
        await expect(bob.locator("#typing")).to_have_text("")  # the message ends the indicator
        await expect(alice.locator("#messages li").filter(has_text="hello bob")).to_have_count(1)
        await bob.locator("#text").fill("hi alice")
        await bob.locator("#say button").click()
        await expect(alice.locator("#messages li").filter(has_text="hi alice")).to_have_count(1)

        settings = node.settings
        async with NatsPublisher([nats_server.url], settings.subject.prefix, settings.stream.name) as backend:
            await backend.publish("user:bob", {"text": "Your order shipped"}, event="notify")
            await backend.publish("user:bob", {"text": "Invoice ready"}, event="notify")
        await expect(bob.locator("#unread")).to_have_text("2")
        await expect(bob.locator("#notifications li.unread")).to_have_count(2)
        await expect(alice.locator("#unread")).to_have_text("0")  # another user's channel
        await bob.screenshot(
            path=screenshot_path("demo-chat" if transport == "ws" else "demo-chat-sse"), full_page=True
        )

        await bob.locator("#mark-read").click()
        await expect(bob.locator("#unread")).to_have_text("0")
        await expect(bob.locator("#notifications li.unread")).to_have_count(0)
        await bob.reload()  # signed in again from storage; the read position is kept by the node
        await expect(bob.locator("#status")).to_have_attribute("data-state", "open", timeout=TIMEOUT)
        await expect(bob.locator("#presence li")).to_have_count(2)
        await asyncio.sleep(0.5)  # an unread replay would arrive right after the welcome
        await expect(bob.locator("#unread")).to_have_text("0")
        await expect(bob.locator("#notifications li")).to_have_count(0)

        await expect(alice.locator("#status")).to_contain_text(f"open · {transport} · last id")
        assert alice_watch.errors == [], alice_watch.messages
        assert bob_watch.errors == [], bob_watch.messages


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_the_author_shown_is_the_verified_sender_not_a_name_in_the_data(
    transport: str, node_factory: NodeFactory, http: aiohttp.ClientSession, browser: Browser
) -> None:
    """Mallory's messages say they are alice's; the page shows mallory, the
    message's ``from``, live, typing and in the room's history. A backend's
    message has no author."""
    node: RunningNode = await node_factory(**DEMO)
    forged = {"user": "alice", "text": "it is me, alice"}
    async with (
        demo_page(browser, node.url, user="bob", room="lobby", transport=transport) as (bob, watch),
        http.ws_connect(node.ws_url, params={"token": token("mallory", publish=["*"])}) as mallory,
    ):
        await mallory.send_json(
            {"type": "publish", "room": "lobby", "event": "typing", "data": forged, "ephemeral": True}
        )
        await expect(bob.locator("#typing")).to_have_text("mallory is typing…")
        await mallory.send_json({"type": "publish", "room": "lobby", "event": "chat", "data": forged})
        await api_publish(http, node, "room:lobby", {"user": "alice", "text": "from the backend"})
        lines = bob.locator("#messages li[data-id]")
        await expect(lines).to_have_count(2)
        await expect(lines.nth(0).locator(".who")).to_have_text("mallory")
        await expect(lines.nth(1).locator(".who")).to_have_count(0)
        await bob.reload()  # now from the room's history
        await expect(bob.locator("#messages li.history")).to_have_count(2, timeout=TIMEOUT)
        history = bob.locator("#messages li.history")
        await expect(history.nth(0).locator(".who")).to_have_text("mallory")
        await expect(history.nth(1).locator(".who")).to_have_count(0)
        assert page_errors(watch) == []


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_page_resumes_after_its_node_is_killed_and_restarted(
    transport: str,
    node_factory: NodeFactory,
    nats_server: NatsServer,
    spawn: Any,
    http: aiohttp.ClientSession,
    browser: Browser,
) -> None:
    tag = "br" + uuid.uuid4().hex[:10]
    stream = {"name": tag.upper(), "storage": "memory"}
    shared: dict[str, dict[str, Any]] = {"subject": {"prefix": tag}, "stream": stream}
    other = await node_factory(**shared)  # publishes while the page's node is down
    port = free_port()
    env = {"HERALD_HTTP_DEV_TOKENS": "true", "HERALD_SSE_RETRY": "300", **OWN_GATEWAY}
    proc, base = await spawn_cluster_node(spawn, http, nats_server.url, shared, port=port, **env)

    async with demo_page(browser, base, user="carol", room="lobby", transport=transport) as (page, watch):
        await expect(page.locator("#status")).to_contain_text(f"· {transport} ·")
        sent = [await api_publish(http, other, "room:lobby", {"user": "srv", "text": "before"})]
        await expect(page.locator("#messages li[data-id]")).to_have_count(1)

        proc.send_signal(signal.SIGKILL)
        proc.wait()
        await expect(page.locator("#status")).not_to_have_attribute("data-state", "open", timeout=TIMEOUT)
        sent += [await api_publish(http, other, "room:lobby", {"user": "srv", "text": f"down {i}"}) for i in range(5)]
        await spawn_cluster_node(spawn, http, nats_server.url, shared, port=port, **env)
        await expect(page.locator("#status")).to_have_attribute("data-state", "open", timeout=TIMEOUT)
        sent.append(await api_publish(http, other, "room:lobby", {"user": "srv", "text": "after"}))

        await expect(page.locator("#messages li[data-id]")).to_have_count(len(sent), timeout=TIMEOUT)
        await asyncio.sleep(0.3)  # a duplicate would show up right behind
        assert await shown_ids(page) == sent  # every message once, in order
        await expect(page.locator("#status")).to_contain_text(f"last id {sent[-1]}")
        assert page_errors(watch) == []


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_expired_token_is_replaced_through_get_token(
    transport: str, node_factory: NodeFactory, http: aiohttp.ClientSession, browser: Browser
) -> None:
    node: RunningNode = await node_factory(**DEMO)
    async with demo_page(browser, node.url, user="dave", room="lobby", ttl="2", transport=transport) as (page, watch):
        await expect(page.locator("#status")).to_contain_text(f"· {transport} ·")
        first = await api_publish(http, node, "room:lobby", {"user": "srv", "text": "one"})

        # The node closes at expiry (4001); the page mints a new token and resumes.
        async def renewed() -> bool:  # polled from here: the page's CSP forbids wait_for_function's eval
            tokens: int = await page.evaluate("window.heraldDemo.tokens")
            return tokens >= 3

        await wait_for(renewed, timeout=TIMEOUT / 1000)
        await expect(page.locator("#status")).to_have_attribute("data-state", "open", timeout=TIMEOUT)
        second = await api_publish(http, node, "room:lobby", {"user": "srv", "text": "two"})
        await expect(page.locator("#messages li[data-id]")).to_have_count(2, timeout=TIMEOUT)
        assert await shown_ids(page) == [first, second]
        assert page_errors(watch) == []


async def test_a_long_word_wraps_in_the_chat_and_the_notifications(
    node_factory: NodeFactory, nats_server: NatsServer, browser: Browser
) -> None:
    """A 2,000-character word (the chat input's limit) or a long URL must wrap,
    not run out of its card behind a horizontal scrollbar."""
    node: RunningNode = await node_factory(**DEMO)
    async with demo_page(browser, node.url, user="gwen", room="lobby") as (page, watch):
        word = "w" * 2000
        await page.locator("#text").fill(word)
        await page.locator("#text").press("Enter")
        await expect(page.locator("#messages li[data-id]")).to_have_count(1)
        settings = node.settings
        async with NatsPublisher([nats_server.url], settings.subject.prefix, settings.stream.name) as backend:
            await backend.publish("user:gwen", {"text": "https://example.com/" + "n" * 500}, event="notify")
        await expect(page.locator("#notifications li")).to_have_count(1)
        for box in ("#messages", "#messages li[data-id]", "#notifications", "#notifications li", "html"):
            wide = await page.locator(box).evaluate("e => [e.scrollWidth, e.clientWidth]")
            assert wide[0] <= wide[1], f"{box} overflows: {wide[0]} px of content in {wide[1]} px"
        assert watch.errors == [], watch.messages


RULE = "letters, digits and _ : @ = + -"


async def test_a_room_the_node_refuses_is_named_at_sign_in_and_in_the_join_box(
    node_factory: NodeFactory, browser: Browser
) -> None:
    """A bad room from a link (or the sign-in kept from an earlier visit) is
    refused on the page, saying what a room id may hold, before any stream
    (the node would close it 4000 and the page would keep the room for the
    next visit); the form's fields and the Join box say the same as one types."""
    node: RunningNode = await node_factory(**DEMO)
    context = await browser.new_context()
    try:
        page = await context.new_page()
        watch = ConsoleWatch(page)
        streams: list[str] = []
        page.on("request", lambda r: streams.append(r.url) if "/sse?" in r.url else None)
        page.on("websocket", lambda ws: streams.append(ws.url))
        await page.goto(f"{node.url}/?user=hana&room=a.b")
        await expect(page.locator("#signin-error")).to_contain_text('"a.b"')
        await expect(page.locator("#signin-error")).to_contain_text(RULE)
        await expect(page.locator("#signin")).to_be_visible()
        assert await page.locator("#room").input_value() == "a.b"  # to be corrected in place
        assert streams == [] and await page.evaluate("localStorage.getItem('herald-demo')") is None

        await page.locator("#room").fill("lobby")
        await page.locator("#signin button[type=submit]").click()
        await expect(page.locator("#status")).to_have_attribute("data-state", "open", timeout=TIMEOUT)
        await page.locator("#join-room").fill("x y")
        await page.locator("#join button").click()
        assert RULE in await page.locator("#join-room").evaluate("e => e.validationMessage")
        await expect(page.locator("#room-name")).to_have_text("lobby")
        assert watch.errors == [], watch.messages
    finally:
        await context.close()


async def test_auto_falls_back_to_sse_when_websockets_are_blocked(
    node_factory: NodeFactory, http: aiohttp.ClientSession, browser: Browser
) -> None:
    node: RunningNode = await node_factory(**DEMO)
    context = await browser.new_context()
    try:
        page = await context.new_page()
        watch = ConsoleWatch(page)

        async def refuse_upgrade(ws: WebSocketRoute) -> None:  # a proxy that drops WebSockets
            await ws.close(code=1011, reason="blocked by proxy")

        await page.route_web_socket(re.compile(r"/ws\?"), refuse_upgrade)
        await page.goto(f"{node.url}/?user=erin&room=lobby&transport=auto")
        await expect(page.locator("#status")).to_contain_text("open · sse ·", timeout=TIMEOUT)
        sent = await api_publish(http, node, "room:lobby", {"user": "srv", "text": "over sse"})
        await expect(page.locator("#messages li[data-id]")).to_have_count(1)
        assert await shown_ids(page) == [sent]
        assert page_errors(watch) == []
    finally:
        await context.close()


CLIENT_RUN = """async ([url, token, transport]) => {
  const { Herald } = await import("/static/herald.js");
  const until = async (what, ok) => {
    for (const end = Date.now() + 5000; !ok(); await new Promise((r) => setTimeout(r, 20))) {
      if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    }
  };
  const got = [], states = [];
  const c = Herald.connect({ url, token, rooms: ["lobby"], transport });
  c.on("message", (m) => got.push(m)).on("state", (s) => states.push(s));
  await until("open", () => c.state === "open");
  const conn = c.conn;
  const seen = (id) => got.some((m) => m.id === id);
  const stored = await c.publish("lobby", { text: "hi" }, { event: "chat" });
  await until("the stored message", () => seen(stored.id));
  const ephemeral = await c.publish("lobby", { user: "frank" }, { event: "typing", ephemeral: true });
  await until("the ephemeral message", () => got.some((m) => m.event === "typing"));
  const presence = await c.presence("lobby");
  const read = await c.read(stored.id);
  const pong = await c.ping();
  const sub = await c.subscribe("b");
  const inB = await c.publish("b", { text: "in b" });
  await until("the message of room b", () => seen(inB.id));
  const unsub = await c.unsubscribe("b");
  const afterUnsub = await c.publish("b", { text: "not for us" });
  const marker = await c.publish("lobby", { text: "marker" });
  await until("the marker", () => seen(marker.id));
  const bad = await c.subscribe("no such/room").catch((e) => e);
  const out = { conn, sameConn: c.conn === conn, states: [...states], got, stored, ephemeral, presence, read, pong };
  Object.assign(out, { sub, unsub, ids: [stored.id, inB.id, afterUnsub.id, marker.id], bad });
  c.close();
  return out;
}"""


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_client_commands_and_rooms_on_one_stream(transport: str, node: RunningNode, browser: Browser) -> None:
    """herald.js's whole command set against a real node: on SSE too, through
    POST /api/command, and a room joined later arrives on the same stream."""
    context = await browser.new_context()
    try:
        page = await context.new_page()
        watch = ConsoleWatch(page, ignore=("/favicon.ico", "/api/command"))  # chromium logs the 400 refusal
        await page.goto(node.url + "/healthz")  # any page of the node's origin, to import the module from
        tok = token("frank", rooms=["*"], publish=["*"])
        r = await page.evaluate(CLIENT_RUN, [node.url, tok, transport])
        assert watch.errors == [], watch.messages
    finally:
        await context.close()
    stored, in_b, after_unsub, marker = r["ids"]
    assert r["states"] == ["open"] and r["sameConn"] and r["conn"].startswith(node.settings.node.id + ":")
    assert r["got"] == [
        {"channel": "room:lobby", "id": stored, "event": "chat", "from": "frank", "data": {"text": "hi"}},
        {"channel": "room:lobby", "id": None, "event": "typing", "from": "frank", "data": {"user": "frank"}},
        {"channel": "room:b", "id": in_b, "event": "message", "from": "frank", "data": {"text": "in b"}},
        {"channel": "room:lobby", "id": marker, "event": "message", "from": "frank", "data": {"text": "marker"}},
    ]
    assert after_unsub and after_unsub not in [m["id"] for m in r["got"]]
    assert r["stored"] == {"type": "ack", "channel": "room:lobby", "id": stored, "ref": "1"}
    assert r["ephemeral"] == {"type": "ack", "channel": "room:lobby", "ref": "2"}
    assert r["presence"] == {"type": "presence", "room": "lobby", "users": ["frank"], "ref": "3"}
    assert r["read"] == {"type": "ack", "id": stored, "ref": "4"}
    assert r["pong"] == {"type": "pong", "ref": "5"}
    assert r["sub"] == {"type": "ack", "channel": "room:b", "ref": "6"}
    assert r["unsub"] == {"type": "ack", "channel": "room:b", "ref": "8"}
    assert (r["bad"]["code"], r["bad"]["ref"]) == ("bad_request", "11")


async def test_client_on_a_page_of_another_allowed_origin_uses_sse(node_factory: NodeFactory, browser: Browser) -> None:
    """CORS: a page of another origin that limits.origins allows runs the
    SSE stream and its commands (the POST's Authorization header needs a
    preflight)."""
    node: RunningNode = await node_factory(limits={"origins": ("*",)})
    context = await browser.new_context()
    try:
        page = await context.new_page()
        watch = ConsoleWatch(page, ignore=("/favicon.ico", "/api/command"))
        other = node.url.replace("127.0.0.1", "localhost")  # the same node, another origin
        await page.goto(other + "/healthz")
        r = await page.evaluate(CLIENT_RUN, [node.url, token("gina", rooms=["*"], publish=["*"]), "sse"])
        assert watch.errors == [], watch.messages
    finally:
        await context.close()
    assert r["states"] == ["open"] and r["sameConn"]
    assert [m["channel"] for m in r["got"]] == ["room:lobby", "room:lobby", "room:b", "room:lobby"]
    assert r["presence"]["users"] == ["gina"] and r["pong"]["type"] == "pong"


SERVER_API_PAGE = """async ([url, token, transport]) => {
  const { Herald } = await import("/static/herald.js");
  window.got = []; window.states = []; window.closes = [];
  window.c = Herald.connect({ url, token, rooms: ["lobby"], transport, minDelay: 50, maxDelay: 200 });
  c.on("message", (m) => got.push(m)).on("state", (s) => states.push(s)).on("close", (e) => closes.push(e.code));
}"""


async def admin_post(path: str, node: RunningNode, body: dict[str, Any]) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(node.url + path, json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return await resp.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_the_backend_joins_a_room_logs_out_and_bans(transport: str, node: RunningNode, browser: Browser) -> None:
    """Server API against herald.js: a room the backend joins stays joined
    across a reconnect (4009 after a logout everywhere), and a ban (4403)
    stops the client for good."""
    context = await browser.new_context()
    http = aiohttp.ClientSession()
    try:
        page = await context.new_page()
        await page.goto(node.url + "/healthz")
        await page.evaluate(SERVER_API_PAGE, [node.url, token("gina"), transport])
        await page.wait_for_function("c.state === 'open'")
        assert (await admin_post("/api/subscribe", node, {"user": "gina", "room": "project-9"}))["subscribed"] == 1
        first = await api_publish(http, node, "room:project-9", {"n": 1})
        await page.wait_for_function(f"got.some((m) => m.id === '{first}')")
        # Logged out everywhere: 4009, the client comes back, and the backend's room with it.
        assert (await admin_post("/api/disconnect", node, {"user": "gina"}))["disconnected"] == 1
        await page.wait_for_function("closes.includes(4009) && c.state === 'open'", timeout=TIMEOUT)
        await wait_for(lambda: len(node.node.sessions.of_user("gina")) == 1, timeout=5)
        session = node.node.sessions.of_user("gina")[0]
        await wait_for(lambda: "room:project-9" in session.channels, timeout=5)
        second = await api_publish(http, node, "room:project-9", {"n": 2})
        await page.wait_for_function(f"got.some((m) => m.id === '{second}')")
        # Banned: 4403, the client stops and stays away.
        assert (await admin_post("/api/disconnect", node, {"user": "gina", "reconnect": False}))["disconnected"] == 1
        await page.wait_for_function("c.state === 'closed'", timeout=TIMEOUT)
        await asyncio.sleep(1.0)
        assert await page.evaluate("c.state") == "closed" and node.node.sessions.of_user("gina") == []
        assert (await page.evaluate("closes")).count(4403) == 1
    finally:
        await http.close()
        await context.close()


async def list_rows(page: Page) -> list[str]:
    """The message list, row by row: ``history:<id>``, ``live:<id>``, ``divider`` or ``edge:<state>`` (others:
    ``system``)."""
    rows: list[str] = await page.locator("#messages li").evaluate_all(
        """els => els.map((e) => e.classList.contains("history-edge") ? `edge:${e.dataset.state}`
            : e.classList.contains("divider") ? "divider"
            : e.dataset.id ? `${e.classList.contains("history") ? "history" : "live"}:${e.dataset.id}` : "system")"""
    )
    return rows


async def scroll_list_to_top(page: Page) -> None:
    """What a user does: the wheel, over the message list."""
    await page.locator("#messages").hover()
    await page.mouse.wheel(0, -100_000)


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_joining_a_room_of_60_messages_shows_the_newest_page_and_scrolling_up_loads_the_rest(
    transport: str, node_factory: NodeFactory, http: aiohttp.ClientSession, browser: Browser
) -> None:
    node: RunningNode = await node_factory(**DEMO)
    sent = await publish_batch(http, node.url, "room:lobby", [f"old {i}" for i in range(60)])
    async with demo_page(browser, node.url, user="nina", room="lobby", transport=transport) as (page, watch):
        history = page.locator("#messages li.history")
        edge = page.locator("#messages li.history-edge")
        await expect(history).to_have_count(50, timeout=TIMEOUT)
        await expect(edge).to_have_attribute("data-state", "more")
        await expect(page.locator("#messages li.divider")).to_have_text("↑ earlier messages")
        # The newest 50, oldest first, marked as history, under the edge and above the divider.
        assert await list_rows(page) == ["edge:more"] + [f"history:{i}" for i in sent[10:]] + ["divider"]
        await expect(history.last).to_contain_text("old 59")
        await expect(history.last).to_be_in_viewport()  # the list starts at its newest message
        await expect(history.first).not_to_be_in_viewport()

        await scroll_list_to_top(page)
        await expect(history).to_have_count(60, timeout=TIMEOUT)
        await expect(edge).to_have_text("start of history")
        assert await list_rows(page) == ["edge:start"] + [f"history:{i}" for i in sent] + ["divider"]
        # The page came in above what was shown, which stayed in place: the list is not at its top.
        assert await page.locator("#messages").evaluate("el => el.scrollTop") > 0
        await expect(page.locator(f'#messages li[data-id="{sent[10]}"]')).to_be_in_viewport()

        await scroll_list_to_top(page)  # nothing older: no more requests
        await asyncio.sleep(0.3)
        await expect(history).to_have_count(60)

        live = await api_publish(http, node, "room:lobby", {"user": "srv", "text": "live one"})
        await expect(page.locator("#messages li[data-id]")).to_have_count(61)
        await asyncio.sleep(0.3)  # a duplicate would show up right behind
        assert await list_rows(page) == ["edge:start"] + [f"history:{i}" for i in sent] + ["divider", f"live:{live}"]
        await expect(page.locator("#messages")).not_to_contain_text("refresh")
        await page.locator("#messages li").last.scroll_into_view_if_needed()  # the divider and the live message
        await page.screenshot(path=screenshot_path("demo-history" if transport == "ws" else "demo-history-sse"))
        assert watch.errors == [], watch.messages


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_switching_rooms_shows_the_new_rooms_history_then_its_live_messages(
    transport: str, node_factory: NodeFactory, http: aiohttp.ClientSession, browser: Browser
) -> None:
    node: RunningNode = await node_factory(**DEMO)
    in_b = await publish_batch(http, node.url, "room:b", ["b one", "b two", "b three"])
    async with demo_page(browser, node.url, user="omar", room="lobby", transport=transport) as (page, watch):
        edge = page.locator("#messages li.history-edge")
        await expect(edge).to_have_text("start of history", timeout=TIMEOUT)  # an empty room
        in_lobby = await api_publish(http, node, "room:lobby", {"user": "srv", "text": "in lobby"})
        await expect(page.locator("#messages li[data-id]")).to_have_count(1)

        await page.locator("#join-room").fill("b")
        await page.locator("#join-room").press("Enter")
        await expect(page.locator("#room-name")).to_have_text("b")
        await expect(page.locator("#messages li.history")).to_have_count(3, timeout=TIMEOUT)
        assert await list_rows(page) == ["edge:start"] + [f"history:{i}" for i in in_b] + ["divider"]

        ignored = await api_publish(http, node, "room:lobby", {"user": "srv", "text": "lobby, left"})
        live = await api_publish(http, node, "room:b", {"user": "srv", "text": "b live"})
        await expect(page.locator("#messages li[data-id]")).to_have_count(4)
        await asyncio.sleep(0.3)
        assert await list_rows(page) == ["edge:start"] + [f"history:{i}" for i in in_b] + ["divider", f"live:{live}"]
        assert in_lobby not in await shown_ids(page) and ignored not in await shown_ids(page)
        assert await page.evaluate("[...window.heraldDemo.client.rooms]") == ["b"]
        assert watch.errors == [], watch.messages


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_a_reset_reloads_the_rooms_history(
    transport: str,
    node_factory: NodeFactory,
    nats_server: NatsServer,
    spawn: Any,
    http: aiohttp.ClientSession,
    browser: Browser,
) -> None:
    """The page's node is killed; more messages are published meanwhile than
    its resume replays (``history.replay_max`` 3): the resume starts with a
    reset of the room, and the page shows the room's newest page of history
    again (what the replay left out included) instead of a gap."""
    tag = "br" + uuid.uuid4().hex[:10]
    shared: dict[str, dict[str, Any]] = {
        "subject": {"prefix": tag},
        "stream": {"name": tag.upper(), "storage": "memory"},
    }
    other = await node_factory(**shared)
    port = free_port()
    env = {"HERALD_HTTP_DEV_TOKENS": "true", "HERALD_SSE_RETRY": "300", "HERALD_HISTORY_REPLAY_MAX": "3", **OWN_GATEWAY}
    proc, base = await spawn_cluster_node(spawn, http, nats_server.url, shared, port=port, **env)
    old = await publish_batch(http, other.url, "room:lobby", ["old 0", "old 1"])

    async with demo_page(browser, base, user="pia", room="lobby", transport=transport) as (page, watch):
        await expect(page.locator("#messages li.history")).to_have_count(2, timeout=TIMEOUT)
        before = await api_publish(http, other, "room:lobby", {"user": "srv", "text": "before"})
        await expect(page.locator("#messages li[data-id]")).to_have_count(3)
        assert await list_rows(page) == ["edge:start", *(f"history:{i}" for i in old), "divider", f"live:{before}"]

        proc.send_signal(signal.SIGKILL)
        proc.wait()
        await expect(page.locator("#status")).not_to_have_attribute("data-state", "open", timeout=TIMEOUT)
        down = await publish_batch(http, other.url, "room:lobby", [f"down {i}" for i in range(6)])
        await spawn_cluster_node(spawn, http, nats_server.url, shared, port=port, **env)
        await expect(page.locator("#status")).to_have_attribute("data-state", "open", timeout=TIMEOUT)

        # The resume replays down 3-5 only, after a reset: the list is made anew from the room's history,
        # the 6 messages the replay left out marked as history.
        everything = [*old, before, *down]
        await expect(page.locator("#messages li[data-id]")).to_have_count(len(everything), timeout=TIMEOUT)
        await asyncio.sleep(0.3)
        assert await shown_ids(page) == everything
        rows = await list_rows(page)
        assert rows[0] == "edge:start" and "divider" in rows
        assert [r for r in rows if r.startswith("history:")][:6] == [f"history:{i}" for i in everything[:6]]
        assert await page.locator("#messages li.system").count() == 0  # no "messages were lost, refresh"

        after = await api_publish(http, other, "room:lobby", {"user": "srv", "text": "after"})
        await expect(page.locator("#messages li[data-id]")).to_have_count(len(everything) + 1)
        assert (await list_rows(page))[-1] == f"live:{after}"
        assert page_errors(watch) == []


async def test_notifications_start_over_after_a_reset_of_the_user_channel(
    nats_server: NatsServer, spawn: Any, http: aiohttp.ClientSession, browser: Browser
) -> None:
    """A restarted ``herald dev`` has a new, empty stream: the page resumes past
    its end and gets a reset of every channel. Notifications of the old stream
    must go (their ids mean nothing now: "Mark all read" was refused
    ``id 3 is past the stream's last message`` and the badge stayed)."""
    tag = "bn" + uuid.uuid4().hex[:10]
    shared: dict[str, dict[str, Any]] = {
        "subject": {"prefix": tag},
        "stream": {"name": tag.upper(), "storage": "memory"},
    }
    port = free_port()
    env = {"HERALD_HTTP_DEV_TOKENS": "true", "HERALD_PUBLISH_KEY": PUBLISH_KEY, **OWN_GATEWAY}
    proc, base = await spawn_cluster_node(spawn, http, nats_server.url, shared, port=port, **env)
    async with demo_page(browser, base, user="lena", room="lobby") as (page, watch):
        await publish_batch(http, base, "user:lena", ["n0", "n1", "n2"])
        await expect(page.locator("#unread")).to_have_text("3")

        proc.send_signal(signal.SIGKILL)
        proc.wait()
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().delete_stream(tag.upper())  # what a restarted herald dev starts with
        await nc.close()
        await spawn_cluster_node(spawn, http, nats_server.url, shared, port=port, **env)
        await expect(page.locator("#status")).to_have_attribute("data-state", "open", timeout=TIMEOUT)
        await expect(page.locator("#notifications li")).to_have_count(0)
        await expect(page.locator("#unread")).to_have_text("0")

        await publish_batch(http, base, "user:lena", ["fresh"])
        await expect(page.locator("#unread")).to_have_text("1")
        await page.locator("#mark-read").click()
        await expect(page.locator("#unread")).to_have_text("0")
        assert await page.locator("#messages li.system").all_text_contents() == []
        assert page_errors(watch) == []


async def test_a_history_page_that_fails_is_asked_again(
    node_factory: NodeFactory, http: aiohttp.ClientSession, browser: Browser
) -> None:
    """A page of history can fail for a moment (503 unavailable: NATS did not
    answer in time): the demo says so and asks again, without a reconnect."""
    node: RunningNode = await node_factory(**DEMO)
    sent = await publish_batch(http, node.url, "room:lobby", ["kept 0", "kept 1"])
    context = await browser.new_context()
    try:
        page = await context.new_page()
        watch = ConsoleWatch(page, ignore=("/favicon.ico", "/api/command"))  # chromium logs the 503
        history_posts = 0

        async def first_history_fails(route: Route) -> None:
            nonlocal history_posts
            if (route.request.post_data_json or {}).get("type") == "history":
                history_posts += 1
                if history_posts == 1:
                    message = "reading history failed: TimeoutError"
                    await route.fulfill(status=503, json={"type": "error", "code": "unavailable", "message": message})
                    return
            await route.continue_()

        await page.route(re.compile(r"/api/command$"), first_history_fails)
        await page.goto(f"{node.url}/?user=quinn&room=lobby&transport=sse")
        edge = page.locator("#messages li.history-edge")
        await expect(edge).to_have_attribute("data-state", "error", timeout=TIMEOUT)
        await expect(edge).to_contain_text("reading history failed: TimeoutError (trying again)")
        conn = await page.evaluate("window.heraldDemo.client.conn")
        await expect(edge).to_have_text("start of history", timeout=TIMEOUT)
        assert await list_rows(page) == ["edge:start"] + [f"history:{i}" for i in sent] + ["divider"]
        assert history_posts == 2
        assert await page.evaluate("window.heraldDemo.client.conn") == conn  # no reconnect: the same stream
        assert watch.errors == [], watch.messages
    finally:
        await context.close()


HISTORY_RUN = """async ([url, token, transport]) => {
  const { Herald } = await import("/static/herald.js");
  const until = async (what, ok) => {
    for (const end = Date.now() + 5000; !ok(); await new Promise((r) => setTimeout(r, 20))) {
      if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    }
  };
  const got = [];
  const c = Herald.connect({ url, token, rooms: ["lobby"], transport });
  c.on("message", (m) => got.push(m));
  await until("open", () => c.state === "open");
  await until("the inbox", () => got.length === 2);
  const position = c.lastId;
  const newest = await c.history("lobby", { limit: 3 });
  const older = await c.history("lobby", { limit: 3, before: newest.messages[0].id });
  const inbox = await c.history({ channel: "user" }, { limit: 10 });
  const forbidden = await c.history("secret").catch((e) => e);
  const bad = await c.history("lobby", { limit: 0 }).catch((e) => e);
  const unchanged = c.lastId === position && got.length === 2;
  const live = await c.publish("lobby", { text: "live" });
  await until("the live message", () => got.some((m) => m.id === live.id));
  c.close();
  return { newest, older, inbox, forbidden, bad, unchanged, got, live: live.id };
}"""


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_client_history_pages_on_a_real_node(
    transport: str, node: RunningNode, http: aiohttp.ClientSession, browser: Browser
) -> None:
    """herald.js's history(): a room's pages backwards, the user's inbox, the
    refusals; pages are not delivered as messages and do not move the resume
    position."""
    lobby = [await api_publish(http, node, "room:lobby", {"n": i}) for i in range(5)]
    notes = [await api_publish(http, node, "user:hana", {"note": i}) for i in range(2)]
    context = await browser.new_context()
    try:
        page = await context.new_page()
        watch = ConsoleWatch(page, ignore=("/favicon.ico", "/api/command"))  # chromium logs the 4xx refusals
        await page.goto(node.url + "/healthz")
        tok = token("hana", rooms=["lobby"], publish=["lobby"])
        r = await page.evaluate(HISTORY_RUN, [node.url, tok, transport])
        assert watch.errors == [], watch.messages
    finally:
        await context.close()

    def room_message(i: int) -> dict[str, Any]:
        return {"channel": "room:lobby", "id": lobby[i], "event": "message", "from": None, "data": {"n": i}}

    inbox = [
        {"channel": "user", "id": notes[i], "event": "message", "from": None, "data": {"note": i}} for i in range(2)
    ]
    assert r["newest"] == {"channel": "room:lobby", "messages": [room_message(i) for i in (2, 3, 4)]}
    assert r["older"] == {"channel": "room:lobby", "messages": [room_message(i) for i in (0, 1)]}  # 2 < 3: the last
    assert r["inbox"] == {"channel": "user", "messages": inbox}
    assert (r["forbidden"]["code"], r["forbidden"]["message"]) == ("forbidden", "token does not allow room secret")
    assert r["bad"]["code"] == "bad_request" and r["bad"]["ref"]
    assert r["unchanged"] is True
    live = {"channel": "room:lobby", "id": r["live"], "event": "message", "from": "hana", "data": {"text": "live"}}
    assert r["got"] == [*inbox, live]  # the unread inbox at open, then the live message: no history
