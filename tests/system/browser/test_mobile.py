"""herald.js on the networks phones and laptops have: what README's "Browser
client" section promises when the path to the node goes away under a stream.

- A half-open connection (a network switch: the old socket never gets a FIN,
  simulated by a relay that stops forwarding) is given up within `heartbeat`
  + `timeout` ms, on both transports, and the stream resumes on a new path
  with nothing lost or repeated; the node counts the WebSocket one out.
- The reconnect names the stream it gave up (replaces=): a user at their
  connection limit is let back in at once, and the old stream is closed.
- Coming back online reconnects at once, not after the backoff's wait.
- A page kept in the back-forward cache holds no stream, and resumes when
  shown again.
- A page frozen (Page.setWebLifecycleState) while its stream is alive comes
  back with that one stream: no burst of reconnects, nothing repeated.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page

from ...browser import launch_chromium
from ...helpers import NodeFactory, RunningNode, api_publish, token, wait_for
from ...relay import Relay
from .test_demo import admin_post

TIMEOUT = 15_000

PAGE = """async ([url, token, transport, rooms, extra]) => {
  const { Herald } = await import("/static/herald.js");
  window.got = []; window.closes = []; window.welcomes = [];
  window.c = Herald.connect({ url, token, rooms, transport, ...extra });
  c.on("message", (m) => got.push(m.id)).on("close", (e) => closes.push([e.code, e.reason]))
   .on("welcome", (w) => welcomes.push(w.conn));
}"""


@asynccontextmanager
async def client_page(browser: Browser, url: str, user: str, transport: str, **extra: Any) -> AsyncIterator[Page]:
    context = await browser.new_context()
    try:
        page = await context.new_page()
        await page.goto(url + "/healthz")
        await page.evaluate(PAGE, [url, token(user), transport, ["lobby"], extra])
        await page.wait_for_function("c.state === 'open'", timeout=TIMEOUT)
        yield page
    finally:
        await context.close()


async def sessions_of(node: RunningNode, user: str) -> int:
    return len(node.node.sessions.of_user(user))


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_a_half_open_stream_is_given_up_and_resumed_on_a_new_path(
    transport: str, node_factory: NodeFactory, http: aiohttp.ClientSession, browser: Browser
) -> None:
    node: RunningNode = await node_factory(ws={"heartbeat": 2.0}, sse={"keepalive": 0.5})
    relay = Relay(node.runner.addresses[0][1])
    await relay.start()
    try:
        async with client_page(
            browser, relay.url, "hal", transport, heartbeat=1000, timeout=1500, minDelay=50, maxDelay=200
        ) as page:
            before = await api_publish(http, node, "room:lobby", {"n": 0})
            await page.wait_for_function(f"got.includes('{before}')", timeout=TIMEOUT)
            relay.freeze()  # the Wi-Fi is gone; new connections go over "cellular"
            started = time.monotonic()
            sent = [await api_publish(http, node, "room:lobby", {"n": n}) for n in (1, 2)]
            await page.wait_for_function("welcomes.length >= 2 && c.state === 'open'", timeout=8000)
            noticed = time.monotonic() - started
            sent.append(await api_publish(http, node, "room:lobby", {"n": 3}))
            await page.wait_for_function(f"got.includes('{sent[-1]}')", timeout=TIMEOUT)
            got = await page.evaluate("got")
            assert got == [before, *sent], f"lost or repeated: {got}"
            assert noticed < 5, f"the half-open stream was given up after {noticed:.1f} s"
            if transport == "ws":  # the node's heartbeat counts the frozen one out (SSE: see the report)
                await wait_for(lambda: len(node.node.sessions.of_user("hal")) == 1, timeout=6)
    finally:
        await relay.stop()


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_a_half_open_stream_does_not_lock_its_user_out(
    transport: str, node_factory: NodeFactory, http: aiohttp.ClientSession, browser: Browser
) -> None:
    """One connection per user, refuse-new, and no node-side liveness check
    that would find the frozen stream dead in time: the reconnect names the
    stream it gave up (replaces=), so it is admitted at once rather than
    refused 4029 / 429 until the node's timeouts end the old one, which is
    closed for it."""
    limits = {"max_connections_per_user": 1}
    node: RunningNode = await node_factory(ws={"heartbeat": 0}, sse={"keepalive": 0.5}, limits=limits)
    relay = Relay(node.runner.addresses[0][1])
    await relay.start()
    try:
        async with client_page(
            browser, relay.url, "lou", transport, heartbeat=1000, timeout=1500, minDelay=50, maxDelay=200
        ) as page:
            old = (await page.evaluate("welcomes"))[0]
            relay.freeze()  # the Wi-Fi is gone; new connections go over "cellular"
            started = time.monotonic()
            await page.wait_for_function("welcomes.length >= 2 && c.state === 'open'", timeout=8000)
            assert time.monotonic() - started < 5
            assert await page.evaluate("closes.filter(([code]) => code === 4029)") == []  # never refused
            await wait_for(lambda: node.node.sessions.get(old) is None, timeout=5)
            assert await sessions_of(node, "lou") == 1
            sent = await api_publish(http, node, "room:lobby", {"n": 1})
            await page.wait_for_function(f"got.includes('{sent}')", timeout=TIMEOUT)
            assert await page.evaluate("c.state") == "open"
    finally:
        await relay.stop()


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_coming_back_online_reconnects_at_once(
    transport: str, node: RunningNode, http: aiohttp.ClientSession, browser: Browser
) -> None:
    # Every backoff wait is 0.99 of its bound: 19.8 s for the first reconnect.
    async with client_page(browser, node.url, "oli", transport, minDelay=20000, maxDelay=20000) as page:
        await page.evaluate("Math.random = () => 0.99")
        await page.context.set_offline(True)
        assert (await admin_post("/api/disconnect", node, {"user": "oli"}))["disconnected"] == 1
        await page.wait_for_function("c.state === 'reconnecting'", timeout=TIMEOUT)
        missed = await api_publish(http, node, "room:lobby", {"n": "while offline"})
        await asyncio.sleep(0.5)
        await page.context.set_offline(False)
        started = time.monotonic()
        await page.wait_for_function(f"c.state === 'open' && got.includes('{missed}')", timeout=TIMEOUT)
        assert time.monotonic() - started < 3, "waited out the backoff after coming back online"
        await asyncio.sleep(0.3)
        assert await page.evaluate("[welcomes.length, got]") == [2, [missed]]
        assert await sessions_of(node, "oli") == 1


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_a_frozen_page_comes_back_with_its_one_stream(
    transport: str, node_factory: NodeFactory, http: aiohttp.ClientSession, browser: Browser
) -> None:
    node: RunningNode = await node_factory(sse={"keepalive": 0.5})
    async with client_page(
        browser, node.url, "fay", transport, heartbeat=1000, timeout=1500, minDelay=50, maxDelay=200
    ) as page:
        cdp = await page.context.new_cdp_session(page)
        await cdp.send("Page.setWebLifecycleState", {"state": "frozen"})
        sent = []
        for n in range(6):  # the node's messages wait in the socket; its pings are answered all the same
            await asyncio.sleep(1)
            sent.append(await api_publish(http, node, "room:lobby", {"n": n}))
        await cdp.send("Page.setWebLifecycleState", {"state": "active"})
        await page.wait_for_function(f"got.includes('{sent[-1]}')", timeout=TIMEOUT)
        await asyncio.sleep(3)  # two heartbeats: a stream given up by mistake would be reopened by now
        welcomes, got, closes = await page.evaluate("[welcomes, got, closes]")
        assert got == sent, f"lost or repeated: {got}"
        assert (len(welcomes), closes) == (1, []), f"a live stream was given up after the thaw: {closes}"
        assert await sessions_of(node, "fay") == 1


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_a_page_in_the_back_forward_cache_holds_no_stream_and_resumes_on_return(
    transport: str, node: RunningNode, http: aiohttp.ClientSession
) -> None:
    """Away (the page kept in the back-forward cache), the client holds no stream: the node does not count
    the user present, and an open WebSocket would keep the page out of the cache. Back, it resumes."""
    async with (
        launch_chromium(bfcache=True) as browser,
        client_page(browser, node.url, "bea", transport, minDelay=50, maxDelay=200) as page,
    ):
        await page.evaluate("window.kept = true")
        await page.goto(node.url + "/readyz")
        await wait_for(lambda: not node.node.sessions.of_user("bea"), timeout=3)
        missed = await api_publish(http, node, "room:lobby", {"n": "while away"})
        await page.go_back(wait_until="commit")
        await page.wait_for_function("window.kept === true", timeout=TIMEOUT)  # from the cache, not reloaded
        await page.wait_for_function(f"c.state === 'open' && got.includes('{missed}')", timeout=TIMEOUT)
        await asyncio.sleep(0.3)
        assert await page.evaluate("got") == [missed]
        assert await sessions_of(node, "bea") == 1


# Every WebSocket and EventSource the page makes, to count those still open.
TRACK = """(() => {
  window.made = [];
  for (const name of ["WebSocket", "EventSource"]) {
    const Real = window[name];
    window[name] = class extends Real { constructor(...args) { super(...args); made.push(this); } };
  }
})();"""


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_after_a_flapping_network_one_stream_is_left(
    transport: str, node_factory: NodeFactory, http: aiohttp.ClientSession, browser: Browser
) -> None:
    node: RunningNode = await node_factory(ws={"heartbeat": 1.0}, sse={"keepalive": 0.5})
    relay = Relay(node.runner.addresses[0][1])
    await relay.start()
    context = await browser.new_context()
    try:
        page = await context.new_page()
        await page.add_init_script(TRACK)
        await page.goto(relay.url + "/healthz")
        opts = {"heartbeat": 600, "timeout": 1000, "minDelay": 20, "maxDelay": 100}
        await page.evaluate(PAGE, [relay.url, token("fla"), transport, ["lobby"], opts])
        await page.wait_for_function("c.state === 'open'", timeout=TIMEOUT)
        sent = []
        for n in range(6):  # the network comes and goes, and the browser says so each time, twice
            if n % 2 == 0 and transport == "ws":
                relay.freeze()  # (SSE: a frozen stream is never counted out by the node; see below)
            else:
                await admin_post("/api/disconnect", node, {"user": "fla"})
            await context.set_offline(True)
            await page.evaluate("dispatchEvent(new Event('online')); dispatchEvent(new Event('online'))")
            await context.set_offline(False)
            sent.append(await api_publish(http, node, "room:lobby", {"n": n}))
            await asyncio.sleep(0.3 * (n % 3))
        await page.wait_for_function(f"c.state === 'open' && got.includes('{sent[-1]}')", timeout=TIMEOUT)
        await wait_for(lambda: len(node.node.sessions.of_user("fla")) == 1, timeout=5)
        await asyncio.sleep(1.5)  # a stream opened twice would show by now
        alive = "made.filter((s) => s.readyState === 0 || s.readyState === 1).length"
        assert await page.evaluate(alive) == 1
        assert await page.evaluate("got") == sent
        assert await sessions_of(node, "fla") == 1
    finally:
        await context.close()
        await relay.stop()
