"""Fixtures of the system tier: Debian's chromium through playwright."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser

from ..browser import launch_chromium


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's headless chromium through playwright's async API (same loop as the nodes), closed afterwards."""
    async with launch_chromium() as launched:
        yield launched
