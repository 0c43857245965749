from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest

from broker.embedded import NatsServer, free_port
from gateway.node import BrokerFactory

from .helpers import RunningNode, make_settings, start_node


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One real nats-server with JetStream for the session; tests isolate
    themselves by subject prefix and stream name."""
    server = NatsServer(store_dir=str(tmp_path_factory.mktemp("jetstream")), monitor_port=free_port())
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
async def node_factory(nats_server: NatsServer) -> AsyncIterator[Callable[..., Any]]:
    """``await node_factory(ws={...}, ...)`` starts a node on a free port."""
    running: list[RunningNode] = []

    async def make(
        broker_factory: BrokerFactory | None = None, nats_url: str | None = None, **sections: dict[str, Any]
    ) -> RunningNode:
        settings = make_settings(nats_url or nats_server.url, **sections)
        node = await start_node(settings, broker_factory)
        running.append(node)
        return node

    yield make
    for node in reversed(running):
        await node.stop()


@pytest.fixture
async def node(node_factory: Callable[..., Any]) -> RunningNode:
    return await node_factory()  # type: ignore[no-any-return]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
