"""A node that cannot reach NATS at all fails its start quickly with a message
naming the URL (NATS going away and coming back: tests/nats/test_nats_outage.py)."""

from __future__ import annotations

import time

import pytest

from broker import BrokerUnavailable
from broker.embedded import free_port

from ..helpers import make_settings, start_node


async def test_unreachable_nats_fails_start_within_connect_timeout() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    settings = make_settings(url, nats={"connect_timeout": 1.0})
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as info:
        await start_node(settings)
    elapsed = time.monotonic() - started
    assert elapsed < 2.5, f"start took {elapsed:.1f}s with connect_timeout=1"
    assert url in str(info.value)
