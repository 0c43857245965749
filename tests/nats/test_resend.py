"""A read through the reply inbox that nobody answers is asked again each
RESEND_AFTER seconds (broker/inbox.py ``ReplyInbox.resend``), and so is a KV
write (it expects a revision: a repeat of one stored is refused) and a
publish with a message id (a repeat of one stored is not stored): a
stream's leader that steps down or dies drops what was asked of it, and the
next one answers the repeat. Against a real nats-server, with a responder of
our own that ignores the first ask, and a stream that appears late."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats
import nats.errors
import pytest
from nats.aio.msg import Msg
from nats.js.api import StorageType

import broker.inbox
from broker import BrokerUnavailable
from broker.acks import AckedPublisher
from broker.channels import Subjects
from broker.embedded import NatsServer
from broker.jetstream import NatsBroker, NatsConfig
from broker.link import NatsLink
from broker.lookup import ask

from ..helpers import broker_events


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker.inbox, "RESEND_AFTER", 0.2)


@dataclass
class Listener:
    """A subject of our own, every ask that reached it, and from which ask on it answers (0: none)."""

    subject: str
    asks: list[bytes]
    answer_from: int = 2


@pytest.fixture
async def listener(link: NatsLink, nats_server: NatsServer) -> AsyncIterator[Listener]:
    """A listener on another connection, heard by the link's before the test
    starts: a subscription just made and flushed was now and then answered
    "no responders" all the same (3 times in 30 asks)."""
    found = Listener(f"lookup.{uuid.uuid4().hex}", [])
    nc = await nats.connect(nats_server.url)

    async def on_ask(msg: Msg) -> None:
        if msg.data == b"probe":
            await msg.respond(b"here")
            return
        found.asks.append(msg.data)
        if found.answer_from and len(found.asks) >= found.answer_from:
            await msg.respond(b"answer %d" % len(found.asks))

    await nc.subscribe(found.subject, cb=on_ask)
    assert link.nc is not None
    for _ in range(50):
        try:
            await link.nc.request(found.subject, b"probe", timeout=1.0)
            break
        except nats.errors.NoRespondersError:
            await asyncio.sleep(0.05)
    yield found
    await nc.close()


async def test_a_read_left_unanswered_is_asked_again_and_the_repeat_answered(
    link: NatsLink, quick: None, listener: Listener
) -> None:
    began = asyncio.get_running_loop().time()
    data, _ = await ask(link.replies, listener.subject, b"q", 3.0, resend=True)
    waited = asyncio.get_running_loop().time() - began
    assert (data, listener.asks) == (b"answer 2", [b"q", b"q"])
    assert 0.2 <= waited < 1.0
    await asyncio.sleep(0.5)
    assert len(listener.asks) == 2  # answered: asked no more


async def test_without_resend_one_ask_waits_out_its_timeout(link: NatsLink, quick: None, listener: Listener) -> None:
    """Writes are not asked twice (a publish without a message id would be stored twice)."""
    with pytest.raises(BrokerUnavailable, match="did not answer in time"):
        await ask(link.replies, listener.subject, b"q", 0.8)
    assert listener.asks == [b"q"]


KV_WRITE = {"Nats-Expected-Last-Subject-Sequence": "0"}  # a repeat of one stored is refused
KEYED = {"Nats-Msg-Id": "k1"}  # an Idempotency-Key: a repeat of one stored is acked, not stored


@pytest.mark.parametrize(
    ("headers", "options", "resent"),
    [
        (KV_WRITE, {"resend": True}, True),
        (KV_WRITE, {}, False),
        (KEYED, {"keyed_resend": True}, True),
        (KEYED, {}, False),  # the stream's duplicate window may end before the timeout
        (None, {"keyed_resend": True}, False),  # a repeat would be stored twice
    ],
    ids=["kv-write", "kv-write-not-resent", "keyed-publish", "keyed-outside-the-window", "unkeyed-publish"],
)
async def test_a_resent_write_waits_out_no_responders(
    link: NatsLink, quick: None, headers: dict[str, str] | None, options: dict[str, bool], resent: bool
) -> None:
    """ "No responders" (503) while the stream's subjects have no listener (its
    leader moving): a write whose repeat changes nothing — a KV write, a
    publish with a message id — is sent again and waits for its next send,
    then is stored once; another fails at once."""
    assert link.js is not None
    stream = f"LATE{uuid.uuid4().hex[:8]}"  # made after the first sends
    publisher = AckedPublisher(link, stream, 3.0, **options)
    writing = asyncio.create_task(publisher.publish([(f"{stream}.k", b"v", headers)]))
    await asyncio.sleep(0.3)  # one send and a repeat met no stream
    if not resent:
        with pytest.raises(BrokerUnavailable, match="no stream answered"):
            await writing
        return
    assert not writing.done()
    await link.js.add_stream(name=stream, subjects=[f"{stream}.>"], storage=StorageType.MEMORY)
    (published,) = await writing
    assert published.seq == 1
    await asyncio.sleep(0.5)  # repeats still going out would not be stored, but asked no more
    assert (await link.js.stream_info(stream)).state.messages == 1
    assert (await link.js.get_last_msg(stream, f"{stream}.k")).data == b"v"
    assert link.replies._resends == {}


async def test_each_unanswered_read_is_resent_until_it_gives_up(
    link: NatsLink, quick: None, listener: Listener
) -> None:
    """One timer resends them all, each on its own schedule, and none after its request ended."""
    listener.answer_from = 0
    short = ask(link.replies, listener.subject, b"short", 0.5, resend=True)
    long = ask(link.replies, listener.subject, b"long", 1.5, resend=True)
    results = await asyncio.gather(short, long, return_exceptions=True)
    assert all(isinstance(r, BrokerUnavailable) for r in results)
    await asyncio.sleep(0.5)
    assert 2 <= listener.asks.count(b"short") <= 3  # at 0, 0.2, 0.4 s
    assert 6 <= listener.asks.count(b"long") <= 8  # every 0.2 s over 1.5 s
    assert link.replies._resends == {}


@pytest.mark.parametrize(("dedup_window", "resent"), [(120.0, True), (5.0, False), (3.0, False)])
def test_keyed_publishes_are_resent_only_within_the_duplicate_window(dedup_window: float, resent: bool) -> None:
    """A repeat sent after the stream forgot the id would be stored twice."""
    config = NatsConfig(subjects=Subjects("kw", "kw_live"), publish_timeout=5.0, dedup_window=dedup_window)
    node = NatsBroker(config, broker_events())
    assert node.pubsub._acks._keyed_resend is resent
