"""Reconnecting with a position replays what was missed from the stream, then
continues live: each message once, in order (WS ``since``, SSE ``Last-Event-ID``)."""

from __future__ import annotations

import aiohttp
import pytest

from broker.channels import Channel, room_channel

from ..helpers import RunningNode, SseClient, recv_json, scrape, token
from ..helpers import api_publish as publish


async def test_ws_since_replays_missed_then_live(node: RunningNode, http: aiohttp.ClientSession) -> None:
    first = await publish(http, node, "room:lobby", 0)
    channels = ["room:lobby", "user:alice", "room:other", "broadcast"] * 5
    missed = [await publish(http, node, ch, i) for i, ch in enumerate(channels)]
    ws = await http.ws_connect(node.ws_url, params={"token": token("alice"), "room": "lobby", "since": first})
    assert (await recv_json(ws))["type"] == "welcome"
    wanted = [sid for sid, ch in zip(missed, channels, strict=True) if ch != "room:other"]
    got = [(await recv_json(ws))["id"] for _ in wanted]
    assert got == wanted
    live = await publish(http, node, "room:lobby", "live")
    frame = await recv_json(ws)
    assert frame["id"] == live and frame["data"] == "live"
    metrics = await scrape(http, node.url)
    assert metrics["herald_replayed_messages_total"] == len(wanted)


async def test_sse_last_event_id_replays(node: RunningNode, http: aiohttp.ClientSession) -> None:
    ids = [await publish(http, node, "room:news", i) for i in range(5)]
    resp = await http.get(
        node.url + "/sse", params={"token": token("bob"), "room": "news"}, headers={"Last-Event-ID": ids[1]}
    )
    sse = SseClient(resp)
    got = [(await sse.next()).id for _ in range(3)]
    assert got == ids[2:]
    live = await publish(http, node, "room:news", "x")
    assert (await sse.next()).id == live


async def test_sse_last_event_id_wins_over_since(node: RunningNode, http: aiohttp.ClientSession) -> None:
    """EventSource reconnects to its first URL (which may carry an old ``since``)
    with a newer Last-Event-ID: resuming from ``since`` would repeat messages."""
    ids = [await publish(http, node, "room:news", i) for i in range(5)]
    params = {"token": token("bob"), "room": "news", "since": ids[0]}
    resp = await http.get(node.url + "/sse", params=params, headers={"Last-Event-ID": ids[3]})
    sse = SseClient(resp)
    assert (await sse.next()).id == ids[4]


async def test_subscribe_with_since(node: RunningNode, http: aiohttp.ClientSession) -> None:
    ids = [await publish(http, node, "room:r1", i) for i in range(3)]
    ws = await http.ws_connect(node.ws_url, params={"token": token("carol")})
    await recv_json(ws)
    await ws.send_json({"type": "subscribe", "room": "r1", "since": ids[0], "ref": "s"})
    frames = [await recv_json(ws) for _ in range(3)]
    assert [f.get("id") for f in frames[:2]] == ids[1:]
    assert frames[2] == {"type": "ack", "ref": "s", "channel": "room:r1"}


async def test_sse_stream_is_live_once_its_headers_arrive(node: RunningNode, http: aiohttp.ClientSession) -> None:
    """EventSource fires "open" on the headers: a message published right
    after must arrive (the stream starts only once its channels are joined)."""
    for i in range(15):
        resp = await http.get(node.url + "/sse", params={"token": token(f"early{i}"), "room": f"early{i}"})
        sent = await publish(http, node, f"room:early{i}", i)
        assert (await SseClient(resp).next(timeout=3)).id == sent
        resp.close()


async def test_a_message_published_while_joining_comes_live_at_or_before_the_position(
    node: RunningNode, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The welcome's position is read once the channels are live (3.2): a
    message published while they are joined is at or before it, and its live
    copy reaches the client after the welcome all the same."""
    pubsub = node.node.broker.pubsub
    want = pubsub.want
    lobby = room_channel("lobby")
    published: list[int] = []

    async def want_then_publish(channel: Channel) -> None:
        await want(channel)
        if channel == lobby:
            published.append(await pubsub.publish(channel, b'"during the join"'))

    monkeypatch.setattr(pubsub, "want", want_then_publish)
    ws = await http.ws_connect(node.ws_url, params={"token": token("dave"), "room": "lobby"})
    welcome = await recv_json(ws)
    monkeypatch.undo()
    (seq,) = published
    assert int(welcome["position"]) >= seq
    frame = await recv_json(ws)
    assert (frame["id"], frame["data"]) == (str(seq), "during the join")
    await ws.close()


async def test_a_position_past_the_streams_end_gets_a_reset_for_every_channel(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    """A position no message of this stream has reached (the stream was
    recreated: ids started over) cannot be resumed from: each channel is reset
    (7.2), not silently resumed."""
    last = int(await publish(http, node, "room:lobby", {"n": 1}))
    params = {"token": token("erin"), "room": "lobby", "since": str(last + 1000)}
    async with http.ws_connect(node.ws_url, params=params) as ws:
        assert (await recv_json(ws))["type"] == "welcome"
        resets = [await recv_json(ws) for _ in range(3)]
    assert sorted((f["type"], f["channel"]) for f in resets) == [
        ("reset", "broadcast"),
        ("reset", "room:lobby"),
        ("reset", "user"),
    ]
    params["since"] = str(last)  # at the end: nothing to say
    async with http.ws_connect(node.ws_url, params=params) as ws:
        assert (await recv_json(ws))["type"] == "welcome"
        await ws.send_json({"type": "ping"})
        assert (await recv_json(ws))["type"] == "pong"
