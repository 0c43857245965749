"""The browser tests: one chromium per test process, shared by its browser tests.

Starting playwright's driver and chromium costs about 3 s and 1.4 s of CPU;
once per test it was a third of the whole suite's CPU. Playwright's objects
belong to the event loop they were made in, so the tests here run in one loop
per process (their async fixtures too: those below are the common ones, made
in that loop). Each test gets the browser with no page open, and what it
opened is closed after it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from playwright.async_api import Browser

from broker.embedded import NatsServer

from ...browser import launch_chromium
from ...helpers import NodeFactory, RunningNode, node_maker

HERE = Path(__file__).resolve().parent
SHARED_LOOP = pytest.mark.asyncio(loop_scope="session")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(SHARED_LOOP, append=False)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def chromium() -> AsyncIterator[Browser]:
    async with launch_chromium() as launched:
        yield launched


@pytest_asyncio.fixture(loop_scope="session")
async def browser(chromium: Browser) -> AsyncIterator[Browser]:
    """Debian's headless chromium, through playwright's async API; the contexts a test opens are closed after it."""
    yield chromium
    for context in chromium.contexts:
        await context.close()


@pytest_asyncio.fixture(loop_scope="session")
async def node_factory(nats_server: NatsServer) -> AsyncIterator[NodeFactory]:
    async with node_maker(nats_server.url) as make:
        yield make


@pytest_asyncio.fixture(loop_scope="session")
async def node(node_factory: NodeFactory) -> RunningNode:
    return await node_factory()


@pytest_asyncio.fixture(loop_scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
