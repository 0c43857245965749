"""The backend publisher helpers without anything to publish to: they fail
clearly; HttpPublisher against a scripted answer on loopback (publishing
through NATS and a node: tests/nats/test_publishers.py)."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web

from broker import BrokerUnavailable
from broker.embedded import free_port
from broker.publisher import NatsPublisher
from gateway.client import HttpPublisher, PublishRefused
from gateway.client.publisher import retry_after

from ..helpers import PUBLISH_KEY, make_settings


async def test_nats_publisher_without_nats_fails_clearly() -> None:
    pub = NatsPublisher([f"nats://127.0.0.1:{free_port()}"], attempts=2, backoff=0.01, timeout=0.5)
    with pytest.raises(BrokerUnavailable, match="cannot connect"):
        await pub.connect()
    await pub.close()


async def test_http_publisher_gives_up_after_its_attempts() -> None:
    async with HttpPublisher(f"http://127.0.0.1:{free_port()}", PUBLISH_KEY, attempts=3, backoff=0.01) as pub:
        with pytest.raises(PublishRefused) as down:
            await pub.publish("room:lobby", 1)
    assert down.value.error == "unavailable"


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after("2.5") == 2.5
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # past: at once
    assert [retry_after(v) for v in (None, "", "soon", "nan", "-3")] == [1.0, 1.0, 1.0, 1.0, 0.0]


async def test_http_publisher_retries_a_429_whose_retry_after_is_an_http_date() -> None:
    """RFC 9110 allows Retry-After as an HTTP-date (what a proxy in front of
    the nodes may send). The publisher raised a bare ValueError on it."""
    hits: list[int] = []

    async def publish(request: web.Request) -> web.Response:
        hits.append(1)
        if len(hits) == 1:
            headers = {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}
            return web.json_response({"error": "rate_limited", "message": "slow down"}, status=429, headers=headers)
        return web.json_response({"id": "42"})

    app = web.Application()
    app.router.add_post("/api/publish", publish)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with HttpPublisher(f"http://127.0.0.1:{port}", PUBLISH_KEY, backoff=0.01) as pub:
            assert await pub.publish("room:lobby", 1) == "42"
    finally:
        await runner.cleanup()
    assert len(hits) == 2


def test_dev_tokens_need_a_secret() -> None:
    from gateway.settings import ConfigError, load_settings

    with pytest.raises(ConfigError, match=r"http\.dev_tokens"):
        load_settings(env={"HERALD_HTTP_DEV_TOKENS": "true"}, use_default_file=False)


@pytest.mark.parametrize(
    ("host", "warned"), [("0.0.0.0", True), ("::", True), ("127.0.0.1", False), ("::1", False), ("localhost", False)]
)
def test_dev_tokens_off_loopback_are_warned_about(host: str, warned: bool, caplog: pytest.LogCaptureFixture) -> None:
    """POST /api/dev/token signs anyone in as anyone: fine on herald dev's
    127.0.0.1, worth a warning where other machines reach the node."""
    from gateway.app import create_app

    from ..memory_broker import MemoryBroker

    create_app(make_settings(http={"dev_tokens": True, "host": host}), MemoryBroker)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("http.dev_tokens" in w and "any user" in w for w in warnings) == warned, warnings
