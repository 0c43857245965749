"""Retention settings and the stream they shape (docs/protocol.md 7.1, 10.1;
config/herald.toml [history], [stream], [publish]): an operator changing them,
nodes of one cluster that disagree, on a real nats-server."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import nats
import pytest

from broker.embedded import NatsServer

from ..helpers import make_settings, start_node, wait_for


async def per_subject(url: str, stream: str) -> int:
    nc = await nats.connect(url)
    try:
        return int((await nc.jetstream().stream_info(stream)).config.max_msgs_per_subject or 0)
    finally:
        await nc.close()


async def test_a_reconnect_does_not_set_back_the_limits_another_node_set(
    own_nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A rolling change of [history]: the node started with the new limits
    sets them; one still on the old ones must not set its own back whenever
    its NATS connection blips (evicting what the new ones keep, or keeping
    what they drop), only when it is restarted (with the new settings)."""
    tag = uuid.uuid4().hex[:8]
    shared: dict[str, Any] = {"subject": {"prefix": f"ret{tag}"}, "stream": {"name": f"RET{tag}", "storage": "file"}}
    stream = shared["stream"]["name"]
    old = await start_node(make_settings(own_nats.url, **shared))
    try:
        assert await per_subject(own_nats.url, stream) == 1001
        caplog.set_level(logging.WARNING, "herald.broker")
        new = await start_node(make_settings(own_nats.url, **shared, history={"user_max": 10, "room_max": 10}))
        await new.stop()
        assert await per_subject(own_nats.url, stream) == 11
        assert "max_msgs_per_subject changed from 1001 to 11" in caplog.text
        broker = old.node.broker
        own_nats.stop()
        await wait_for(lambda: not broker.ready, timeout=10)
        own_nats.start()
        await wait_for(lambda: broker.ready, timeout=15)
        assert await per_subject(own_nats.url, stream) == 11
    finally:
        await old.stop()
