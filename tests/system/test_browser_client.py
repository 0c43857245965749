"""herald.js's decisions, checked in chromium with a scripted WebSocket and
manual timers (tests/system/js/fake_socket.js): backoff, resume positions, close
codes, token renewal and command promises. The real-node behaviour is in
test_browser_demo.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page

from ..browser import ConsoleWatch
from ..helpers import RunningNode

FAKE = Path(__file__).parent / "js" / "fake_socket.js"
WELCOME = '{type: "welcome", conn: "c1", user: "u", node: "n", channels: []}'


@pytest.fixture
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
        const c = Herald.connect({{ url: "http://gw.test", token: "t1", rooms: ["lobby", "b"], transport: "ws" }});
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
    assert result["url"] == "ws://gw.test/ws?token=t1&room=lobby&room=b&since=41"
    assert result["waits"] == [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 500]
    assert result["states"] == ["open", "reconnecting", "open", "reconnecting"]


async def test_close_codes_pick_the_reconnect(page: Page) -> None:
    result = await run(
        page,
        f"""
        const c = Herald.connect({{ url: "http://gw.test", token: "t", transport: "ws" }});
        const waits = {{}};
        for (const [code, reason] of [[4008, ""], [1012, "node restarting"], [1012, "reconnect in 2500 ms"]]) {{
          fake.last().receive({WELCOME});
          fake.last().drop(code, reason);
          waits[`${{code}} ${{reason}}`] = fake.fire();
        }}
        fake.last().receive({WELCOME});
        fake.last().drop(4003, "forbidden");
        const afterForbidden = {{ state: c.state, timers: fake.timers.length, sockets: fake.sockets.length }};
        const d = Herald.connect({{ url: "http://gw.test", token: "t", transport: "ws" }});
        fake.last().receive({WELCOME});
        fake.last().drop(4029, "too many connections: this was the user's oldest");
        return {{ waits, afterForbidden, replaced: d.state, timers: fake.timers.length }};
        """,
    )
    assert result["waits"] == {"4008 ": 0, "1012 node restarting": 1000, "1012 reconnect in 2500 ms": 2500}
    assert result["afterForbidden"] == {"state": "closed", "timers": 0, "sockets": 4}
    assert (result["replaced"], result["timers"]) == ("closed", 0)


async def test_a_rejected_token_is_renewed_once_through_get_token(page: Page) -> None:
    result = await run(
        page,
        f"""
        let calls = 0;
        const getToken = async () => `tok${{++calls}}`;
        const c = Herald.connect({{ url: "http://gw.test", getToken, transport: "ws" }});
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
        const c = Herald.connect({{ url: "http://gw.test", token: "t", transport: "ws", timeout: 3000 }});
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
