"""The reply inbox (broker/inbox.py): its client without a wait
(``current``), and what its answers show the server has read."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from broker.dispatch import DispatchingClient
from broker.inbox import ReplyInbox


class FakeClient:
    def __init__(self) -> None:
        self.is_reconnecting = False
        self.subscribed: list[str] = []

    def new_inbox(self) -> str:
        return "_INBOX.x"

    async def subscribe_direct(self, subject: str, callback: Any) -> None:
        self.subscribed.append(subject)


async def test_current_is_the_subscribed_client_else_none() -> None:
    first, second = FakeClient(), FakeClient()
    connected = first
    inbox = ReplyInbox(lambda: cast(DispatchingClient, connected))
    assert inbox.current() is None  # not subscribed yet: ready() subscribes
    assert await inbox.ready() is first and first.subscribed == ["_INBOX.x.*"]
    assert inbox.current() is first
    connected = second  # a new client (NATS connected again): its inbox must be subscribed
    assert inbox.current() is None
    first.is_reconnecting = True
    connected = first
    assert inbox.current(buffered=True) is first  # requests wait in its buffer (see ready)
    assert await inbox.ready() is first


async def test_what_an_answer_shows_was_read() -> None:
    """Request n's answer shows the server read what was queued before n was
    made (ReplyInbox.seen), not what was queued after."""
    inbox = ReplyInbox(lambda: cast(DispatchingClient, FakeClient()))
    inbox._prefix, inbox._cut = b"_INBOX.x", len(b"_INBOX.x.")
    got: list[bytes] = []
    loop = asyncio.get_running_loop()
    early = inbox.add(lambda data, headers: got.append(data), loop.create_future())
    mark = inbox.mark()  # a SUB queued now
    assert not inbox.seen(mark)
    inbox._on_reply(early, b"1", None)  # asked before the SUB: tells nothing of it
    assert got == [b"1"] and not inbox.seen(mark)
    later = inbox.add(lambda data, headers: got.append(data), loop.create_future())
    inbox._on_reply(later, b"2", None)
    assert inbox.seen(mark)
    mark = inbox.mark()
    ping = inbox.number()  # a PING sent after that SUB
    after_ping = inbox.mark()  # a SUB queued after the PING
    inbox.answered(ping)
    assert inbox.seen(mark) and not inbox.seen(after_ping)
    inbox._on_reply(b"_INBOX.x.999", b"", None)  # gave up or never asked: ignored
    assert not inbox.seen(after_ping)
