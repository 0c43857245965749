"""The Python client (gateway.client.HeraldClient) against real nodes: it
receives its rooms, its user channel and broadcast, its commands are
answered, refusals raise, and when its node goes away it moves to the next
URL and resumes with nothing lost or repeated. The close-code rules in
detail: tests/unit/test_client.py; a SIGKILLed node: tests/system/test_client_failover.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from broker.embedded import free_port
from gateway.client import (
    CommandError,
    CommandTimeout,
    Event,
    HeraldClient,
    Message,
    Reset,
    Stopped,
    Subscribed,
    Unsubscribed,
    Welcome,
)

from ..helpers import ADMIN_KEY, PUBLISH_HEADERS, NodeFactory, RunningNode, api_publish, token, wait_for
from ..relay import Relay


def shared_cluster(**sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Sections that put every node started with them in one cluster."""
    tag = "cl" + uuid.uuid4().hex[:10]
    return {"subject": {"prefix": tag}, "stream": {"name": tag.upper(), "storage": "memory"}, **sections}


async def take(client: HeraldClient, n: int, timeout: float = 5.0) -> list[Message]:
    got: list[Message] = []
    async with asyncio.timeout(timeout):
        async for message in client:
            got.append(message)
            if len(got) == n:
                break
    return got


async def test_receives_rooms_user_and_broadcast_and_commands_answer(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    user = "u" + uuid.uuid4().hex[:8]
    tok = token(user, rooms=["lobby", "side"], publish=["lobby"])
    async with HeraldClient(node.url, token=tok, rooms=["lobby"]) as client:
        await client.ping()  # connected: what is published now reaches it
        assert client.welcome is not None and client.welcome.user == user
        assert client.welcome.channels == ("user", "broadcast", "room:lobby")
        ids = [
            await api_publish(http, node, "room:lobby", {"n": 1}),
            await api_publish(http, node, "room:side", {"n": 2}),  # not subscribed
            await api_publish(http, node, f"user:{user}", {"n": 3}),
            await api_publish(http, node, "broadcast", {"n": 4}),
        ]
        got = await take(client, 3)
        assert got == [
            Message("room:lobby", ids[0], "message", {"n": 1}),
            Message("user", ids[2], "message", {"n": 3}),
            Message("broadcast", ids[3], "message", {"n": 4}),
        ]
        assert client.position == ids[3]

        stored = await client.publish("lobby", {"text": "hi"}, event="chat")
        assert stored is not None and stored.isdigit()
        assert await client.publish("lobby", {"typing": True}, event="typing", ephemeral=True) is None
        assert await take(client, 2) == [
            Message("room:lobby", stored, "chat", {"text": "hi"}, sender=user),
            Message("room:lobby", None, "typing", {"typing": True}, sender=user),
        ]
        assert await client.presence("lobby") == [user]
        assert await client.read(ids[2]) == ids[2]

        await client.subscribe("side", since=ids[0])  # the room's stored messages after ids[0] first
        assert client.rooms == ("lobby", "side")
        assert await take(client, 1) == [Message("room:side", ids[1], "message", {"n": 2})]
        await client.unsubscribe("lobby")
        assert client.rooms == ("side",)
        await api_publish(http, node, "room:lobby", {"n": 5})
        last = await api_publish(http, node, "room:side", {"n": 6})
        assert await take(client, 1) == [Message("room:side", last, "message", {"n": 6})]


async def test_refusals_raise_command_error_and_a_forbidden_room_stops(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    tok = token("carol", rooms=["lobby"], publish=[])
    async with HeraldClient(node.url, token=tok, rooms=["lobby"]) as client:
        with pytest.raises(CommandError) as refused:
            await client.subscribe("secret")
        assert refused.value.code == "forbidden" and "secret" in refused.value.message
        assert client.rooms == ("lobby",)  # a reconnect does not ask for it (it would be 4003)
        with pytest.raises(CommandError) as refused:
            await client.publish("lobby", 1)
        assert refused.value.code == "forbidden"
        with pytest.raises(CommandError) as refused:
            await client.read("not-an-id")
        assert refused.value.code == "bad_request"
        await client.ping()  # still connected

    async with HeraldClient(node.url, token=tok, rooms=["secret"], min_delay=0.01) as client:
        with pytest.raises(Stopped) as stopped:
            await take(client, 1)
        assert stopped.value.code == 4003 and "secret" in stopped.value.reason


async def test_a_refused_token_asks_get_token_once(node: RunningNode, http: aiohttp.ClientSession) -> None:
    asked: list[str] = []

    def get_token() -> str:
        asked.append("x")
        return token("dave", rooms=["lobby"])

    expired = token("dave", rooms=["lobby"], ttl=-60)
    async with HeraldClient(node.url, token=expired, get_token=get_token, rooms=["lobby"]) as client:
        await client.ping()
        assert len(asked) == 1

    async with HeraldClient(node.url, get_token=lambda: expired, rooms=["lobby"], min_delay=0.01) as client:
        with pytest.raises(Stopped) as stopped:
            await client.ping()
        assert stopped.value.code == 4001 and stopped.value.reason == "token expired"


async def test_moves_to_the_next_url_when_its_node_drains_and_loses_nothing(
    node_factory: NodeFactory, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Node a drains (1012, "reconnect in <ms> ms") while messages go on being
    published through node b: the client waits the hinted delay, reconnects to
    b with its last id, and ends with every message once, in order."""
    caplog.set_level(logging.INFO, logger="herald.client")
    shared = shared_cluster(http={"reconnect_spread": 0.8, "shutdown_grace": 2.0})
    a, b = await node_factory(**shared), await node_factory(**shared)
    user = "u" + uuid.uuid4().hex[:8]
    channels = {"room:lobby": "room:lobby", f"user:{user}": "user", "broadcast": "broadcast"}
    sent: dict[str, list[str]] = {name: [] for name in channels.values()}
    got: dict[str, list[str]] = {name: [] for name in channels.values()}
    total = 90

    async def publish() -> None:
        for i in range(total):
            channel = list(channels)[i % 3]
            sent[channels[channel]].append(await api_publish(http, b, channel, {"i": i}))
            if i == 30:
                asyncio.create_task(a.stop())  # noqa: RUF006 - awaited by node_factory at the end
            await asyncio.sleep(0.01)

    async with HeraldClient([a.url, b.url], token=token(user), rooms=["lobby"], min_delay=0.05) as client:
        await client.ping()
        assert client.welcome is not None and client.welcome.node == a.settings.node.id

        async def receive() -> None:
            async for message in client:
                assert message.id is not None
                got[message.channel].append(message.id)
                if sum(map(len, got.values())) == total:
                    return

        receiving = asyncio.create_task(receive())
        await publish()
        await asyncio.wait_for(receiving, 15)
        assert client.welcome.node == b.settings.node.id
    assert got == sent  # every one, once, in order per channel

    ended = next(r for r in caplog.records if "ended (1012" in r.getMessage())
    hint = re.search(r"reconnect in (\d+) ms", ended.getMessage())
    assert hint is not None, ended.getMessage()
    reconnected = next(r for r in caplog.records if r.created > ended.created and "connected to" in r.getMessage())
    assert reconnected.created - ended.created >= int(hint[1]) / 1000 - 0.01


async def test_commands_made_while_reconnecting_wait_for_the_connection(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    shared = shared_cluster(http={"reconnect_spread": 0.0})
    a, b = await node_factory(**shared), await node_factory(**shared)
    async with HeraldClient([a.url, b.url], token=token("erin"), min_delay=0.2, max_delay=0.2) as client:
        await client.ping()
        # Watched while a drains: by the time its stop returns, the client may be on b already.
        stopping = asyncio.create_task(a.stop())
        await wait_for(lambda: not client.connected, timeout=5)
        await client.ping()  # sent once the client is on b
        await stopping
        assert client.welcome is not None and client.welcome.node == b.settings.node.id


async def admin(http: aiohttp.ClientSession, node: RunningNode, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(node.url + path, json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
        doc: dict[str, Any] = await resp.json()
        assert resp.status == 200, doc
        return doc


async def test_history_pages_and_the_welcome_position(node: RunningNode, http: aiohttp.ClientSession) -> None:
    user = "u" + uuid.uuid4().hex[:8]
    ids = [await api_publish(http, node, "room:lobby", {"n": n}) for n in range(3)]
    note = await api_publish(http, node, f"user:{user}", {"n": "note"})
    async with HeraldClient(node.url, token=token(user), rooms=["lobby"]) as client:
        await client.ping()
        assert client.welcome is not None and client.welcome.position == note
        assert await client.history(room="lobby", limit=2) == [
            Message("room:lobby", ids[1], "message", {"n": 1}),
            Message("room:lobby", ids[2], "message", {"n": 2}),
        ]
        assert [m.id for m in await client.history(channel="room:lobby", before=ids[1])] == [ids[0]]
        assert await client.history(channel="user") == [Message("user", note, "message", {"n": "note"})]
        with pytest.raises(CommandError) as refused:
            await client.history(channel="user:someone-else")
        assert refused.value.code == "forbidden"
        # The inbox replays the unread note (an id below the position): the position moves to it.
        assert await take(client, 1) == [Message("user", note, "message", {"n": "note"})]


async def test_resumes_from_the_welcome_position_when_nothing_came(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    shared = shared_cluster(http={"reconnect_spread": 0.0}, history={"inbox": False})
    a, b = await node_factory(**shared), await node_factory(**shared)
    async with HeraldClient([a.url, b.url], token=token("frank"), rooms=["lobby"], min_delay=0.3) as client:
        await client.ping()
        assert client.welcome is not None and client.position == client.welcome.position is not None
        await a.stop()  # 1012 without a hint: the client waits up to a second
        ids = [await api_publish(http, b, "room:lobby", {"n": n}) for n in range(3)]
        assert [m.id for m in await take(client, 3)] == ids  # published while it was away, or after


async def test_rooms_the_backend_joins_survive_a_reconnect_and_disconnects_are_obeyed(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    shared = shared_cluster(http={"reconnect_spread": 0.2})
    a, b = await node_factory(**shared), await node_factory(**shared)
    user = "u" + uuid.uuid4().hex[:8]
    async with HeraldClient([a.url, b.url], token=token(user, rooms=["lobby", "project-*"]), min_delay=0.05) as client:
        await client.ping()
        assert (await admin(http, a, "/api/subscribe", {"user": user, "room": "project-9"}))["subscribed"] == 1
        events = client.events()
        assert isinstance(await anext(events), Welcome)
        assert await anext(events) == Subscribed("project-9")
        first = await api_publish(http, b, "room:project-9", {"n": 1})
        assert await anext(events) == Message("room:project-9", first, "message", {"n": 1})
        assert client.rooms == ("project-9",)

        await a.stop()  # to node b, which re-joins project-9 from the last id
        missed = await api_publish(http, b, "room:project-9", {"n": 2})
        welcome = await anext(events)
        assert isinstance(welcome, Welcome) and welcome.node == b.settings.node.id
        assert await anext(events) == Message("room:project-9", missed, "message", {"n": 2})

        assert (await admin(http, b, "/api/unsubscribe", {"user": user, "room": "project-9"}))["unsubscribed"] == 1
        assert await anext(events) == Unsubscribed("project-9")
        assert client.rooms == ()

        assert (await admin(http, b, "/api/disconnect", {"user": user}))["disconnected"] == 1
        again = await anext(events)  # 4009: it comes back
        assert isinstance(again, Welcome) and again.conn != welcome.conn
        assert (await admin(http, b, "/api/disconnect", {"user": user, "reconnect": False}))["disconnected"] == 1
        with pytest.raises(Stopped) as stopped:
            await anext(events)
        assert stopped.value.code == 4403


async def _batch(http: aiohttp.ClientSession, node: RunningNode, items: list[dict[str, Any]]) -> list[str]:
    async with http.post(node.url + "/api/publish", json=items, headers=PUBLISH_HEADERS) as resp:
        assert resp.status == 200
        return [str(i) for i in (await resp.json())["ids"]]


async def test_a_granted_room_s_rejoin_cut_short_asks_from_the_same_position_again(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """The client is in project-9 only through the backend; away, it misses
    one message there and 600 broadcasts. Its resume is cut (4009) while the
    broadcasts come, before project-9's re-join is answered: the next
    connection must still ask for project-9 from where the first resumed
    (its own position has moved past the missed message by then)."""
    port = free_port()
    shared = shared_cluster(history={"room_max": 5000})
    a = await node_factory(**{**shared, "http": {"reconnect_spread": 0.0, "port": port}})
    b = await node_factory(**shared)
    user = "u" + uuid.uuid4().hex[:6]
    async with HeraldClient(
        a.url, token=token(user, rooms=["project-*"]), buffer=4, min_delay=0.05, max_delay=0.1
    ) as client:
        await client.ping()
        assert (await admin(http, b, "/api/subscribe", {"user": user, "room": "project-9"}))["subscribed"] == 1
        events = client.events()
        assert isinstance(await anext(events), Welcome)
        assert await anext(events) == Subscribed("project-9")
        await a.stop()  # the client is away
        await wait_for(lambda: not client.connected)
        missed = await api_publish(http, b, "room:project-9", {"n": "missed"})
        for _ in range(3):
            await _batch(http, b, [{"channel": "broadcast", "data": {"pad": "x" * 4000}} for _ in range(200)])
        await node_factory(**{**shared, "http": {"reconnect_spread": 0.0, "port": port}})  # back on its port
        got: list[Message] = []
        welcomes = 0
        async with asyncio.timeout(15):
            async for event in events:
                if isinstance(event, Welcome):
                    welcomes += 1
                elif isinstance(event, Message):
                    got.append(event)
                    if len(got) == 3 and welcomes == 1:  # the resume under way: cut it (4009, reconnect)
                        assert (await admin(http, b, "/api/disconnect", {"user": user}))["disconnected"] == 1
                    if len(got) == 601:
                        break
        assert client.rooms == ("project-9",) and welcomes == 2
        assert len([m for m in got if m.channel == "broadcast"]) == 600  # every broadcast, once
        assert [m.id for m in got if m.channel == "room:project-9"] == [missed]


async def test_subscribe_since_on_a_busy_room_gets_its_replay(node: RunningNode, http: aiohttp.ClientSession) -> None:
    """``subscribe(room, since)`` on a room the client is in while messages
    keep coming: live ones that arrive before the replay must not make the
    client drop the replay as repeats."""
    user = "u" + uuid.uuid4().hex[:6]
    async with HeraldClient(node.url, token=token(user, rooms=["lobby"]), rooms=["lobby"]) as client:
        await client.ping()
        ids = await _batch(http, node, [{"channel": "room:lobby", "data": {"i": i}} for i in range(20)])
        got: list[str | None] = []

        async def consume() -> None:
            async for m in client:
                got.append(m.id)

        consuming = asyncio.create_task(consume())
        busy = True

        async def pump() -> None:
            while busy:
                await api_publish(http, node, "room:lobby", {"live": 1})

        pumps = [asyncio.create_task(pump()) for _ in range(4)]
        await wait_for(lambda: len(got) >= 25)
        mark = len(got)
        await client.subscribe("lobby", since=ids[4])
        busy = False
        await asyncio.gather(*pumps)
        await asyncio.sleep(0.5)
        consuming.cancel()
        after = got[mark:]
        assert all(after.count(i) == 1 for i in ids[5:]), (client._feed.duplicates, after[:10])  # once each


async def test_a_reset_of_the_same_stream_does_not_hand_messages_out_twice(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """The client is in lobby (it keeps 2 messages) and, through the backend,
    in proj. Away, it misses P1 (proj), then L1, L2, L3 (lobby). Reconnect 1:
    a reset of lobby (L1 is gone), L2, L3; proj's re-join replays P1, so the
    position moves back to P1 (§7.1: the last id received). Reconnect 2
    (4009) from P1: a reset of lobby again, L2 and L3 again. Every reset used
    to start the channel's repeat check over, so L2 and L3 were handed out
    twice; the stream was not recreated (the position is below the welcome's)."""
    port = free_port()
    shared = shared_cluster(rooms={"history": ("lobby=2/3600",)})
    a = await node_factory(**{**shared, "http": {"reconnect_spread": 0.0, "port": port}})
    b = await node_factory(**{**shared, "http": {"reconnect_spread": 0.0}})
    user = "u" + uuid.uuid4().hex[:8]
    async with HeraldClient(
        a.url, token=token(user, rooms=["*"]), rooms=["lobby"], min_delay=0.05, max_delay=0.1
    ) as client:
        await client.ping()
        events = client.events()
        assert isinstance(await anext(events), Welcome)
        await admin(http, b, "/api/subscribe", {"user": user, "room": "proj"})
        assert await anext(events) == Subscribed("proj")
        await a.stop()
        await wait_for(lambda: not client.connected)
        p1 = await api_publish(http, b, "room:proj", {"p": 1})
        lobby = [await api_publish(http, b, "room:lobby", {"l": i}) for i in (1, 2, 3)]
        await node_factory(**{**shared, "http": {"reconnect_spread": 0.0, "port": port}})  # back on its port
        got: list[Event] = []
        async with asyncio.timeout(10):
            while not got or getattr(got[-1], "id", None) != p1:  # reconnect 1 done: P1 replayed
                got.append(await anext(events))
        assert client.position == p1
        await admin(http, b, "/api/disconnect", {"user": user})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                async for event in events:
                    got.append(event)
    assert sum(isinstance(e, Welcome) for e in got) == 2
    assert [e.id for e in got if isinstance(e, Message) and e.channel == "room:lobby"] == lobby[1:]
    assert sum(isinstance(e, Reset) for e in got) == 2


async def test_subscribe_since_past_the_streams_end_loses_no_live_message(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    """``subscribe(room, since)`` from a position past the stream's end (the
    app kept it across a stream restore): the node resets the room (§7.2) and
    carries on. The client used to drop every live message of the room below
    that ``since`` until the subscribe was answered: lost, with no reset
    after them."""
    user = "u" + uuid.uuid4().hex[:6]
    async with HeraldClient(node.url, token=token(user, rooms=["lobby"]), rooms=["lobby"]) as client:
        await client.ping()
        received: list[str | None] = []
        resets: list[Reset] = []
        consuming = asyncio.create_task(_consume(client, received, resets))
        sent: list[str] = []
        busy = True

        async def pump() -> None:
            while busy:
                sent.append(await api_publish(http, node, "room:lobby", {"live": 1}))

        pumps = [asyncio.create_task(pump()) for _ in range(3)]
        await wait_for(lambda: len(received) >= 10)
        for _ in range(5):
            await client.subscribe("lobby", since="999999999999")
        busy = False
        await asyncio.gather(*pumps)
        await wait_for(lambda: set(sent) <= set(received))
        consuming.cancel()
        assert len(resets) == 5 and len(received) == len(set(received))


async def _consume(client: HeraldClient, received: list[str | None], resets: list[Reset]) -> None:
    async for event in client.events():
        if isinstance(event, Message):
            received.append(event.id)
        elif isinstance(event, Reset):
            resets.append(event)


# --- the room set after answers that come late: it ends as the node's ------------------------------------


def rooms_on_node(node: RunningNode, user: str) -> tuple[str, ...]:
    """The rooms the user's one connection on ``node`` is in, sorted."""
    (session,) = node.node.sessions.of_user(user)
    return tuple(sorted(c.removeprefix("room:") for c in session.channels if c.startswith("room:")))


@pytest.mark.parametrize("command", ["subscribe", "unsubscribe"])
async def test_an_answer_takes_effect_before_the_frame_after_it(
    command: str, node: RunningNode, http: aiohttp.ClientSession
) -> None:
    """The application's subscribe(x) (unsubscribe(x)) is answered, then the
    backend takes the connection out of x (joins it to x): the ack and the
    ``unsubscribed`` (``subscribed``) frame are read back to back, the
    reader having been held up by a full buffer. The ack's effect on the
    room set waited for the caller's task, which ran after the reader had
    handled the next frame too: the set ended opposite to the node's."""
    user = "u" + uuid.uuid4().hex[:8]
    start = ["x"] if command == "unsubscribe" else []
    async with HeraldClient(node.url, token=token(user, rooms=["*"]), rooms=start, buffer=1) as client:
        await client.ping()
        for n in range(2):  # the first fills the buffer, the second holds the reader up
            await api_publish(http, node, f"user:{user}", {"n": n})
        await wait_for(lambda: len(client._feed) == 1)
        call = asyncio.create_task(getattr(client, command)("x"))
        await wait_for(lambda: ("x" in rooms_on_node(node, user)) == (command == "subscribe"))
        backend = "/api/unsubscribe" if command == "subscribe" else "/api/subscribe"
        done = await admin(http, node, backend, {"user": user, "room": "x"})
        assert done[backend.removeprefix("/api/") + "d"] == 1
        held = rooms_on_node(node, user)
        events = client.events()
        async with asyncio.timeout(5):
            while not isinstance(await anext(events), Subscribed | Unsubscribed):
                pass
        await call
        assert client.rooms == held, f"client: {client.rooms}, node: {held}"


async def rooms_after_a_reconnect(
    client: HeraldClient, http: aiohttp.ClientSession, node: RunningNode, user: str
) -> tuple[str, ...]:
    """Cut the connection (4009): the rooms the next one is in once welcomed and re-joined, sorted."""
    welcomes = [client.welcome]
    assert (await admin(http, node, "/api/disconnect", {"user": user}))["disconnected"] == 1
    await wait_for(lambda: client.connected and client.welcome not in welcomes, timeout=5)
    await client.ping()  # re-joins sent at the welcome are answered before it
    return rooms_on_node(node, user)


@pytest.mark.parametrize("last", ["acked", "too_many_subscriptions", "rate_limited"])
async def test_a_subscribe_answered_after_an_unsubscribe_does_not_put_the_room_back(
    last: str, node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """subscribe(x), unsubscribe(x), subscribe(y), subscribe(x), sent without
    waiting: the node runs them in order, so the room set must end as the
    node's, whatever the last subscribe's answer. The first subscribe's ack,
    answered after the unsubscribe was sent, used to put x back when the
    last one was refused (another subscribe of x under way was counted as
    its own): the client believed it was in x, and every reconnect joined it."""
    limits: dict[str, Any] = {"rate_window": 60.0}
    if last == "too_many_subscriptions":
        limits["max_subscriptions"] = 1  # y takes the one place: x is refused
    elif last == "rate_limited":
        limits["command_rate"] = 4  # the ping and three commands: the last is refused
    node = await node_factory(limits=limits)
    user = "u" + uuid.uuid4().hex[:8]
    async with HeraldClient(node.url, token=token(user, rooms=["*"]), min_delay=0.05) as client:
        await client.ping()
        calls = [client.subscribe("x"), client.unsubscribe("x"), client.subscribe("y"), client.subscribe("x")]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        codes = [a.code if isinstance(a, CommandError) else "acked" for a in answers]
        assert codes == ["acked", "acked", "acked", last]
        held = ("x", "y") if last == "acked" else ("y",)
        assert rooms_on_node(node, user) == held
        assert tuple(sorted(client.rooms)) == held, f"client: {client.rooms}, node: {held}"
        assert await rooms_after_a_reconnect(client, http, node, user) == held


async def test_an_unsubscribe_the_node_refuses_keeps_the_room(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """An unsubscribe refused ``rate_limited`` was not run (docs/protocol.md
    §11.2): the connection is still in the room, its messages keep coming.
    The client used to drop the room all the same, asked for or joined by
    the backend: it believed it was out of a room it was in, and the next
    reconnect left it though the application had been told it could not."""
    node = await node_factory(limits={"command_rate": 3, "rate_window": 60.0})
    user = "u" + uuid.uuid4().hex[:8]
    async with HeraldClient(node.url, token=token(user, rooms=["*"]), rooms=["lobby"], min_delay=0.05) as client:
        await client.ping()
        assert (await admin(http, node, "/api/subscribe", {"user": user, "room": "p9"}))["subscribed"] == 1
        await wait_for(lambda: "p9" in client.rooms)
        await client.ping()
        await client.ping()  # the budget is spent
        for room in ("lobby", "p9"):
            with pytest.raises(CommandError) as refused:
                await client.unsubscribe(room)
            assert refused.value.code == "rate_limited"
        assert rooms_on_node(node, user) == ("lobby", "p9")
        assert client.rooms == ("lobby", "p9"), f"client: {client.rooms}, node: ('lobby', 'p9')"
        assert await rooms_after_a_reconnect(client, http, node, user) == ("lobby", "p9")


@pytest.mark.parametrize("command", ["subscribe", "unsubscribe"])
async def test_an_answer_after_the_timeout_still_sets_the_room_set(
    command: str, node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """subscribe(x) (unsubscribe(x), refused ``rate_limited``) times out on
    the client's side, the reader held up by a full buffer; its answer is
    read afterwards. The client stopped listening at the timeout: the node
    held x and the client did not count itself in it (counted itself out
    of it), and the next reconnect did not join it (left it)."""
    node = await node_factory(limits={"command_rate": 2, "rate_window": 60.0})  # two pings, then refusals
    user = "u" + uuid.uuid4().hex[:8]
    start = ["x"] if command == "unsubscribe" else []
    async with HeraldClient(node.url, token=token(user, rooms=["*"]), rooms=start, buffer=1, timeout=1.0) as client:
        await client.ping()
        if command == "unsubscribe":
            await client.ping()  # the budget is spent: the unsubscribe is refused, not run
        for n in range(2):  # the first fills the buffer, the second holds the reader up
            await api_publish(http, node, f"user:{user}", {"n": n})
        await wait_for(lambda: len(client._feed) == 1)
        with pytest.raises(CommandTimeout):
            await getattr(client, command)("x")
        assert rooms_on_node(node, user) == ("x",)
        events = client.events()
        assert isinstance(await anext(events), Welcome)
        for _ in range(2):  # the reader goes on: the late answer comes
            assert isinstance(await anext(events), Message)
        with contextlib.suppress(CommandError):  # rate_limited, once the budget is spent: answered all the same
            await client.ping()
        assert client.rooms == ("x",), f"client: {client.rooms}, node: ('x',)"
        assert await rooms_after_a_reconnect(client, http, node, user) == ("x",)


async def test_a_replay_read_after_its_subscribe_timed_out_still_comes(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    """subscribe(lobby, since) asks again for lobby's messages the client
    had; it times out on the client's side (the reader held up by a full
    buffer), and the replay and the ack are read afterwards. The repeat
    filter let the replay through only until the timeout: the messages it
    brought after it were dropped as repeats, though the node sent them."""
    user = "u" + uuid.uuid4().hex[:8]
    async with HeraldClient(
        node.url, token=token(user, rooms=["lobby"]), rooms=["lobby"], buffer=1, timeout=1.0
    ) as client:
        await client.ping()
        events = client.events()
        assert isinstance(await anext(events), Welcome)
        ids = await _batch(http, node, [{"channel": "room:lobby", "data": {"i": i}} for i in range(5)])
        assert [(await anext(events)).id for _ in ids] == ids  # type: ignore[attr-defined]
        for n in range(2):  # the first fills the buffer, the second holds the reader up
            await api_publish(http, node, f"user:{user}", {"n": n})
        await wait_for(lambda: len(client._feed) == 1)
        with pytest.raises(CommandTimeout):
            await client.subscribe("lobby", since=ids[0])
        got: list[Event] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                async for event in events:
                    got.append(event)
        replayed = [e.id for e in got if isinstance(e, Message) and e.channel == "room:lobby"]
        assert replayed == ids[1:], f"{client._feed.duplicates} dropped as repeats"


@pytest.mark.parametrize("y", ["y", "user"])
async def test_a_refresh_answered_after_the_timeout_still_sets_the_rooms_and_token(
    y: str, node: RunningNode, http: aiohttp.ClientSession
) -> None:
    """refresh(a token allowing x only) times out on the client's side (the
    reader held up by a full buffer); the node left y and its ack is read
    afterwards. The client ignored the late ack: it kept y in its room set
    and the old token, so the next connection joined y again. (A room named
    like a channel, ``user``, was kept by the ack's ``user`` channel.)"""
    user = "u" + uuid.uuid4().hex[:8]
    async with HeraldClient(
        node.url, token=token(user, rooms=["x", y]), rooms=["x", y], buffer=1, timeout=1.0
    ) as client:
        await client.ping()
        for n in range(2):  # the first fills the buffer, the second holds the reader up
            await api_publish(http, node, f"user:{user}", {"n": n})
        await wait_for(lambda: len(client._feed) == 1)
        narrower = token(user, rooms=["x"], ttl=600)
        with pytest.raises(CommandTimeout):
            await client.refresh(narrower)
        assert rooms_on_node(node, user) == ("x",)
        events = client.events()
        assert isinstance(await anext(events), Welcome)
        for _ in range(2):  # the reader goes on: the late answer comes
            assert isinstance(await anext(events), Message)
        await client.ping()
        assert client.rooms == ("x",), f"client: {client.rooms}, node: ('x',)"
        assert client._token == narrower
        assert await rooms_after_a_reconnect(client, http, node, user) == ("x",)


async def test_rooms_past_the_request_line_limit_join_after_the_welcome(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    """70 rooms of 120 characters (within limits.max_subscriptions): ~9 KB of `room=`, over the node's
    request line (8190 bytes, 414 — it was 400 —: read as 4000, which stopped the client) and nginx's (8 KB, 414)."""
    rooms = [str(i).rjust(120, "r") for i in range(70)]
    user = "u" + uuid.uuid4().hex[:8]
    async with HeraldClient(node.url, token=token(user), rooms=rooms, min_delay=0.05) as client:
        await client.ping()
        session = node.node.sessions.of_user(user)[0]
        await wait_for(lambda: {f"room:{r}" for r in rooms} <= session.channels)
        assert set(client.rooms) == set(rooms)
        sent = await api_publish(http, node, f"room:{rooms[-1]}", {"n": 1})
        assert [m.id for m in await take(client, 1)] == [sent]
        assert (await admin(http, node, "/api/disconnect", {"user": user}))["disconnected"] == 1
        await wait_for(lambda: node.node.sessions.of_user(user) and node.node.sessions.of_user(user)[0] is not session)
        again = node.node.sessions.of_user(user)[0]
        await wait_for(lambda: {f"room:{r}" for r in rooms} <= again.channels)
        after = await api_publish(http, node, f"room:{rooms[-1]}", {"n": 2})
        assert [m.id for m in await take(client, 1)] == [after]


async def test_an_upgrade_refused_by_a_proxy_stops_on_a_lasting_4xx_and_retries_a_5xx(node: RunningNode) -> None:
    """Statuses the node does not send (docs/protocol.md 8): a proxy's 414 (a URL too long) would come
    again on every retry, so the client stops as on 4000 (it used to retry for ever); a 502 is retried,
    and the next URL, a node, is reached."""

    def answering(status: bytes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 %b\r\nContent-Type: text/html\r\nContent-Length: 5\r\n\r\n<p/>\n" % status)
            await writer.drain()
            writer.close()

        return proxy

    too_long = await asyncio.start_server(answering(b"414 Request-URI Too Large"), "127.0.0.1", 0)
    bad_gateway = await asyncio.start_server(answering(b"502 Bad Gateway"), "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{too_long.sockets[0].getsockname()[1]}"
        async with HeraldClient(url, token=token("uri"), min_delay=0.01) as client:
            with pytest.raises(Stopped) as stopped:
                await asyncio.wait_for(take(client, 1), 5)
            assert stopped.value.code == 4000 and "414" in stopped.value.reason
        url = f"http://127.0.0.1:{bad_gateway.sockets[0].getsockname()[1]}"
        async with HeraldClient([url, node.url], token=token("gw"), min_delay=0.01) as client:
            await asyncio.wait_for(client.ping(), 5)
            assert client.welcome is not None
    finally:
        too_long.close()
        bad_gateway.close()


async def test_an_upgrade_nobody_answers_is_given_up_for_the_next_url(node: RunningNode) -> None:
    """A server that takes the connection and answers nothing (a frozen node; behind nginx, /ws waits an
    hour for it): the client gives it `timeout` seconds, then moves to the next URL."""
    held: list[asyncio.StreamWriter] = []

    async def frozen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    stall = await asyncio.start_server(frozen, "127.0.0.1", 0)
    stalled = f"http://127.0.0.1:{stall.sockets[0].getsockname()[1]}"
    try:
        async with HeraldClient([stalled, node.url], token=token("tess"), timeout=1.0, min_delay=0.05) as client:
            await wait_for(lambda: client.connected, timeout=5)
            assert held and client.welcome is not None
            conn = client.welcome.conn
            await asyncio.sleep(2.5)  # an open connection may stay quiet longer than that
            assert client.connected and client.welcome.conn == conn
    finally:
        for writer in held:
            writer.close()
        stall.close()


async def test_a_half_open_connection_is_given_up_and_resumed(node: RunningNode, http: aiohttp.ClientSession) -> None:
    """A network switch leaves the socket without a FIN (a relay that stops forwarding): the client's
    heartbeat gives it up within ``heartbeat`` * 1.5 and resumes on a new connection, losing nothing."""
    relay = Relay(node.runner.addresses[0][1])
    await relay.start()
    user = "u" + uuid.uuid4().hex[:8]
    try:
        async with HeraldClient(
            relay.url, token=token(user), rooms=["lobby"], heartbeat=0.5, timeout=2.0, min_delay=0.05, max_delay=0.2
        ) as client:
            await client.ping()
            first = client.welcome
            relay.freeze()
            sent = [await api_publish(http, node, "room:lobby", {"n": n}) for n in range(3)]
            got = await take(client, 3, timeout=4.0)
            assert [m.id for m in got] == sent
            assert client.welcome is not None and first is not None and client.welcome.conn != first.conn
    finally:
        await relay.stop()


async def test_a_half_open_connection_does_not_lock_its_user_out(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    """One connection per user (refuse-new) and no node heartbeat to find the frozen one dead: the
    reconnect names the connection it gave up (replaces=), is admitted at once, and the node closes
    the old one. Without it, every reconnect was refused 4029 while the old one lived on."""
    node = await node_factory(ws={"heartbeat": 0}, limits={"max_connections_per_user": 1})
    relay = Relay(node.runner.addresses[0][1])
    await relay.start()
    user = "u" + uuid.uuid4().hex[:8]
    try:
        async with HeraldClient(
            relay.url, token=token(user), rooms=["lobby"], heartbeat=0.5, timeout=2.0, min_delay=0.05, max_delay=0.2
        ) as client:
            await client.ping()
            first = client.welcome
            assert first is not None
            relay.freeze()
            sent = await api_publish(http, node, "room:lobby", {"n": 1})
            assert [m.id for m in await take(client, 1, timeout=4.0)] == [sent]
            assert client.welcome is not None and client.welcome.conn != first.conn
            await wait_for(lambda: node.node.sessions.get(first.conn) is None, timeout=5)
            assert len(node.node.sessions.of_user(user)) == 1
    finally:
        await relay.stop()
