"""Messages published to NATS (core or JetStream) or the HTTP API reach the right
WebSocket and SSE clients with their stream id and event name."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson

from broker.embedded import NatsServer

from ..helpers import PUBLISH_HEADERS, RunningNode, SseClient, core_publish, recv_json, recv_until, token


async def open_ws(
    http: aiohttp.ClientSession, node: RunningNode, tok: str, rooms: list[str] = ()
) -> aiohttp.ClientWebSocketResponse:
    query = [("token", tok)] + [("room", r) for r in rooms]
    ws = await http.ws_connect(node.ws_url, params=query)
    welcome = await recv_json(ws)
    assert welcome["type"] == "welcome"
    return ws


async def open_sse(
    http: aiohttp.ClientSession, node: RunningNode, tok: str, rooms: list[str] = (), headers=None
) -> SseClient:
    query = [("token", tok)] + [("room", r) for r in rooms]
    resp = await http.get(node.url + "/sse", params=query, headers=headers or {})
    assert resp.status == 200, await resp.text()
    return SseClient(resp)


async def subscribed(node: RunningNode, count: int) -> None:
    # Interest is registered before welcome is processed by the client; give
    # the NATS server a round trip so the SUB is in place before publishing.
    for _ in range(100):
        if node.node.broker.stats().subscriptions >= count:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)


async def test_core_nats_publish_reaches_ws_and_sse(
    node: RunningNode, nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    prefix = node.settings.subject.prefix
    ws = await open_ws(http, node, token("alice"), ["lobby"])
    sse = await open_sse(http, node, token("bob"), ["lobby"])
    await subscribed(node, 4)
    await core_publish(nats_server.url, f"{prefix}.room.lobby", b'{"text":"hello"}', {"Herald-Event": "chat"})
    frame = await recv_json(ws)
    assert frame["type"] == "message"
    assert frame["channel"] == "room:lobby"
    assert frame["event"] == "chat"
    assert frame["data"] == {"text": "hello"}
    assert frame["id"].isdigit() and int(frame["id"]) >= 1
    ev = await sse.next()
    assert ev.event == "chat"
    assert ev.id == frame["id"]
    assert ev.json() == {"text": "hello"}
    assert sse.retry == node.settings.sse.retry


async def test_default_event_and_non_json_payload(
    node: RunningNode, nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    prefix = node.settings.subject.prefix
    ws = await open_ws(http, node, token("alice"), ["lobby"])
    sse = await open_sse(http, node, token("bob"), ["lobby"])
    await subscribed(node, 4)
    await core_publish(nats_server.url, f"{prefix}.room.lobby", b"plain text\nsecond line")
    frame = await recv_json(ws)
    assert frame["event"] == "message"
    assert frame["data"] == "plain text\nsecond line"
    ev = await sse.next()
    assert ev.event == "message"
    assert ev.data == "plain text\nsecond line"  # one data: line per payload line


async def test_user_channel_reaches_every_tab_of_that_user_only(
    node: RunningNode, nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    prefix = node.settings.subject.prefix
    alice_tabs = [await open_ws(http, node, token("alice")) for _ in range(3)]
    alice_sse = await open_sse(http, node, token("alice"))
    bob = await open_ws(http, node, token("bob"))
    await subscribed(node, 3)
    await core_publish(nats_server.url, f"{prefix}.user.alice", b'{"n":1}')
    await core_publish(nats_server.url, f"{prefix}.user.bob", b'{"n":2}')
    for ws in alice_tabs:
        frame = await recv_json(ws)
        assert (frame["channel"], frame["data"]) == ("user", {"n": 1})
    assert (await alice_sse.next()).json() == {"n": 1}
    frame = await recv_json(bob)
    assert (frame["channel"], frame["data"]) == ("user", {"n": 2})
    # Nothing else arrives for alice: the next frame is the answer to a ping.
    await alice_tabs[0].send_json({"type": "ping", "ref": 1})
    assert (await recv_json(alice_tabs[0]))["type"] == "pong"


async def test_broadcast_reaches_everyone(
    node: RunningNode, nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    prefix = node.settings.subject.prefix
    clients = [await open_ws(http, node, token(f"u{i}")) for i in range(4)]
    sse = await open_sse(http, node, token("s1"))
    await subscribed(node, 6)
    await core_publish(nats_server.url, f"{prefix}.broadcast", b'{"all":true}')
    for ws in clients:
        frame = await recv_json(ws)
        assert frame["channel"] == "broadcast" and frame["data"] == {"all": True}
    assert (await sse.next()).json() == {"all": True}


async def test_http_publish_api(node: RunningNode, http: aiohttp.ClientSession) -> None:
    ws = await open_ws(http, node, token("alice"), ["news"])
    await subscribed(node, 3)
    headers = PUBLISH_HEADERS
    async with http.post(
        node.url + "/api/publish", json={"channel": "room:news", "event": "headline", "data": {"t": 1}}, headers=headers
    ) as resp:
        assert resp.status == 200
        body = await resp.json()
    frame = await recv_json(ws)
    assert frame == {"type": "message", "channel": "room:news", "id": body["id"], "event": "headline", "data": {"t": 1}}
    async with http.post(
        node.url + "/api/publish", json={"channel": "user:alice", "data": [1, 2]}, headers=headers
    ) as resp:
        assert resp.status == 200
        second = await resp.json()
    assert int(second["id"]) > int(body["id"])
    frame = await recv_json(ws)
    assert (frame["channel"], frame["data"], frame["id"]) == ("user", [1, 2], second["id"])


async def test_client_publish_and_subscribe_commands(node: RunningNode, http: aiohttp.ClientSession) -> None:
    writer = await open_ws(http, node, token("alice", rooms=["chat-*"], publish=["chat-*"]))
    reader = await open_ws(http, node, token("bob", rooms=["chat-*"]))
    await writer.send_json({"type": "subscribe", "room": "chat-1", "ref": "s1"})
    assert await recv_json(writer) == {"type": "ack", "ref": "s1", "channel": "room:chat-1"}
    await reader.send_json({"type": "subscribe", "room": "chat-1", "ref": 9})
    assert (await recv_json(reader))["ref"] == 9
    await writer.send_json({"type": "publish", "room": "chat-1", "data": {"hi": 1}, "event": "say", "ref": "p1"})
    ack = await recv_until(writer, "ack")
    assert ack["ref"] == "p1" and ack["id"].isdigit()
    frame = await recv_until(reader, "message")
    assert (frame["id"], frame["event"], frame["data"]) == (ack["id"], "say", {"hi": 1})
    # bob may not publish; the error carries the ref
    await reader.send_json({"type": "publish", "room": "chat-1", "data": 1, "ref": "x"})
    err = await recv_until(reader, "error")
    assert (err["code"], err["ref"]) == ("forbidden", "x")
    # ephemeral: delivered live, without an id
    await writer.send_json(
        {
            "type": "publish",
            "room": "chat-1",
            "data": {"typing": True},
            "event": "typing",
            "ephemeral": True,
            "ref": "e",
        }
    )
    frame = await recv_until(reader, "message")
    assert frame["event"] == "typing" and "id" not in frame
    await reader.send_json({"type": "unsubscribe", "room": "chat-1", "ref": "u"})
    assert (await recv_until(reader, "ack"))["ref"] == "u"


async def test_bad_frames_get_errors_and_connection_survives(node: RunningNode, http: aiohttp.ClientSession) -> None:
    ws = await open_ws(http, node, token("alice"))
    await ws.send_str("not json")
    assert (await recv_json(ws))["code"] == "bad_frame"
    await ws.send_str("[1,2]")
    assert (await recv_json(ws))["code"] == "bad_frame"
    await ws.send_bytes(b"\x00\x01")
    assert (await recv_json(ws))["code"] == "bad_frame"
    await ws.send_json({"type": "frobnicate", "ref": "r"})
    assert await recv_json(ws) == {
        "type": "error",
        "code": "unknown_command",
        "message": "unknown command type",
        "ref": "r",
    }
    await ws.send_json({"type": "subscribe", "ref": {"nested": 1}})
    assert (await recv_json(ws))["code"] == "bad_request"
    await ws.send_json({"type": "ping", "ref": 3})
    assert await recv_json(ws) == {"type": "pong", "ref": 3}


async def test_welcome_means_the_channels_are_live(
    node: RunningNode, nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    """No waiting after welcome: a message published right then arrives."""
    prefix = node.settings.subject.prefix
    for i in range(5):
        ws = await open_ws(http, node, token(f"fresh{i}"), [f"new-room-{i}"])
        await core_publish(nats_server.url, f"{prefix}.room.new-room-{i}", b'{"n":%d}' % i)
        frame = await recv_json(ws)
        assert (frame["channel"], frame["data"]) == (f"room:new-room-{i}", {"n": i})
        await ws.close()


# A JSON text whose strings hold lone surrogate escapes: valid JSON grammar, but no Unicode text (orjson,
# and so the Python client, refuse it); a pair, and an escaped backslash before "ud800", are text.
LONE = b'{"t":"\\ud800 lone","end":["\\udfff"],"pair":"\\ud83d\\ude00","esc":"\\\\ud800"}'
MENDED = {"t": "\ufffd lone", "end": ["\ufffd"], "pair": "\U0001f600", "esc": "\\ud800"}


async def test_lone_surrogate_escapes_are_delivered_as_u_fffd_in_the_json_value(
    node: RunningNode, nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    """docs/protocol.md 3.2: data is the published JSON value, and what is no Unicode text is U+FFFD.
    Such a payload was delivered as a string of its text; over HTTP it was refused as not JSON."""
    prefix = node.settings.subject.prefix
    ws = await open_ws(http, node, token("alice"), ["lobby"])
    resp = await http.get(node.url + "/sse", params=[("token", token("bob")), ("room", "lobby"), ("envelope", "1")])
    assert resp.status == 200
    sse = SseClient(resp)
    await subscribed(node, 4)
    await core_publish(nats_server.url, f"{prefix}.room.lobby", LONE)
    body = b'{"channel":"room:lobby","data":%b}' % LONE
    async with http.post(node.url + "/api/publish", data=body, headers=PUBLISH_HEADERS) as answer:
        assert answer.status == 200, await answer.text()
    for _ in range(2):
        frame = await recv_json(ws)  # orjson: strict JSON, no lone surrogate
        assert (frame["type"], frame["data"]) == ("message", MENDED), frame
        ev = await sse.next()
        assert orjson.loads(ev.data)["data"] == MENDED, ev.data
