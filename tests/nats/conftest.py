"""Fixtures of the NATS tier's tests of the broker's lean requests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker.dispatch import DispatchingClient
from broker.embedded import NatsServer
from broker.link import NatsLink


async def connected_link(url: str, **options: Any) -> NatsLink:
    link = NatsLink()
    nc = DispatchingClient()
    await nc.connect(url, **options)
    link.nc = nc
    link.js = nc.jetstream(timeout=2.0)
    await link.replies.subscribe()
    return link


@pytest.fixture
async def link(nats_server: NatsServer) -> AsyncIterator[NatsLink]:
    link = await connected_link(nats_server.url)
    yield link
    assert link.nc is not None
    await link.nc.close()
