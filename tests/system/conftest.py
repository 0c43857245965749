"""Fixtures of the system tier: a client session for many streams (chromium: browser/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest


@pytest.fixture
async def many() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session without the default 100-connection cap (SSE streams hold theirs)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session
