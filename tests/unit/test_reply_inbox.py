"""The reply inbox's client without a wait (broker/inbox.py ``current``):
what ``ready`` would return, or None when ``ready`` has work to do."""

from __future__ import annotations

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
