"""Browser helpers: Debian's chromium driven by playwright's async API.

No browser is ever downloaded: ``make browser-deps`` installs Debian's
``chromium`` and :func:`launch_chromium` points playwright at it. The async API
is the only one usable here, since the nodes under test run in the test's own
event loop (pytest-aiohttp, function-scoped loops).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from playwright.async_api import Browser, ConsoleMessage, Error, Page, async_playwright

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

CHROMIUM = os.environ.get("HERALD_CHROMIUM", "/usr/bin/chromium")

# Headless comes from playwright itself. Without the background-networking
# flags chromium tries to reach Google's services, which this machine refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

ARTIFACTS = Path(os.environ.get("HERALD_ARTIFACTS", Path(__file__).resolve().parent.parent / "artifacts"))


@asynccontextmanager
async def launch_chromium(bfcache: bool = False) -> AsyncIterator[Browser]:
    """A headless chromium (Debian's, at :data:`CHROMIUM`), closed on exit. Playwright turns the
    back-forward cache off; ``bfcache=True`` leaves it on, as in a user's browser."""
    if not os.access(CHROMIUM, os.X_OK):
        raise RuntimeError(f"{CHROMIUM} is not executable: run `make browser-deps` (or set HERALD_CHROMIUM)")
    keep_on = ["--disable-back-forward-cache"] if bfcache else []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, ignore_default_args=keep_on
        )
        try:
            yield browser
        finally:
            await browser.close()


class ConsoleWatch:
    """Records a page's console errors and uncaught exceptions; a test asserts ``watch.errors == []``.

    Errors whose source URL ends with one of ``ignore`` (by default the
    favicon the browser asks for by itself) are kept in ``messages`` only.
    """

    def __init__(self, page: Page, ignore: tuple[str, ...] = ("/favicon.ico",)) -> None:
        self.ignore = ignore
        self.errors: list[str] = []
        self.messages: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", self._on_pageerror)

    def _on_console(self, msg: ConsoleMessage) -> None:
        self.messages.append(f"{msg.type}: {msg.text}")
        url = msg.location.get("url", "")
        if msg.type == "error" and not url.endswith(self.ignore):
            self.errors.append(f"console: {msg.text} ({url})")

    def _on_pageerror(self, error: Error) -> None:
        self.errors.append(f"pageerror: {error.name}: {error.message}")


def screenshot_path(name: str) -> Path:
    """``artifacts/browser/NAME.png`` (the folder is made)."""
    folder = ARTIFACTS / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.png"
