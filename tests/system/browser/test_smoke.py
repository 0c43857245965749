"""Smoke test of the browser tooling: Debian's chromium loads the client module from a real node."""

from __future__ import annotations

from playwright.async_api import Browser

from ...browser import ConsoleWatch, screenshot_path
from ...helpers import RunningNode


async def test_chromium_loads_the_client_module(node: RunningNode, browser: Browser) -> None:
    context = await browser.new_context()
    try:
        page = await context.new_page()
        watch = ConsoleWatch(page)

        response = await page.goto(f"{node.url}/static/herald.js")
        assert response is not None and response.status == 200
        assert "javascript" in (await response.header_value("content-type") or "")

        await page.goto(f"{node.url}/")
        kind = await page.evaluate('import("/static/herald.js").then(m => typeof m.Herald.connect)')
        assert kind == "function"
        await page.screenshot(path=screenshot_path("smoke-index"))
        assert watch.errors == [], watch.messages
    finally:
        await context.close()
