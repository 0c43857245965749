"""Where a channel's live flow starts, and a reconnect during a gap repair:
every stored message after a connection's welcome position reaches it, in
order, or a reset says it could not (docs/protocol.md 3.2, 7.2)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import aiohttp

from broker import BrokerUnavailable

from ..helpers import RunningNode, recv_json, token, wait_for
from .test_gap_repair import (  # noqa: F401 - proxy: the fixture
    Dropper,
    a_repair_held,
    cluster,
    ids,
    nats_broker,
    open_ws,
    proxy,
    publish,
    wants,
)


async def drain(ws: aiohttp.ClientWebSocketResponse, quiet_for: float = 0.5) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    with contextlib.suppress(TimeoutError):
        while True:
            frames.append(await recv_json(ws, quiet_for))
    return frames


async def test_the_first_live_message_of_a_channel_new_here_lost_is_fetched_back(
    node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """The node starts holding room:lobby; its first live message is lost at
    the NATS level (the Dropper); the next one says which came before it,
    past the welcome's position: that one is fetched back, in order."""
    node: RunningNode = await node_factory()
    ws = await open_ws(http, node, "alice", ["lobby"])
    await wants(node, 3)
    dropper = Dropper(node)
    dropper.wrap("room:lobby")
    dropper.dropping.add("room:lobby")
    missed = await publish(http, node, "room:lobby", {"i": 1})
    await wait_for(lambda: dropper.dropped.get("room:lobby", 0) == 1)
    dropper.dropping.clear()
    last = await publish(http, node, "room:lobby", {"i": 2})
    frames = await drain(ws)
    got = [int(f["id"]) for f in frames if f["type"] == "message"]
    resets = [f for f in frames if f["type"] == "reset"]
    assert got == [missed, last] and not resets, frames
    await ws.close()


async def test_a_message_stored_right_after_the_position_comes_live(
    node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """The welcome's position is read once the rooms are live: a message
    stored right after that read is delivered (before, the read came ahead
    of the subscription and such a message was skipped for good)."""
    node: RunningNode = await node_factory()
    resumer = node.node.resumer
    history = resumer._history
    real_position = history.position
    injected: list[int] = []

    class PositionThenPublish:
        def __getattr__(self, name: str) -> Any:
            return getattr(history, name)

        async def position(self, max_age: float = 0.0) -> int:
            p = await real_position(max_age)
            if not injected:  # published after the position, before the join
                injected.append(await publish(http, node, "room:lobby", {"between": True}))
            return p

    resumer._history = PositionThenPublish()
    ws = await http.ws_connect(node.ws_url, params=[("token", token("alice")), ("room", "lobby")])
    welcome = await recv_json(ws)
    assert welcome["type"] == "welcome", welcome
    position = int(welcome["position"])
    assert injected and injected[0] > position
    after = await publish(http, node, "room:lobby", {"after": True})
    frames = await drain(ws)
    got = [int(f["id"]) for f in frames if f["type"] == "message"]
    resets = [f for f in frames if f["type"] == "reset"]
    assert got == [injected[0], after] and not resets, (position, frames)
    await ws.close()


async def test_a_reconnect_during_a_gap_repair_loses_nothing_stored_while_away(
    proxy: Any,  # noqa: F811 - the fixture, imported above
    node_factory: Callable[..., Any],
    http: aiohttp.ClientSession,
) -> None:
    """A gap repair is slow (its fetch held), the node's NATS connection drops
    and comes back: what was stored while it was away still reaches the
    client (the catch-up no longer takes the old backlog's start for live)."""
    shared = cluster("memory")
    publisher: RunningNode = await node_factory(**shared)
    node: RunningNode = await node_factory(nats_url=proxy.url, nats={"reconnect_wait": 0.1}, **shared)
    ws = await open_ws(http, node, "alice", ["ra", "rd"])
    await wants(node, 4)
    broker = nats_broker(node)
    first = [await publish(http, publisher, "room:ra", 0), await publish(http, publisher, "room:rd", 0)]
    assert ids(await recv_n(ws, 2)) == first

    missed, trigger, go = await a_repair_held(http, node, publisher, "room:ra")

    proxy.cut()
    await wait_for(lambda: not broker.connected)
    away = [await publish(http, publisher, "room:rd", {"away": i}) for i in range(2)]
    proxy.restore()
    await wait_for(lambda: broker.ready, timeout=10)
    await asyncio.sleep(0.3)
    go.set()
    frames = await drain(ws, 1.0)
    got = [int(f["id"]) for f in frames if f["type"] == "message"]
    resets = [f["channel"] for f in frames if f["type"] == "reset"]
    assert missed in got and trigger in got, frames
    assert all(a in got for a in away) and "room:rd" not in resets, (away, frames)
    await ws.close()


async def recv_n(ws: aiohttp.ClientWebSocketResponse, n: int) -> list[dict[str, Any]]:
    return [await recv_json(ws) for _ in range(n)]


async def test_a_loss_found_during_a_replay_is_told_after_the_live_messages_held_before_it(
    node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """A resume's replay holds the session's live flow; a live message of
    another channel is held, then that channel's gap cannot be repaired. The
    reset takes its place in the live flow: after the message held before the
    loss, before the one that revealed it (before, it went out at once, ahead
    of the older message, which a client then took for one after the reset)."""
    node: RunningNode = await node_factory()
    ws = await open_ws(http, node, "alice", ["lobby"])
    await wants(node, 3)
    first = await publish(http, node, "room:lobby", 0)
    assert ids([await recv_json(ws)]) == [first]

    resumer = node.node.resumer
    history = resumer._history
    go = asyncio.Event()

    class HeldReplay:
        def __getattr__(self, name: str) -> Any:
            return getattr(history, name)

        async def replay(self, *args: Any, **kwargs: Any) -> Any:
            await go.wait()
            return await history.replay(*args, **kwargs)

    resumer._history = HeldReplay()
    await ws.send_json({"type": "subscribe", "room": "other", "since": str(first), "ref": "r"})
    (session,) = node.node.sessions.of_user("alice")
    await wait_for(lambda: session.held is not None)
    held = await publish(http, node, "room:lobby", 1)  # held: the replay runs

    sequencer = nats_broker(node).pubsub.sequencer
    sequencer._retry_wait = 0.01

    async def unreachable(channels: Any, after: int, limit: int) -> Any:
        raise BrokerUnavailable("stream unreachable (test)")

    sequencer._fetch = unreachable
    dropper = Dropper(node)
    dropper.wrap("room:lobby")
    dropper.dropping.add("room:lobby")
    await publish(http, node, "room:lobby", 2)  # lost
    await wait_for(lambda: dropper.dropped.get("room:lobby", 0) == 1)
    dropper.dropping.clear()
    revealing = await publish(http, node, "room:lobby", 3)
    await wait_for(lambda: any(getattr(d, "seq", 0) == revealing for d in session.held or ()))
    go.set()
    frames = [f for f in await drain(ws) if f["type"] != "ack"]
    assert [f.get("id", f["type"]) for f in frames] == [str(held), "reset", str(revealing)], frames
    assert frames[1]["channel"] == "room:lobby"
    await ws.close()
