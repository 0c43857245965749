"""The backend publisher helpers without anything to publish to: they fail
clearly (publishing through NATS and a node: tests/nats/test_publishers.py)."""

from __future__ import annotations

import pytest

from broker import BrokerUnavailable
from broker.embedded import free_port
from broker.publisher import NatsPublisher
from gateway.client import HttpPublisher, PublishRefused

from ..helpers import PUBLISH_KEY


async def test_nats_publisher_without_nats_fails_clearly() -> None:
    pub = NatsPublisher([f"nats://127.0.0.1:{free_port()}"], attempts=2, backoff=0.01, timeout=1.0)
    with pytest.raises(BrokerUnavailable, match="cannot connect"):
        await pub.connect()
    await pub.close()


async def test_http_publisher_gives_up_after_its_attempts() -> None:
    async with HttpPublisher(f"http://127.0.0.1:{free_port()}", PUBLISH_KEY, attempts=3, backoff=0.01) as pub:
        with pytest.raises(PublishRefused) as down:
            await pub.publish("room:lobby", 1)
    assert down.value.error == "unavailable"


def test_dev_tokens_need_a_secret() -> None:
    from gateway.settings import ConfigError, load_settings

    with pytest.raises(ConfigError, match=r"http\.dev_tokens"):
        load_settings(env={"HERALD_HTTP_DEV_TOKENS": "true"}, use_default_file=False)
