"""A read through the reply inbox that nobody answers is asked again each
RESEND_AFTER seconds (broker/lookup.py ``ask``): a stream's leader that steps
down or dies drops what was asked of it, and the next one answers the
repeat. Against a real nats-server, with a responder of our own that ignores
the first ask."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.msg import Msg

import broker.lookup
from broker import BrokerUnavailable
from broker.embedded import NatsServer
from broker.link import NatsLink
from broker.lookup import ask

from .test_lean_requests import connected_link


@pytest.fixture
async def link(nats_server: NatsServer) -> AsyncIterator[NatsLink]:
    link = await connected_link(nats_server.url)
    yield link
    assert link.nc is not None
    await link.nc.close()


async def answering_from_the_second(url: str, subject: str, asks: list[bytes]) -> nats.NATS:
    """A responder on ``subject`` that notes every ask and answers all but the first."""
    nc = await nats.connect(url)

    async def on_ask(msg: Msg) -> None:
        asks.append(msg.data)
        if len(asks) > 1:
            await msg.respond(b"answer %d" % len(asks))

    await nc.subscribe(subject, cb=on_ask)
    await nc.flush()
    return nc


async def test_a_read_left_unanswered_is_asked_again_and_the_repeat_answered(
    link: NatsLink, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker.lookup, "RESEND_AFTER", 0.2)
    asks: list[bytes] = []
    responder = await answering_from_the_second(nats_server.url, "lookup.test", asks)
    try:
        began = asyncio.get_running_loop().time()
        data, _ = await ask(link.replies, "lookup.test", b"q", 3.0, resend=True)
        waited = asyncio.get_running_loop().time() - began
        assert (data, asks) == (b"answer 2", [b"q", b"q"])
        assert 0.2 <= waited < 1.0
        await asyncio.sleep(0.5)
        assert len(asks) == 2  # answered: asked no more
    finally:
        await responder.close()


async def test_without_resend_one_ask_waits_out_its_timeout(
    link: NatsLink, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes are not asked twice (a publish without a message id would be stored twice)."""
    monkeypatch.setattr(broker.lookup, "RESEND_AFTER", 0.2)
    asks: list[bytes] = []
    responder = await answering_from_the_second(nats_server.url, "lookup.test", asks)
    try:
        with pytest.raises(BrokerUnavailable, match="did not answer in time"):
            await ask(link.replies, "lookup.test", b"q", 0.8)
        assert asks == [b"q"]
    finally:
        await responder.close()
