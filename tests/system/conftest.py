"""Fixtures of the system tier: Debian's chromium through playwright; a client session for many streams."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from playwright.async_api import Browser

from ..browser import launch_chromium


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's headless chromium through playwright's async API (same loop as the nodes), closed afterwards."""
    async with launch_chromium() as launched:
        yield launched


@pytest.fixture
async def many() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session without the default 100-connection cap (SSE streams hold theirs)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session
