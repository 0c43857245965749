"""herald.js's decisions, checked in chromium with a scripted WebSocket and
manual timers (tests/system/browser/js/fake_socket.js): backoff, resume positions, close
codes, token renewal and command promises. The real-node behaviour is in
test_demo.py. The clients here have no heartbeat (``heartbeat: 0``): its
liveness timer would sit among the ones a test fires (test_mobile.py
checks it against real nodes)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_asyncio
from playwright.async_api import Browser, Page

from ...browser import ConsoleWatch
from ...helpers import RunningNode

FAKE = Path(__file__).parent / "js" / "fake_socket.js"
WELCOME = '{type: "welcome", conn: "c1", user: "u", node: "n", channels: []}'


@pytest_asyncio.fixture(loop_scope="session")  # the browser's loop (conftest.py)
async def page(node: RunningNode, browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context()
    page = await context.new_page()
    watch = ConsoleWatch(page)
    await page.add_init_script(path=str(FAKE))
    await page.goto(node.url + "/healthz")  # any page of the node's origin, to import the module from
    yield page
    await context.close()
    assert watch.errors == [], watch.messages


async def run(page: Page, body: str) -> Any:
    """Run ``body`` in an async function with ``Herald`` imported, ``fake`` in scope."""
    return await page.evaluate(f'async () => {{ const {{ Herald }} = await import("/static/herald.js"); {body} }}')


async def test_backoff_is_exponential_capped_and_resumes_from_the_last_id(page: Page) -> None:
    result = await run(
        page,
        f"""
        const c = Herald.connect({{ url: "http://gw.test", heartbeat: 0,
          token: "t1", rooms: ["lobby", "b"], transport: "ws" }});
        const states = [];
        c.on("state", (s) => states.push(s));
        const first = fake.last().url;
        fake.last().receive({WELCOME});
        fake.last().receive({{ type: "message", channel: "room:lobby", id: "41", event: "message", data: 1 }});
        fake.last().receive({{ type: "message", channel: "room:lobby", event: "typing", data: 2 }});  // no id
        const waits = [];
        for (let i = 0; i < 9; i++) {{ fake.last().drop(1006); waits.push(fake.fire()); }}
        fake.last().receive({WELCOME});
        fake.last().drop(1006);
        waits.push(fake.fire());  // an open connection starts the backoff again
        return {{ first: first.href, url: fake.last().url.href, waits, states }};
        """,
    )
    assert result["first"] == "ws://gw.test/ws?token=t1&room=lobby&room=b"
    assert result["url"] == "ws://gw.test/ws?token=t1&room=lobby&room=b&since=41&replaces=c1"
    assert result["waits"] == [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 500]
    assert result["states"] == ["open", "reconnecting", "open", "reconnecting"]


async def test_close_codes_pick_the_reconnect(page: Page) -> None:
    result = await run(
        page,
        f"""
        const c = Herald.connect({{ url: "http://gw.test", heartbeat: 0, token: "t", transport: "ws" }});
        const waits = {{}};
        for (const [code, reason] of [[4008, ""], [1012, "node restarting"], [1012, "reconnect in 2500 ms"]]) {{
          fake.last().receive({WELCOME});
          fake.last().drop(code, reason);
          waits[`${{code}} ${{reason}}`] = fake.fire();
        }}
        fake.last().receive({WELCOME});
        fake.last().drop(4003, "forbidden");
        const afterForbidden = {{ state: c.state, timers: fake.timers.length, sockets: fake.sockets.length }};
        const d = Herald.connect({{ url: "http://gw.test", heartbeat: 0, token: "t", transport: "ws" }});
        fake.last().receive({WELCOME});
        fake.last().drop(4029, "too many connections: this was the user's oldest");
        const e = Herald.connect({{ url: "http://gw.test", heartbeat: 0, token: "t", transport: "ws" }});
        fake.last().receive({WELCOME});
        fake.last().drop(4029, "replaced by the client's new connection (replaces=)");
        const f = Herald.connect({{ url: "http://gw.test", heartbeat: 0, token: "t", transport: "ws" }});
        fake.last().receive({WELCOME});
        fake.last().drop(4029, "at most 1 connections per user");  // refused: backs off and tries again
        return {{ waits, afterForbidden, replaced: [d.state, e.state, f.state], timers: fake.timers.length }};
        """,
    )
    assert result["waits"] == {"4008 ": 0, "1012 node restarting": 1000, "1012 reconnect in 2500 ms": 2500}
    assert result["afterForbidden"] == {"state": "closed", "timers": 0, "sockets": 4}
    assert (result["replaced"], result["timers"]) == (["closed", "closed", "reconnecting"], 1)


async def test_a_rejected_token_is_renewed_once_through_get_token(page: Page) -> None:
    result = await run(
        page,
        f"""
        let calls = 0;
        const getToken = async () => `tok${{++calls}}`;
        const c = Herald.connect({{ url: "http://gw.test", heartbeat: 0, getToken, transport: "ws" }});
        await fake.settle();
        const tokens = [fake.last().url.searchParams.get("token")];
        fake.last().receive({WELCOME});
        fake.last().drop(4001, "token expired");  // renewed at once, no backoff
        await fake.settle();
        tokens.push(fake.last().url.searchParams.get("token"));
        fake.last().receive({WELCOME});
        fake.last().drop(4001, "token expired");  // after an open connection: renewed again
        await fake.settle();
        tokens.push(fake.last().url.searchParams.get("token"));
        fake.last().drop(4001, "invalid token");  // the renewed token refused before a welcome: stop
        await fake.settle();
        return {{ tokens, calls, state: c.state, sockets: fake.sockets.length, timers: fake.timers.length }};
        """,
    )
    assert result["tokens"] == ["tok1", "tok2", "tok3"]
    assert (result["calls"], result["state"], result["sockets"], result["timers"]) == (3, "closed", 3, 0)


async def test_commands_resolve_and_reject_by_ref(page: Page) -> None:
    result = await run(
        page,
        f"""
        const c = Herald.connect({{ url: "http://gw.test", heartbeat: 0, token: "t", transport: "ws", timeout: 3000 }});
        const ws = fake.last();
        const early = c.publish("lobby", {{ text: "hi" }}, {{ event: "chat" }});  // before the welcome: queued
        const queued = ws.sent.length;
        ws.receive({WELCOME});
        const sent = ws.sent.map((f) => JSON.stringify(f));
        const presence = c.presence("lobby");
        const bad = c.publish("a.b", 1);
        const seen = [];
        c.on("presence", (p) => seen.push(p.users));
        ws.receive({{ type: "error", ref: "3", code: "bad_request", message: "invalid room" }});
        ws.receive({{ type: "presence", ref: "2", room: "lobby", users: ["u", "v"] }});
        ws.receive({{ type: "ack", ref: "1", channel: "room:lobby", id: "9" }});
        const out = {{ queued, sent, early: await early, presence: await presence, seen }};
        out.bad = await bad.catch((e) => e);
        const slow = c.read("9").catch((e) => e);
        const timeoutMs = fake.timers[fake.timers.length - 1].ms;
        fake.fire();
        out.slow = await slow;
        out.timeoutMs = timeoutMs;
        const lost = c.ping().catch((e) => e);
        ws.drop(1006);
        out.lost = await lost;
        return out;
        """,
    )
    assert result["queued"] == 0
    assert result["sent"] == ['{"type":"publish","room":"lobby","data":{"text":"hi"},"event":"chat","ref":"1"}']
    assert result["early"] == {"type": "ack", "ref": "1", "channel": "room:lobby", "id": "9"}
    assert result["presence"]["users"] == ["u", "v"] and result["seen"] == [["u", "v"]]
    assert result["bad"] == {"type": "error", "ref": "3", "code": "bad_request", "message": "invalid room"}
    assert result["slow"]["code"] == "timeout" and result["timeoutMs"] == 3000
    assert result["lost"]["code"] == "disconnected"


async def test_sse_stream_carries_frames_and_is_reopened_with_the_current_rooms(page: Page) -> None:
    result = await run(
        page,
        f"""
        const opts = {{ url: "http://gw.test", heartbeat: 0,
          token: "t1", rooms: ["lobby"], transport: "sse", events: ["chat"] }};
        const c = Herald.connect(opts);  // events: ignored now, kept for old callers
        const got = [], states = [];
        c.on("state", (s) => states.push(s));
        for (const name of ["message", "reset", "join", "leave", "welcome"]) c.on(name, (v) => got.push([name, v]));
        const es = fake.last();
        es.receive({WELCOME});
        const hi = {{ text: "hi" }};
        es.receive({{ type: "message", channel: "room:lobby", id: "41", event: "chat", from: "ann", data: hi }});
        es.receive({{ type: "message", channel: "user", id: "42", event: "notify", data: "x" }});
        es.receive({{ type: "message", channel: "room:lobby", event: "typing", from: "ann", data: 2 }});  // no id
        es.receive({{ type: "reset", channel: "room:lobby", reason: "gone" }});
        es.receive({{ type: "join", room: "lobby", user: "v" }});
        const sub = c.subscribe("b");
        await fake.settle();
        fake.request().respond(200, {{ type: "ack", ref: "1", channel: "room:b" }});
        const ack = await sub;
        es.fail("lost");  // EventSource would retry the old URL by itself: the client reopens instead
        const wait = fake.fire();
        return {{
          first: es.url.href, closed: es.closed, wait, url: fake.last().url.href, conn: c.conn,
          got, states, ack, sources: fake.sockets.length, lastId: c.lastId,
        }};
        """,
    )
    assert result["first"] == "http://gw.test/sse?token=t1&room=lobby&envelope=1"
    assert result["url"] == "http://gw.test/sse?token=t1&room=lobby&room=b&since=42&replaces=c1&envelope=1"
    assert (result["closed"], result["wait"], result["sources"], result["conn"]) == (True, 500, 2, "c1")
    assert result["states"] == ["open", "reconnecting"]
    assert result["ack"] == {"type": "ack", "ref": "1", "channel": "room:b"}
    messages = [v for name, v in result["got"] if name == "message"]
    assert messages == [
        {"channel": "room:lobby", "id": "41", "event": "chat", "from": "ann", "data": {"text": "hi"}},
        {"channel": "user", "id": "42", "event": "notify", "from": None, "data": "x"},  # a backend's: from no one
        {"channel": "room:lobby", "id": None, "event": "typing", "from": "ann", "data": 2},
    ]
    assert [name for name, _ in result["got"]] == ["welcome", "message", "message", "message", "reset", "join"]


async def test_sse_commands_are_posted_in_order_with_conn_and_token(page: Page) -> None:
    result = await run(
        page,
        """
        const c = Herald.connect({ url: "http://gw.test", heartbeat: 0, token: "t", transport: "sse", timeout: 3000 });
        const es = fake.last();
        const early = c.publish("lobby", { text: "hi" }, { event: "chat" });  // before the welcome: waits for it
        await fake.settle();
        const queued = fake.requests.length;
        es.receive({ type: "welcome", conn: "n1:4", user: "u", node: "n1", channels: [] });
        const presence = c.presence("lobby");
        const sub = c.subscribe("b").catch((e) => e);
        const seen = [];
        c.on("presence", (p) => seen.push(p.users));
        await fake.settle();
        const inFlight = fake.requests.length;  // one at a time, in order
        const first = fake.request();
        first.respond(200, { type: "ack", ref: "1", channel: "room:lobby", id: "9" });
        await fake.settle();
        fake.request().respond(200, { type: "presence", ref: "2", room: "lobby", users: ["u", "v"] });
        await fake.settle();
        const third = fake.request();
        third.respond(403, { type: "error", ref: "3", code: "forbidden", message: "token does not allow room b" });
        const out = { queued, inFlight, early: await early, presence: await presence, seen, sub: await sub };
        out.first = { url: first.url.href, method: first.method, headers: first.headers, body: first.body };
        out.third = third.body;
        const expired = c.ping().catch((e) => e);
        await fake.settle();
        fake.request().respond(401, { type: "error", code: "bad_token", message: "token expired" });  // no ref
        out.expired = await expired;
        const proxy = c.ping().catch((e) => e);
        await fake.settle();
        fake.request().respond(502, undefined);  // a proxy's HTML page
        out.proxy = await proxy;
        const lost = c.read("9").catch((e) => e);
        await fake.settle();
        fake.request().fail();
        out.lost = await lost;
        const slow = c.ping().catch((e) => e);
        await fake.settle();
        const slowRequest = fake.request();
        out.timeoutMs = fake.timers[fake.timers.length - 1].ms;
        fake.fire();
        out.slow = await slow;
        out.aborted = slowRequest.done;
        return out;
        """,
    )
    assert (result["queued"], result["inFlight"]) == (0, 1)
    assert result["first"] == {
        "url": "http://gw.test/api/command",
        "method": "POST",
        "headers": {"Content-Type": "application/json", "Authorization": "Bearer t"},
        "body": {"type": "publish", "room": "lobby", "data": {"text": "hi"}, "event": "chat", "ref": "1"},
    }
    assert result["early"] == {"type": "ack", "ref": "1", "channel": "room:lobby", "id": "9"}
    assert result["presence"]["users"] == ["u", "v"] and result["seen"] == [["u", "v"]]
    assert result["third"] == {"type": "subscribe", "room": "b", "ref": "3", "conn": "n1:4"}
    assert result["sub"] == {"type": "error", "ref": "3", "code": "forbidden", "message": "token does not allow room b"}
    assert result["expired"] == {"type": "error", "code": "bad_token", "message": "token expired", "ref": "4"}
    assert (result["proxy"]["code"], result["proxy"]["ref"]) == ("unavailable", "5")
    assert (result["lost"]["code"], result["lost"]["ref"]) == ("disconnected", "6")
    assert result["slow"]["code"] == "timeout" and result["timeoutMs"] == 3000 and result["aborted"] is True


async def test_sse_command_for_a_stream_that_ended_meanwhile_is_sent_again_on_the_new_one(page: Page) -> None:
    result = await run(
        page,
        """
        const welcome = (conn) => ({ type: "welcome", conn, user: "u", node: "n", channels: [] });
        const c = Herald.connect({ url: "http://gw.test", heartbeat: 0,
          token: "t", rooms: ["lobby"], transport: "sse" });
        fake.last().receive(welcome("n:1"));
        let done = null;
        const sub = c.subscribe("b").then((ack) => { done = ack; return ack; });
        await fake.settle();
        const bodies = [fake.request().body];
        fake.last().fail("lost");  // the stream drops while the command is on its way
        fake.request().respond(404, { type: "error", ref: "1", code: "not_found", message: "no open connection n:1" });
        await fake.settle();
        const early = done;
        fake.fireLast();
        const url = fake.last().url.href;  // room b is not acknowledged yet: not in the URL
        fake.last().receive(welcome("n:2"));
        await fake.settle();
        bodies.push(fake.request().body);  // sent again, naming the new stream
        fake.request().respond(200, { type: "ack", ref: "1", channel: "room:b" });
        const out = { early, url, ack: await sub };

        // Acknowledged for a stream that ended before the answer came: it joined no stream of ours.
        const sub2 = c.subscribe("c");
        await fake.settle();
        bodies.push(fake.request().body);
        fake.last().fail("lost");
        fake.request().respond(200, { type: "ack", ref: "2", channel: "room:c" });
        await fake.settle();
        fake.fireLast();
        out.url2 = fake.last().url.href;  // b now, c not yet
        fake.last().receive(welcome("n:3"));
        await fake.settle();
        bodies.push(fake.request().body);
        fake.request().respond(200, { type: "ack", ref: "2", channel: "room:c" });
        out.ack2 = await sub2;

        // The node no longer knows a stream this client still holds: it reopens it, then sends again.
        const unsub = c.unsubscribe("lobby");
        await fake.settle();
        const held = fake.last();
        bodies.push(fake.request().body);
        fake.request().respond(404, { type: "error", ref: "3", code: "not_found", message: "no open connection n:3" });
        await fake.settle();
        Object.assign(out, { heldClosed: held.closed, state: c.state });
        fake.fireLast();
        out.url3 = fake.last().url.href;
        fake.last().receive(welcome("n:4"));
        await fake.settle();
        bodies.push(fake.request().body);
        fake.request().respond(200, { type: "ack", ref: "3", channel: "room:lobby" });
        Object.assign(out, { unsub: await unsub, bodies, requests: fake.requests.length });
        return out;
        """,
    )
    assert (result["early"], result["url"]) == (None, "http://gw.test/sse?token=t&room=lobby&replaces=n%3A1&envelope=1")
    assert result["ack"] == {"type": "ack", "ref": "1", "channel": "room:b"}
    assert result["url2"] == "http://gw.test/sse?token=t&room=lobby&room=b&replaces=n%3A2&envelope=1"
    assert result["ack2"] == {"type": "ack", "ref": "2", "channel": "room:c"}
    assert (result["heldClosed"], result["state"]) == (True, "reconnecting")
    assert result["url3"] == "http://gw.test/sse?token=t&room=b&room=c&replaces=n%3A3&envelope=1"
    assert result["unsub"] == {"type": "ack", "ref": "3", "channel": "room:lobby"}
    assert [(b["type"], b["room"], b["conn"]) for b in result["bodies"]] == [
        ("subscribe", "b", "n:1"),
        ("subscribe", "b", "n:2"),
        ("subscribe", "c", "n:2"),
        ("subscribe", "c", "n:3"),
        ("unsubscribe", "lobby", "n:3"),
        ("unsubscribe", "lobby", "n:4"),
    ]
    assert result["requests"] == 6


async def test_sse_close_events_pick_the_reconnect_like_websocket_close_codes(page: Page) -> None:
    result = await run(
        page,
        f"""
        let calls = 0;
        const getToken = async () => `tok${{++calls}}`;
        const c = Herald.connect({{ url: "http://gw.test", heartbeat: 0, getToken, transport: "sse" }});
        await fake.settle();
        const waits = {{}};
        const closedByClient = [];
        const ends = [
          [4008, "slow consumer"], [1012, "node restarting"], [1012, "node restarting: reconnect in 2500 ms"],
          [1013, "unavailable"],
        ];
        for (const [code, reason] of ends) {{
          const es = fake.last();
          es.receive({WELCOME});
          es.receive({{ type: "close", code, reason }});
          closedByClient.push(es.closed);
          waits[`${{code}} ${{reason}}`] = fake.fire();
        }}
        fake.last().receive({WELCOME});
        fake.last().receive({{ type: "close", code: 4001, reason: "token expired" }});  // renewed at once
        await fake.settle();
        const renewed = fake.last().url.searchParams.get("token");
        fake.last().fail("refused");  // the new token is refused before the stream: probe for the status
        await fake.settle();
        const probe = fake.request();
        const probeUrl = probe.url.href;
        probe.respond(401, {{ error: "bad_token", message: "token expired" }});
        await fake.settle();
        const afterRefusal = {{ state: c.state, timers: fake.timers.length, calls }};

        const d = Herald.connect({{ url: "http://gw.test", heartbeat: 0, token: "t", transport: "sse" }});
        fake.last().receive({WELCOME});
        const waiting = d.ping().catch((e) => e);  // posted, not answered yet
        const queuedAfter = d.ping().catch((e) => e);
        fake.last().receive({{ type: "close", code: 4003, reason: "room not allowed" }});
        const forbidden = {{ state: d.state, timers: fake.timers.length }};
        Object.assign(forbidden, {{ waiting: (await waiting).code, queued: (await queuedAfter).code }});

        const e = Herald.connect({{ url: "http://gw.test", heartbeat: 0, token: "t", transport: "sse" }});
        fake.last().receive({WELCOME});
        const reason = "too many connections: this was the user's oldest";
        fake.last().receive({{ type: "close", code: 4029, reason }});
        const timers = fake.timers.length;
        return {{ waits, closedByClient, renewed, probeUrl, afterRefusal, forbidden, replaced: e.state, timers }};
        """,
    )
    assert result["waits"] == {
        "4008 slow consumer": 0,
        "1012 node restarting": 1000,
        "1012 node restarting: reconnect in 2500 ms": 2500,
        "1013 unavailable": 500,
    }
    assert result["closedByClient"] == [True, True, True, True]
    assert result["renewed"] == "tok2"
    assert result["probeUrl"] == "http://gw.test/sse?token=tok2&replaces=c1&envelope=1"
    assert result["afterRefusal"] == {"state": "closed", "timers": 0, "calls": 2}
    assert result["forbidden"] == {"state": "closed", "timers": 0, "waiting": "disconnected", "queued": "disconnected"}
    assert (result["replaced"], result["timers"]) == ("closed", 0)


async def test_history_pages_resolve_as_messages_and_reject_by_ref(page: Page) -> None:
    result = await run(
        page,
        """
        const c = Herald.connect({ url: "http://gw.test", heartbeat: 0,
          token: "t", rooms: ["lobby"], transport: "ws" });
        const ws = fake.last();
        const early = c.history("lobby", { limit: 2 });  // before the welcome: queued, like any command
        const queued = ws.sent.length;
        ws.receive({ type: "welcome", conn: "c1", user: "u", node: "n", channels: [], position: "50" });
        const got = [], resets = [];
        c.on("message", (m) => got.push(m));
        const older = c.history("lobby", { limit: 2, before: 39 });  // a number is sent as an id string
        const inbox = c.history({ channel: "user" });
        const denied = c.history("secret").catch((e) => e);
        const msg = (id, data) => ({ type: "message", channel: "room:lobby", id, event: "chat", data });
        const note = { type: "message", channel: "user", id: "12", event: "notify", data: "x" };
        ws.receive({ type: "history", channel: "room:lobby", messages: [msg("39", 1), msg("41", 2)], ref: "1" });
        ws.receive({ type: "history", channel: "room:lobby", messages: [], ref: "2" });
        ws.receive({ type: "history", channel: "user", messages: [note], ref: "3" });
        ws.receive({ type: "error", code: "forbidden", message: "token does not allow room secret", ref: "4" });
        const out = { queued, early: await early, older: await older, inbox: await inbox, denied: await denied };

        // A reset: what the node still holds of the room is its history; the page asks for it again.
        let reloaded = null;
        c.on("reset", (r) => { resets.push(r.channel); reloaded = c.history({ channel: r.channel }, { limit: 50 }); });
        ws.receive({ type: "reset", channel: "room:lobby", reason: "messages missed are no longer held" });
        ws.receive({ type: "history", channel: "room:lobby", messages: [msg("49", 3)], ref: "5" });
        out.reloaded = await reloaded;
        return { ...out, sent: ws.sent, got, resets, lastId: c.lastId };
        """,
    )
    assert result["queued"] == 0
    assert result["sent"] == [
        {"type": "history", "room": "lobby", "limit": 2, "ref": "1"},
        {"type": "history", "room": "lobby", "limit": 2, "before": "39", "ref": "2"},
        {"type": "history", "channel": "user", "ref": "3"},
        {"type": "history", "room": "secret", "ref": "4"},
        {"type": "history", "channel": "room:lobby", "limit": 50, "ref": "5"},
    ]
    assert result["early"] == {
        "channel": "room:lobby",
        "messages": [
            {"channel": "room:lobby", "id": "39", "event": "chat", "from": None, "data": 1},
            {"channel": "room:lobby", "id": "41", "event": "chat", "from": None, "data": 2},
        ],
    }
    assert result["older"] == {"channel": "room:lobby", "messages": []}
    assert result["inbox"] == {
        "channel": "user",
        "messages": [{"channel": "user", "id": "12", "event": "notify", "from": None, "data": "x"}],
    }
    assert result["denied"] == {
        "type": "error",
        "code": "forbidden",
        "message": "token does not allow room secret",
        "ref": "4",
    }
    assert result["resets"] == ["room:lobby"]
    assert result["reloaded"]["messages"] == [
        {"channel": "room:lobby", "id": "49", "event": "chat", "from": None, "data": 3}
    ]
    # A page is read, not delivered: no message event, and the resume position stays the welcome's.
    assert (result["got"], result["lastId"]) == ([], "50")


async def test_sse_history_is_posted_without_conn(page: Page) -> None:
    result = await run(
        page,
        """
        const c = Herald.connect({ url: "http://gw.test", heartbeat: 0, token: "t", transport: "sse" });
        fake.last().receive({ type: "welcome", conn: "n1:4", user: "u", node: "n1", channels: [], position: "7" });
        const newest = c.history("lobby", { limit: 2, before: "7" });
        const denied = c.history({ channel: "room:secret" }).catch((e) => e);
        await fake.settle();
        const first = fake.request();
        first.respond(200, { type: "history", channel: "room:lobby", ref: "1",
          messages: [{ type: "message", channel: "room:lobby", id: "5", event: "message", from: "kai", data: "hi" }] });
        await fake.settle();
        const second = fake.request();
        const refusal = { type: "error", code: "forbidden", message: "token does not allow room secret", ref: "2" };
        second.respond(403, refusal);
        return { bodies: [first.body, second.body], url: first.url.href, newest: await newest, denied: await denied };
        """,
    )
    assert result["url"] == "http://gw.test/api/command"
    assert result["bodies"] == [
        {"type": "history", "room": "lobby", "limit": 2, "before": "7", "ref": "1"},
        {"type": "history", "channel": "room:secret", "ref": "2"},
    ]
    assert result["newest"] == {
        "channel": "room:lobby",
        "messages": [{"channel": "room:lobby", "id": "5", "event": "message", "from": "kai", "data": "hi"}],
    }
    assert (result["denied"]["code"], result["denied"]["ref"]) == ("forbidden", "2")


async def test_a_room_joins_the_url_once_acknowledged_and_queued_commands_wait(page: Page) -> None:
    result = await run(
        page,
        """
        const opts = { url: "http://gw.test", heartbeat: 0,
          token: "t", rooms: ["lobby"], transport: "ws", timeout: 9e4 };
        const c = Herald.connect(opts);
        const reconnect = () => fake.timers.splice(fake.timers.findIndex((t) => t.ms < 9e4), 1)[0].fn();
        fake.last().receive({ type: "welcome", conn: "c1", user: "u", node: "n", channels: [] });
        const a = c.subscribe("a");
        const secret = c.subscribe("secret").catch((e) => e.code);
        fake.last().receive({ type: "ack", ref: "1", channel: "room:a" });
        fake.last().receive({ type: "error", ref: "2", code: "forbidden", message: "not allowed" });
        const out = { acked: (await a).channel, refused: await secret };
        const lost = c.subscribe("b").catch((e) => e.code);  // sent, then the connection drops: not in the URL
        fake.last().drop(1006);
        out.lost = await lost;
        const queued = [c.subscribe("q"), c.ping()].map((p) => p.then((f) => f.type, (e) => e.code));
        reconnect();
        fake.last().drop(1006);  // an attempt that fails: the queued commands wait
        reconnect();
        const ws = fake.last();
        out.url = ws.url.href;
        ws.receive({ type: "welcome", conn: "c2", user: "u", node: "n", channels: [] });
        out.sent = ws.sent.map((f) => f.type);
        ws.receive({ type: "ack", ref: "4", channel: "room:q" });
        ws.receive({ type: "pong", ref: "5" });
        out.queued = await Promise.all(queued);
        ws.drop(1006);
        reconnect();
        out.url2 = fake.last().url.href;
        return out;
        """,
    )
    assert (result["acked"], result["refused"], result["lost"]) == ("room:a", "forbidden", "disconnected")
    assert result["url"] == "ws://gw.test/ws?token=t&room=lobby&room=a&replaces=c1"
    assert (result["sent"], result["queued"]) == (["subscribe", "ping"], ["ack", "pong"])
    assert result["url2"] == "ws://gw.test/ws?token=t&room=lobby&room=a&room=q&replaces=c2"


async def test_each_channels_messages_come_once_and_backend_rooms_rejoin_from_their_position(page: Page) -> None:
    result = await run(
        page,
        """
        const c = Herald.connect({ url: "http://gw.test", heartbeat: 0,
          token: "t", rooms: ["lobby"], transport: "ws" });
        const got = [];
        c.on("message", (m) => got.push(m.id));
        const channels = ["user", "broadcast", "room:lobby"];
        const msg = (channel, id) => ({ type: "message", channel, id, event: "message", data: null });
        let ws = fake.last();
        const sent = [];  // per connection: the frames it sent
        const welcome = () => {
          ws.receive({ type: "welcome", conn: `c${fake.sockets.length}`, user: "u", node: "n", channels });
          sent.push(ws.sent);
        };
        const reconnect = () => { ws.drop(1006); fake.fireLast(); ws = fake.last(); welcome(); };
        welcome();
        ws.receive(msg("room:lobby", "10"));
        ws.receive({ type: "subscribed", room: "p9" });
        ws.receive(msg("room:p9", "12"));
        reconnect();  // resumes from 12, re-joins p9 from 12
        ws.receive(msg("room:lobby", "11"));  // the resume's replay
        ws.receive(msg("room:lobby", "20"));
        ws.receive(msg("room:p9", "13"));  // then the re-join's, cut short: no answer
        reconnect();  // resumes from 13 (the last id received), re-joins p9 from 12 again
        const since = ws.url.searchParams.get("since");
        ws.receive(msg("room:lobby", "20"));  // a repeat
        ws.receive(msg("room:p9", "13"));  // a repeat too
        ws.receive(msg("room:p9", "14"));
        ws.receive({ type: "ack", ref: sent.at(-1)[0].ref, channel: "room:p9" });
        ws.receive(msg("room:p9", "15"));
        await fake.settle();
        reconnect();  // answered: re-joined from where this stream resumed
        ws.receive({ type: "error", ref: sent.at(-1)[0].ref, code: "rate_limited", message: "", retry_after: 2 });
        await fake.settle();
        const retryMs = fake.timers.at(-1).ms;
        fake.fireLast();  // asked again on the same stream, once the budget is back
        ws.receive({ type: "error", ref: sent.at(-1)[1].ref, code: "forbidden", message: "" });
        await fake.settle();
        reconnect();  // given up: nothing to re-join
        ws.receive({ type: "subscribed", room: "p10" });
        c.unsubscribe("p10").catch(() => {});  // the connection drops before its answer
        reconnect();  // left: not re-joined
        return { got, since, retryMs, sent, lastId: c.lastId };
        """,
    )
    assert result["got"] == ["10", "12", "11", "20", "13", "14", "15"]
    assert (result["since"], result["lastId"], result["retryMs"]) == ("13", "15", 2000)
    assert [[(f["type"], f["room"], f.get("since")) for f in frames] for frames in result["sent"]] == [
        [],
        [("subscribe", "p9", "12")],
        [("subscribe", "p9", "12")],
        [("subscribe", "p9", "15"), ("subscribe", "p9", "15")],
        [("unsubscribe", "p10", None)],
        [],
    ]


async def test_a_reset_starts_its_channels_count_over_when_the_node_sends_no_position(page: Page) -> None:
    """Without a welcome ``position`` the client cannot tell a recreated stream (numbering from 1 again) from
    the same one: after a reset smaller ids are new."""
    got = await run(
        page,
        f"""
        const c = Herald.connect({{ url: "http://gw.test", heartbeat: 0,
          token: "t", rooms: ["lobby"], transport: "ws" }});
        const got = [];
        c.on("message", (m) => got.push(m.id));
        const msg = (id) => ({{ type: "message", channel: "room:lobby", id, event: "message", data: null }});
        fake.last().receive({WELCOME});
        fake.last().receive(msg("40"));
        fake.last().receive(msg("40"));  // a repeat
        fake.last().receive({{ type: "reset", channel: "room:lobby", reason: "recreated" }});
        fake.last().receive(msg("2"));
        return got;
        """,
    )
    assert got == ["40", "2"]


async def test_a_reset_starts_the_channels_count_over_only_past_the_streams_end(page: Page) -> None:
    """docs/protocol.md §7.2. A reset for messages no longer held is of the same stream: its ids go on, and a
    resume that brings the channel's held messages again (with the same reset before them) must not hand them
    out twice; every reset used to start the count over. Only a reset for a position past the stream's end
    (above the welcome's position and every id since) starts it over. A backend room re-joined from a
    position past the end: its live messages before its reset are new."""
    result = await run(
        page,
        """
        const c = Herald.connect({ url: "http://gw.test", heartbeat: 0, token: "t", rooms: ["a"], transport: "ws" });
        const got = [];
        c.on("message", (m) => got.push(m.id)).on("reset", (r) => got.push(`reset ${r.channel}`));
        const msg = (channel, id) => ({ type: "message", channel, id, event: "message", data: null });
        const reset = (channel) => ({ type: "reset", channel, reason: "messages missed are no longer held" });
        const welcome = (position) => fake.last().receive({
          type: "welcome", conn: `c${fake.sockets.length}`, user: "u", node: "n", channels: ["room:a"], position,
        });
        const reconnect = () => { fake.last().drop(1006); fake.fireLast(); };
        welcome("50");
        for (const [channel, id] of [["room:a", "55"], ["room:a", "58"], ["room:b", "53"]]) {
          fake.last().receive(msg(channel, id));  // 53: an older id (a re-join's replay) moves the position back
        }
        reconnect();  // from 53: the node resets room:a (54 is gone) and sends what it holds of it again
        const since = [fake.last().url.searchParams.get("since")];
        welcome("60");
        for (const f of [reset("room:a"), msg("room:a", "55"), msg("room:a", "58"), msg("room:a", "59")]) {
          fake.last().receive(f);
        }
        fake.last().receive({ type: "subscribed", room: "p9" });
        fake.last().receive(msg("room:p9", "62"));
        reconnect();  // from 62, into a recreated stream (its position is 3): every count starts over
        since.push(fake.last().url.searchParams.get("since"));
        welcome("3");
        const rejoin = fake.last().sent[0];  // p9 from 62: past the stream's end
        fake.last().receive(reset("room:a"));
        fake.last().receive(msg("room:a", "2"));
        fake.last().receive(msg("room:p9", "4"));  // live, before the re-join's reset: new
        fake.last().receive(reset("room:p9"));
        fake.last().receive(msg("room:p9", "3"));  // held: the replay
        fake.last().receive({ type: "ack", ref: rejoin.ref, channel: "room:p9" });
        await fake.settle();
        fake.last().receive(msg("room:p9", "5"));
        return { got, since, rejoin };
        """,
    )
    assert result["since"] == ["53", "62"]
    assert (result["rejoin"]["room"], result["rejoin"]["since"]) == ("p9", "62")
    assert result["got"] == [
        *("55", "58", "53"),
        *("reset room:a", "59", "62"),  # 55 and 58 are repeats: the same stream
        *("reset room:a", "2", "4", "reset room:p9", "3", "5"),
    ]


async def test_a_frame_the_node_cannot_take_stops_the_client(page: Page) -> None:
    """1002, 1007, 1009 (docs/protocol.md §8: "stop: fix the client"): the same frames would be refused
    again, so no reconnect; the client stops as on 4000, with the same error event."""
    result = await run(
        page,
        f"""
        const out = {{}};
        for (const [code, reason] of [[1002, "protocol error"], [1007, "text frame is not UTF-8"],
                                      [1009, "frame too big"], [4000, "invalid room id"]]) {{
          const c = Herald.connect({{ url: "http://gw.test", heartbeat: 0, token: "t", transport: "ws" }});
          const errors = [];
          c.on("error", (e) => errors.push(e));
          fake.last().receive({WELCOME});
          const lost = c.ping().catch((e) => e.code);
          fake.last().drop(code, reason);
          out[code] = {{ state: c.state, timers: fake.timers.length, errors, lost: await lost }};
        }}
        return {{ out, sockets: fake.sockets.length }};
        """,
    )
    assert result["sockets"] == 4
    for code, reason in [(1002, "protocol error"), (1007, "text frame is not UTF-8"), (1009, "frame too big")]:
        assert result["out"][str(code)] == {
            "state": "closed",
            "timers": 0,
            "errors": [{"code": str(code), "message": reason}],
            "lost": "disconnected",
        }, code
    assert result["out"]["4000"]["errors"] == [{"code": "4000", "message": "invalid room id"}]


async def test_the_default_transport_is_auto_and_an_sse_400_stops(page: Page) -> None:
    result = await run(
        page,
        """
        const c = Herald.connect({ url: "http://gw.test", heartbeat: 0, token: "t", rooms: ["no such/room"] });
        const first = fake.last() instanceof WebSocket;
        fake.last().drop(1006);  // WebSockets cannot open: SSE next
        fake.fireLast();
        const second = fake.last() instanceof EventSource;
        fake.last().fail("refused");
        await fake.settle();
        fake.request().respond(400, { error: "bad_request", message: "invalid room id" });
        await fake.settle();
        return { first, second, state: c.state, timers: fake.timers.length };
        """,
    )
    assert result == {"first": True, "second": True, "state": "closed", "timers": 0}


async def test_an_sse_open_refused_with_another_status_stops_or_backs_off_by_its_class(page: Page) -> None:
    """Statuses the node does not send but a proxy or a wrong URL does (docs/protocol.md 8): a 4xx the same
    request would get again (404 a wrong path, 414 / 431 a URL or head too long, 405, 410) stops the client
    as 4000 does, with the status in the error; 408, 421 and every 5xx (502, 504: a proxy without a node) are
    retried with backoff. They used to be read as 1006 and retried for ever."""
    result = await run(
        page,
        """
        const out = {};
        for (const status of [404, 405, 410, 414, 431, 408, 421, 502, 504, 599]) {
          const c = Herald.connect({ url: "http://gw.test", heartbeat: 0, token: "t", transport: "sse" });
          const errors = [], closes = [];
          c.on("error", (e) => errors.push(e));
          c.on("close", (e) => closes.push(e.code));
          fake.last().fail("refused");
          await fake.settle();
          fake.request().respond(status);  // a proxy's page: no JSON
          await fake.settle();
          out[status] = { state: c.state, timers: fake.timers.length, errors, closes };
          fake.timers.splice(0);
          c.close();
        }
        return out;
        """,
    )
    for status in (404, 405, 410, 414, 431):
        assert result[str(status)] == {
            "state": "closed",
            "timers": 0,
            "errors": [{"code": "4000", "message": f"HTTP {status}"}],
            "closes": [4000],
        }, status
    for status, code in ((408, 1006), (421, 1006), (502, 1013), (504, 1013), (599, 1013)):
        assert result[str(status)] == {"state": "reconnecting", "timers": 1, "errors": [], "closes": [code]}, status


async def test_a_stream_that_cannot_even_be_made_is_retried_and_said(page: Page) -> None:
    """``new WebSocket`` / ``new EventSource`` throw for a malformed URL or
    one the page's CSP forbids: the client says so (``error``) and goes on as
    for an unreachable node (the other transport, then the backoff) instead of
    staying "connecting" for ever."""
    result = await run(
        page,
        """
        const refuse = () => { throw new DOMException("refused to connect", "SecurityError"); };
        window.WebSocket = class { constructor() { refuse(); } };
        window.EventSource = class { constructor() { refuse(); } };
        const errors = [];
        const c = Herald.connect({ url: "http://gw.test", heartbeat: 0, token: "t" });  // auto: ws, then sse
        c.on("error", (e) => errors.push(e.code));
        const states = [c.state];
        const waits = [fake.fire(), fake.fire()];
        states.push(c.state);
        return { errors, states, waits, transport: c.transport };
        """,
    )
    assert result["errors"] == ["connect", "connect"]  # the first came before the handler was on
    assert result["states"] == ["reconnecting", "reconnecting"]
    assert result["waits"] == [500, 1000]
