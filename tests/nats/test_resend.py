"""A read through the reply inbox that nobody answers is asked again each
RESEND_AFTER seconds (broker/inbox.py ``ReplyInbox.resend``), and so is a KV
write (it expects a revision: a repeat of one stored is refused): a
stream's leader that steps down or dies drops what was asked of it, and the
next one answers the repeat. Against a real nats-server, with a responder of
our own that ignores the first ask, and a stream that appears late."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.msg import Msg
from nats.js.api import StorageType

import broker.inbox
from broker import BrokerUnavailable
from broker.acks import AckedPublisher
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
    monkeypatch.setattr(broker.inbox, "RESEND_AFTER", 0.2)
    asks: list[bytes] = []
    # A subject of its own: one whose listener just left and another came
    # may still answer "no responders" (seen 3 times in 30 on one server).
    subject = f"lookup.{uuid.uuid4().hex}"
    responder = await answering_from_the_second(nats_server.url, subject, asks)
    try:
        began = asyncio.get_running_loop().time()
        data, _ = await ask(link.replies, subject, b"q", 3.0, resend=True)
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
    monkeypatch.setattr(broker.inbox, "RESEND_AFTER", 0.2)
    asks: list[bytes] = []
    subject = f"lookup.{uuid.uuid4().hex}"
    responder = await answering_from_the_second(nats_server.url, subject, asks)
    try:
        with pytest.raises(BrokerUnavailable, match="did not answer in time"):
            await ask(link.replies, subject, b"q", 0.8)
        assert asks == [b"q"]
    finally:
        await responder.close()


@pytest.mark.parametrize("resend", [True, False])
async def test_a_resent_write_waits_out_no_responders(
    link: NatsLink, monkeypatch: pytest.MonkeyPatch, resend: bool
) -> None:
    """ "No responders" (503) while the stream's subjects have no listener (its
    leader moving): a resent write waits for its next send; another fails at once."""
    monkeypatch.setattr(broker.inbox, "RESEND_AFTER", 0.2)
    assert link.js is not None
    stream = f"LATE{uuid.uuid4().hex[:8]}"  # made after the first sends
    publisher = AckedPublisher(link, stream, 3.0, resend=resend)
    write = (f"{stream}.k", b"v", {"Nats-Expected-Last-Subject-Sequence": "0"})
    writing = asyncio.create_task(publisher.publish([write]))
    await asyncio.sleep(0.3)  # one send and a repeat met no stream
    if not resend:
        with pytest.raises(BrokerUnavailable, match="no stream answered"):
            await writing
        return
    assert not writing.done()
    await link.js.add_stream(name=stream, subjects=[f"{stream}.>"], storage=StorageType.MEMORY)
    (published,) = await writing
    assert published.seq == 1
    assert (await link.js.get_last_msg(stream, f"{stream}.k")).data == b"v"


async def test_each_unanswered_read_is_resent_until_it_gives_up(
    link: NatsLink, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One timer resends them all, each on its own schedule, and none after its request ended."""
    monkeypatch.setattr(broker.inbox, "RESEND_AFTER", 0.2)
    silent = await nats.connect(nats_server.url)
    asks: list[bytes] = []

    async def note(msg: Msg) -> None:
        asks.append(msg.data)

    subject = f"lookup.{uuid.uuid4().hex}"
    await silent.subscribe(subject, cb=note)
    await silent.flush()
    try:
        short = ask(link.replies, subject, b"short", 0.5, resend=True)
        long = ask(link.replies, subject, b"long", 1.5, resend=True)
        results = await asyncio.gather(short, long, return_exceptions=True)
        assert all(isinstance(r, BrokerUnavailable) for r in results)
        await asyncio.sleep(0.5)
        assert 2 <= asks.count(b"short") <= 3  # at 0, 0.2, 0.4 s
        assert 6 <= asks.count(b"long") <= 8  # every 0.2 s over 1.5 s
        assert link.replies._resends == {}
    finally:
        await silent.close()
