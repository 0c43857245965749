"""Offline delivery and read state (README: Resume, resets and the inbox):
messages to a user channel are kept; a connection that opens without a resume
position first gets its user's messages after the user's read position
(``welcome.unread`` counts them), then the live flow; ``read {id}`` moves that
position forward only, cluster-wide (NATS KV)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import nats
import orjson
import pytest
from nats.aio.msg import Msg

from broker.embedded import NatsServer
from broker.jetstream import NatsBroker
from broker.kv import key_token
from broker.readmark import decode, encode

from ..helpers import (
    RunningNode,
    SseClient,
    make_settings,
    recv_json,
    start_node,
    token,
)
from ..helpers import (
    api_publish as publish,
)


def cluster() -> dict[str, dict[str, Any]]:
    """Settings sections shared by the nodes of one test-private cluster."""
    tag = uuid.uuid4().hex[:10]
    return {"subject": {"prefix": f"inbox{tag}"}, "stream": {"name": f"INBOX{tag.upper()}", "storage": "memory"}}


async def publish_many(http: aiohttp.ClientSession, node: RunningNode, channel: str, n: int) -> list[str]:
    return [await publish(http, node, channel, {"n": i}) for i in range(n)]


async def connect(
    http: aiohttp.ClientSession, node: RunningNode, user: str, **query: str
) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    ws = await http.ws_connect(node.ws_url, params={"token": token(user), **query})
    welcome = await recv_json(ws)
    assert welcome["type"] == "welcome", welcome
    return ws, welcome


async def quiet(ws: aiohttp.ClientWebSocketResponse, seconds: float = 0.3) -> None:
    try:
        frame = await recv_json(ws, seconds)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected frame {frame}")


async def messages(ws: aiohttp.ClientWebSocketResponse, n: int) -> list[dict[str, Any]]:
    frames = [await recv_json(ws) for _ in range(n)]
    assert all(f["type"] == "message" for f in frames), frames
    return frames


async def read(ws: aiohttp.ClientWebSocketResponse, seq: Any, ref: Any = "r") -> dict[str, Any]:
    await ws.send_json({"type": "read", "id": seq, "ref": ref})
    frame = await recv_json(ws)
    assert frame.get("ref") == ref, frame
    return frame


# -- the inbox -----------------------------------------------------------------------


async def test_offline_user_gets_reset_then_newest_user_max_then_unread_after_read(
    node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    node: RunningNode = await node_factory()  # history.user_max: the default, 50
    assert node.settings.history.user_max == 50
    ids = await publish_many(http, node, "user:dave", 60)
    await publish(http, node, "user:someone_else", "not dave's")
    await publish(http, node, "room:lobby", "not joined")

    ws, welcome = await connect(http, node, "dave")
    assert welcome["unread"] == 50
    reset = await recv_json(ws)
    assert reset["type"] == "reset" and reset["channel"] == "user", reset
    frames = await messages(ws, 50)
    assert [f["id"] for f in frames] == ids[10:]
    assert all(f["channel"] == "user" for f in frames)
    assert [f["data"] for f in frames] == [{"n": i} for i in range(10, 60)]
    await quiet(ws)
    # Then live.
    live = await publish(http, node, "user:dave", "live")
    assert (await recv_json(ws))["id"] == live
    ids.append(live)

    assert await read(ws, ids[54], ref="r1") == {"type": "ack", "ref": "r1", "id": ids[54]}
    await ws.close()

    ws, welcome = await connect(http, node, "dave")
    assert welcome["unread"] == 6
    frames = await messages(ws, 6)  # no reset: nothing after the position was lost
    assert [f["id"] for f in frames] == ids[55:]
    await quiet(ws)
    # Read up to the newest: nothing unread any more.
    assert (await read(ws, int(ids[-1]), ref=7)) == {"type": "ack", "ref": 7, "id": ids[-1]}
    await ws.close()
    ws, welcome = await connect(http, node, "dave")
    assert welcome["unread"] == 0
    await quiet(ws)
    await ws.close()


async def test_small_user_max_and_rooms_start_live(
    node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    node: RunningNode = await node_factory(history={"user_max": 3})
    ids = await publish_many(http, node, "user:gus", 5)
    await publish(http, node, "room:lobby", "before: not part of the inbox")
    ws, welcome = await connect(http, node, "gus", room="lobby")
    assert welcome["unread"] == 3
    assert welcome["channels"] == ["user", "broadcast", "room:lobby"]
    reset = await recv_json(ws)
    assert (reset["type"], reset["channel"]) == ("reset", "user")
    assert [f["id"] for f in await messages(ws, 3)] == ids[2:]
    await quiet(ws)
    live = await publish(http, node, "room:lobby", "live")
    assert (await recv_json(ws))["id"] == live
    await ws.close()


async def test_read_is_forward_only(node_factory: Callable[..., Any], http: aiohttp.ClientSession) -> None:
    node: RunningNode = await node_factory()
    ids = await publish_many(http, node, "user:hana", 4)
    ws, welcome = await connect(http, node, "hana")
    assert welcome["unread"] == 4
    await messages(ws, 4)
    assert (await read(ws, ids[2]))["id"] == ids[2]
    # A lower id answers with the stored position, which stays.
    assert await read(ws, ids[0], ref="back") == {"type": "ack", "ref": "back", "id": ids[2]}
    assert await read(ws, "0", ref="zero") == {"type": "ack", "ref": "zero", "id": ids[2]}
    assert await node.node.broker.reads.position("hana") == int(ids[2])
    await ws.close()
    ws, welcome = await connect(http, node, "hana")
    assert welcome["unread"] == 1
    assert [f["id"] for f in await messages(ws, 1)] == ids[3:]
    await ws.close()


@pytest.mark.parametrize(
    "bad",
    ["abc", "-1", -1, 1.5, "1.5", "", " 1", "1e3", None, True, [1], {"id": 1}, "1" * 21, 2**63, str(2**63)],
)
async def test_read_with_bad_id_is_bad_request(
    bad: Any, node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    node: RunningNode = await node_factory()
    ws, _ = await connect(http, node, "ivan")
    frame = await read(ws, bad, ref="bad")
    assert frame["type"] == "error" and frame["code"] == "bad_request", frame
    assert frame["message"]
    # The connection goes on, and the position was not touched.
    await ws.send_json({"type": "read", "ref": "missing"})
    frame = await recv_json(ws)
    assert (frame["type"], frame["code"], frame["ref"]) == ("error", "bad_request", "missing")
    assert await node.node.broker.reads.position("ivan") == 0
    await ws.close()


async def test_racing_reads_never_move_the_position_back(
    node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    shared = cluster()
    node_a: RunningNode = await node_factory(**shared)
    node_b: RunningNode = await node_factory(**shared)
    ids = await publish_many(http, node_a, "user:jo", 20)
    one, _ = await connect(http, node_a, "jo")  # two tabs, on two nodes
    two, _ = await connect(http, node_b, "jo")
    await messages(one, 20)
    await messages(two, 20)
    up = [int(i) for i in ids]
    down = up[::-1]

    async def send_all(ws: aiohttp.ClientWebSocketResponse, seqs: list[int]) -> list[tuple[int, int]]:
        for n, seq in enumerate(seqs):
            await ws.send_json({"type": "read", "id": str(seq), "ref": n})
        frames = [await recv_json(ws) for _ in seqs]
        assert sorted(f["ref"] for f in frames) == list(range(len(seqs)))
        assert all(f["type"] == "ack" for f in frames), frames  # contention is not an error
        return [(seqs[f["ref"]], int(f["id"])) for f in frames]

    acks_one, acks_two = await asyncio.gather(send_all(one, up), send_all(two, down))
    for acks in (acks_one, acks_two):
        stored = [position for _, position in acks]
        assert stored == sorted(stored), f"acks on one connection went backwards: {stored}"
        assert all(position >= asked for asked, position in acks)
    assert acks_one[-1][1] == up[-1]  # ascending: its last read is the highest
    for node in (node_a, node_b):
        assert await node.node.broker.reads.position("jo") == up[-1]
    # Lower reads now answer with the stored maximum.
    assert (await read(two, ids[0], ref="low"))["id"] == ids[-1]
    for ws in (one, two):
        await ws.close()
    ws, welcome = await connect(http, node_b, "jo")
    assert welcome["unread"] == 0
    await quiet(ws)
    await ws.close()


async def test_whitebox_read_succeeds_while_other_tabs_keep_reading(
    node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    node: RunningNode = await node_factory()
    ids = await publish_many(http, node, "user:uma", 30)
    ws, _ = await connect(http, node, "uma")
    await messages(ws, 30)
    assert (await read(ws, ids[0]))["id"] == ids[0]
    broker = node.node.broker
    assert isinstance(broker, NatsBroker)
    reads = broker.reads
    real_kv = reads._kv
    assert real_kv is not None

    class OtherTabs:
        """Between this node's look at the position and its write, another tab
        moves the position one message forward (a legitimate, lower read) —
        12 times, then the others are done."""

        def __init__(self) -> None:
            self.moves = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(real_kv, name)

        async def get(self, key: str) -> Any:
            value, revision = await real_kv.get(key)
            if self.moves < 12:
                self.moves += 1
                seq, stream = decode(value)
                assert await real_kv.write(key, encode(seq + 1, stream or reads.stream_id), revision)
            return value, revision

    others = OtherTabs()
    reads._kv = others  # type: ignore[assignment]
    try:
        frame = await read(ws, ids[-1], ref="high")
    finally:
        reads._kv = real_kv
    assert others.moves >= 10
    assert frame == {"type": "ack", "ref": "high", "id": ids[-1]}
    await ws.close()


async def test_read_position_survives_node_restart_and_is_cluster_wide(
    nats_server: Any, http: aiohttp.ClientSession
) -> None:
    shared = cluster()
    first = await start_node(make_settings(nats_server.url, subject=shared["subject"], stream=shared["stream"]))
    try:
        ids = await publish_many(http, first, "user:kim", 6)
        ws, welcome = await connect(http, first, "kim")
        assert welcome["unread"] == 6
        await messages(ws, 6)
        assert (await read(ws, ids[3]))["id"] == ids[3]
        await ws.close()
    finally:
        await first.stop()

    second = await start_node(make_settings(nats_server.url, subject=shared["subject"], stream=shared["stream"]))
    third = await start_node(make_settings(nats_server.url, subject=shared["subject"], stream=shared["stream"]))
    try:
        assert second.node.id != third.node.id
        for node in (second, third):
            ws, welcome = await connect(http, node, "kim")
            assert welcome["unread"] == 2
            assert [f["id"] for f in await messages(ws, 2)] == ids[4:]
            await quiet(ws, 0.2)
            await ws.close()
        # A read on one node is seen by the other.
        ws, _ = await connect(http, second, "kim")
        await messages(ws, 2)
        assert (await read(ws, ids[5]))["id"] == ids[5]
        await ws.close()
        ws, welcome = await connect(http, third, "kim")
        assert welcome["unread"] == 0
        await quiet(ws, 0.2)
        await ws.close()
    finally:
        await third.stop()
        await second.stop()


async def test_sse_without_last_event_id_gets_unread(
    node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    node: RunningNode = await node_factory()
    ids = await publish_many(http, node, "user:lea", 4)
    ws, _ = await connect(http, node, "lea")
    await messages(ws, 4)
    await read(ws, ids[0])
    await ws.close()

    resp = await http.get(node.url + "/sse", params={"token": token("lea")})
    assert resp.status == 200
    sse = SseClient(resp)
    events = [await sse.next() for _ in range(3)]
    assert [e.id for e in events] == ids[1:]
    assert [e.json() for e in events] == [{"n": 1}, {"n": 2}, {"n": 3}]
    live = await publish(http, node, "user:lea", "live")
    ev = await sse.next()
    assert (ev.id, ev.json()) == (live, "live")
    resp.close()


async def test_sse_inbox_overflow_starts_with_reset(
    node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    node: RunningNode = await node_factory(history={"user_max": 2})
    ids = await publish_many(http, node, "user:max", 4)
    resp = await http.get(node.url + "/sse", params={"token": token("max")})
    sse = SseClient(resp)
    reset = await sse.next()
    assert reset.event == "reset" and reset.json()["channel"] == "user"
    assert [(await sse.next()).id for _ in range(2)] == ids[2:]
    resp.close()


async def test_inbox_disabled_starts_live(node_factory: Callable[..., Any], http: aiohttp.ClientSession) -> None:
    node: RunningNode = await node_factory(history={"inbox": False})
    await publish_many(http, node, "user:ned", 3)
    ws, welcome = await connect(http, node, "ned")
    assert "unread" not in welcome
    await quiet(ws)
    live = await publish(http, node, "user:ned", "live")
    frame = await recv_json(ws)
    assert (frame["type"], frame["id"]) == ("message", live)
    await ws.close()

    resp = await http.get(node.url + "/sse", params={"token": token("ned")})
    sse = SseClient(resp)
    live2 = await publish(http, node, "user:ned", "live2")
    assert (await sse.next()).id == live2  # the first event is the live one, not the stored three
    resp.close()


async def test_unread_counts_from_read_position_whatever_since(
    node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    node: RunningNode = await node_factory()
    user_ids, room_ids = [], []
    for i in range(10):
        user_ids.append(await publish(http, node, "user:olga", {"u": i}))
        room_ids.append(await publish(http, node, "room:lobby", {"r": i}))
    ws, welcome = await connect(http, node, "olga")
    assert welcome["unread"] == 10
    await messages(ws, 10)
    await read(ws, user_ids[4])  # 5 read, 5 unread
    await ws.close()

    # since later than the read position: the replay starts at since, unread still counts from the position.
    since = user_ids[7]
    ws, welcome = await connect(http, node, "olga", room="lobby", since=since)
    assert welcome["unread"] == 5
    expected = sorted([*user_ids[8:], *room_ids[7:]], key=int)
    frames = await messages(ws, len(expected))
    assert [f["id"] for f in frames] == expected
    await quiet(ws)
    await ws.close()

    # since earlier than the position: a replay from since; unread counts only those after the position.
    since = user_ids[2]
    ws, welcome = await connect(http, node, "olga", since=since)
    assert welcome["unread"] == 5
    frames = await messages(ws, 7)
    assert [f["id"] for f in frames] == user_ids[3:]
    await quiet(ws)
    await ws.close()

    # since at the position.
    ws, welcome = await connect(http, node, "olga", since=user_ids[4])
    assert welcome["unread"] == 5
    assert [f["id"] for f in await messages(ws, 5)] == user_ids[5:]
    await ws.close()


async def test_unread_counts_the_messages_a_capped_replay_leaves_out(
    node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """A resume cut short by ``replay_max`` still counts every unread message
    (docs/protocol.md 7.3: "whether or not they are in this replay")."""
    node: RunningNode = await node_factory(history={"replay_max": 3})
    await publish_many(http, node, "user:jack", 2)
    room_ids = await publish_many(http, node, "room:lobby", 5)
    ws, welcome = await connect(http, node, "jack", room="lobby", since="0")  # read position 0: at since
    assert welcome["unread"] == 2
    resets = [await recv_json(ws) for _ in range(2)]  # both lost messages to the cap
    assert [(f["type"], f["channel"]) for f in resets] == [("reset", "room:lobby"), ("reset", "user")]
    assert [f["id"] for f in await messages(ws, 3)] == room_ids[-3:]
    await ws.close()
    # Without a position: the newest 3 unread, after a reset, and all 7 counted.
    user_ids = await publish_many(http, node, "user:jack", 5)
    ws, welcome = await connect(http, node, "jack")
    assert welcome["unread"] == 7
    assert (await recv_json(ws))["type"] == "reset"
    assert [f["id"] for f in await messages(ws, 3)] == user_ids[-3:]
    await ws.close()


async def test_inbox_and_live_flow_meet_without_gap_or_duplicate(
    node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """Messages published while the connection opens (during its inbox replay)
    are each received once, in order, after the stored ones."""
    node: RunningNode = await node_factory(history={"user_max": 200})
    stored = await publish_many(http, node, "user:pia", 30)
    published: list[str] = []
    done = asyncio.Event()

    async def keep_publishing() -> None:
        i = 0
        while not done.is_set() and i < 80:
            published.append(await publish(http, node, "user:pia", {"live": i}))
            i += 1

    publisher = asyncio.create_task(keep_publishing())
    await asyncio.sleep(0.02)
    ws, welcome = await connect(http, node, "pia")
    await asyncio.sleep(0.1)
    done.set()
    await publisher
    expected = stored + published
    frames = await messages(ws, len(expected))
    assert [f["id"] for f in frames] == expected
    assert welcome["unread"] >= 30
    await quiet(ws)
    await ws.close()


async def test_a_user_nothing_was_sent_to_opens_without_a_read_of_their_position(
    nats_server: NatsServer, node_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """The user's channel is asked first: while it holds nothing, the read
    position (a request of its own, on every connect) is not asked."""
    node: RunningNode = await node_factory()
    bucket = node.node.broker.reads.bucket  # type: ignore[attr-defined]
    spy = await nats.connect(nats_server.url)
    asked: list[bytes] = []

    async def note(msg: Msg) -> None:
        asked.append(msg.data)

    try:
        await spy.subscribe(f"$JS.API.STREAM.MSG.GET.KV_{bucket}", cb=note)
        await spy.flush()
        await node.node.broker._link.nc.flush()  # type: ignore[attr-defined]  # so it sees the spy at once
        ws, welcome = await connect(http, node, "nobody")
        assert welcome["unread"] == 0
        await ws.close()
        await publish_many(http, node, "user:somebody", 2)
        ws, welcome = await connect(http, node, "somebody")
        assert welcome["unread"] == 2
        await messages(ws, 2)
        await ws.close()
        await spy.flush()
        assert [orjson.loads(a)["last_by_subj"] for a in asked] == [f"$KV.{bucket}.{key_token('somebody')}"]
    finally:
        await spy.close()
