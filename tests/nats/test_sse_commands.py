"""SSE as a full client (docs/protocol.md: SSE, POST /api/command): a stream
with ``envelope=1`` tells channels apart, starts with ``welcome``, and every
command works over ``POST /api/command`` — on any node of the cluster."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from typing import Any

import aiohttp
import pytest

from ..helpers import NodeFactory, RunningNode, SseClient, SseEvent, api_publish, recv_json, token


async def open_stream(
    http: aiohttp.ClientSession,
    node: RunningNode,
    tok: str,
    rooms: list[str],
    envelope: bool = True,
    replaces: str | None = None,
) -> SseClient:
    query = [("token", tok)] + [("room", r) for r in rooms] + ([("envelope", "1")] if envelope else [])
    query += [("replaces", replaces)] if replaces is not None else []
    resp = await http.get(node.url + "/sse", params=query)
    assert resp.status == 200, await resp.text()
    sse = SseClient(resp)
    first = await sse._next(5.0)  # the raw first event, not hidden by next()
    assert first.event == "welcome", first
    sse.welcome = first.json()
    return sse


async def command(
    http: aiohttp.ClientSession, node: RunningNode, tok: str, cmd: dict[str, Any], **headers: str
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        node.url + "/api/command", json=cmd, headers={"Authorization": f"Bearer {tok}", **headers}
    ) as resp:
        return resp.status, await resp.json()


async def next_message(sse: SseClient, timeout: float = 5.0) -> dict[str, Any]:
    """The next ``message`` frame (envelope mode), skipping join/leave."""
    while True:
        ev = await sse.next(timeout)
        if ev.event == "message":
            frame = ev.json()
            assert frame["type"] == "message" and frame.get("id") == ev.id, ev
            return frame  # type: ignore[no-any-return]


async def nothing_within(sse: SseClient, seconds: float) -> SseEvent | None:
    try:
        return await sse.next(seconds)
    except TimeoutError:
        return None


async def test_envelope_stream_tells_a_room_message_from_a_user_notification(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    sse = await open_stream(http, node, token("alice"), ["lobby"])
    welcome = sse.welcome
    assert welcome is not None
    assert welcome["conn"].startswith(node.settings.node.id + ":") and welcome["user"] == "alice"
    assert welcome["channels"] == ["user", "broadcast", "room:lobby"] and welcome["unread"] == 0
    room_id = await api_publish(http, node, "room:lobby", {"text": "hi"})
    user_id = await api_publish(http, node, "user:alice", {"note": 1})
    room, note = await next_message(sse), await next_message(sse)
    assert room == {
        "type": "message",
        "channel": "room:lobby",
        "id": room_id,
        "event": "message",
        "data": {"text": "hi"},
    }
    assert note == {"type": "message", "channel": "user", "id": user_id, "event": "message", "data": {"note": 1}}


async def test_bare_stream_starts_with_welcome_and_keeps_bare_payloads(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    sse = await open_stream(http, node, token("alice"), ["lobby"], envelope=False)
    assert sse.welcome is not None and sse.welcome["type"] == "welcome"
    msg_id = await api_publish(http, node, "room:lobby", {"text": "hi"})
    ev = await sse.next()
    assert (ev.event, ev.id, ev.json()) == ("message", msg_id, {"text": "hi"})


async def test_commands_over_http_act_on_the_stream_as_on_a_websocket(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    tok = token("alice", publish=["*"])
    sse = await open_stream(http, node, tok, ["lobby"])
    assert sse.welcome is not None
    conn = sse.welcome["conn"]

    # subscribe: the same stream then gets the room's messages, with no reconnect.
    status, ack = await command(http, node, tok, {"type": "subscribe", "room": "b", "conn": conn, "ref": "s1"})
    assert (status, ack) == (200, {"type": "ack", "channel": "room:b", "ref": "s1"})
    first = await api_publish(http, node, "room:b", {"n": 1})
    assert (await next_message(sse))["id"] == first

    # publish, stored and ephemeral, reaches the stream too; answered as on WS.
    status, ack = await command(http, node, tok, {"type": "publish", "room": "b", "data": {"n": 2}, "ref": 7})
    assert status == 200 and ack["type"] == "ack" and ack["channel"] == "room:b" and ack["ref"] == 7
    assert (await next_message(sse))["id"] == ack["id"]
    status, ack = await command(http, node, tok, {"type": "publish", "room": "b", "data": "typing", "ephemeral": True})
    assert (status, ack) == (200, {"type": "ack", "channel": "room:b"})
    ev = await sse.next()
    typing = {"type": "message", "channel": "room:b", "event": "message", "from": "alice", "data": "typing"}
    assert ev.id is None and ev.json() == typing

    # presence, read, ping: the frames a WebSocket client gets.
    assert await command(http, node, tok, {"type": "presence", "room": "b"}) == (
        200,
        {"type": "presence", "room": "b", "users": ["alice"]},
    )
    assert await command(http, node, tok, {"type": "read", "id": first}) == (200, {"type": "ack", "id": first})
    assert await command(http, node, tok, {"type": "ping", "ref": "p"}) == (200, {"type": "pong", "ref": "p"})

    # unsubscribe: the room's messages stop; the others go on.
    status, ack = await command(http, node, tok, {"type": "unsubscribe", "room": "b", "conn": conn})
    assert (status, ack) == (200, {"type": "ack", "channel": "room:b"})
    await api_publish(http, node, "room:b", {"n": 3})
    lobby = await api_publish(http, node, "room:lobby", {"n": 4})
    assert (await next_message(sse))["id"] == lobby  # room:b's n=3 never came


async def test_command_refusals_have_their_status_and_error_code(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    tok = token("alice", rooms=["lobby", "b"], publish=["lobby"])
    sse = await open_stream(http, node, tok, ["lobby"])
    assert sse.welcome is not None
    conn = sse.welcome["conn"]

    status, err = await command(http, node, token("mallory"), {"type": "subscribe", "room": "b", "conn": conn})
    assert (status, err["code"]) == (403, "forbidden")
    status, err = await command(http, node, tok, {"type": "subscribe", "room": "b", "conn": f"{node.node.id}:99999"})
    assert (status, err["code"]) == (404, "not_found")
    status, err = await command(http, node, tok, {"type": "subscribe", "room": "b"})
    assert (status, err["code"]) == (400, "bad_request") and "conn" in err["message"]
    status, err = await command(http, node, tok, {"type": "subscribe", "room": "secret", "conn": conn, "ref": "x"})
    assert (status, err["code"], err["ref"]) == (403, "forbidden", "x")
    status, err = await command(http, node, tok, {"type": "publish", "room": "b", "data": 1})
    assert (status, err["code"]) == (403, "forbidden")
    status, err = await command(http, node, tok, {"type": "teleport"})
    assert (status, err["code"]) == (400, "unknown_command")
    status, err = await command(http, node, "not-a-token", {"type": "ping"})
    assert (status, err["code"]) == (401, "bad_token")
    async with http.post(
        node.url + "/api/command", data=b"not json", headers={"Authorization": f"Bearer {tok}"}
    ) as resp:
        assert (resp.status, (await resp.json())["code"]) == (400, "bad_frame")
    async with http.post(node.url + "/api/command", json=[1, 2], headers={"Authorization": f"Bearer {tok}"}) as resp:
        assert (resp.status, (await resp.json())["code"]) == (400, "bad_frame")

    # A browser page of another origin is refused, as streams are.
    status, err = await command(http, node, tok, {"type": "ping"}, Origin="https://evil.example")
    assert (status, err["code"]) == (403, "forbidden_origin")

    # A body over ws.max_frame: 413, the node reads no more of it.
    big = {"type": "publish", "room": "lobby", "data": "x" * 70_000}
    status, err = await command(http, node, tok, big)
    assert (status, err["code"]) == (413, "too_large")

    # The stream was never touched by any of it.
    lobby = await api_publish(http, node, "room:lobby", {"ok": True})
    assert (await next_message(sse))["id"] == lobby


async def test_the_publish_rate_limit_trips_as_on_a_websocket(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    node = await node_factory(limits={"publish_rate": 2, "rate_window": 60.0, "abuse_strikes": 4})
    tok = token("alice", publish=["*"])
    publish = {"type": "publish", "room": "lobby", "data": 1}

    # Over WebSocket: two pass, then rate_limited errors, then 4029 after the strikes.
    async with http.ws_connect(node.ws_url, params={"token": tok}) as ws:
        await recv_json(ws)
        answers = []
        for _ in range(4):
            await ws.send_json(publish)
            answers.append((await recv_json(ws))["type"])
        assert answers == ["ack", "ack", "error", "error"]

    # Over HTTP with a stream's conn: the same bucket, the same strikes, and the stream is closed 4029.
    sse = await open_stream(http, node, tok, [])
    assert sse.welcome is not None
    conn = sse.welcome["conn"]
    statuses = []
    for _ in range(7):
        status, answer = await command(http, node, tok, {**publish, "conn": conn})
        statuses.append((status, answer.get("code")))
        if status == 429 and len(statuses) <= 3:  # refused, not yet closed: when to retry
            assert answer["retry_after"] > 0
    assert statuses[:4] == [(200, None), (200, None), (429, "rate_limited"), (429, "rate_limited")]
    ends = await sse.read_to_end()
    assert [(e.event, e.json()["code"]) for e in ends] == [("close", 4029)]
    status, err = await command(http, node, tok, {**publish, "conn": conn})
    assert (status, err["code"]) == (404, "not_found")

    # Without a conn: a per-user bucket (its own two), 429 but nothing to close.
    statuses = [(await command(http, node, token("bob", publish=["*"]), publish))[0] for _ in range(6)]
    assert statuses == [200, 200, 429, 429, 429, 429]
    assert (await command(http, node, token("carol", publish=["*"]), publish))[0] == 200  # another user's own


async def test_a_slow_body_gets_408_and_the_node_serves_others_meanwhile(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    node = await node_factory(http={"command_timeout": 0.5})
    host, port = node.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b'{"type":"ping"}'
    writer.write(
        b"POST /api/command HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %b\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (token("alice").encode(), len(body), body[:5])
    )
    await writer.drain()
    started = time.monotonic()
    # Meanwhile another client is answered at once.
    assert await command(http, node, token("bob"), {"type": "ping"}) == (200, {"type": "pong"})
    answer = await asyncio.wait_for(reader.read(4096), 5)
    elapsed = time.monotonic() - started
    while b'"timeout"' not in answer and (more := await asyncio.wait_for(reader.read(4096), 5)):
        answer += more
    assert answer.startswith(b"HTTP/1.1 408") and b'"timeout"' in answer, answer
    assert 0.4 < elapsed < 3
    writer.close()


async def test_any_node_takes_the_command_for_a_stream_on_another(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    tag = "fw" + uuid.uuid4().hex[:8]
    shared: dict[str, Any] = {"subject": {"prefix": tag}, "stream": {"name": tag.upper(), "storage": "memory"}}
    a, b = await node_factory(**shared), await node_factory(**shared, http={"command_timeout": 2.0})
    tok = token("alice", publish=["*"])
    sse = await open_stream(http, a, tok, ["lobby"])
    assert sse.welcome is not None
    conn = sse.welcome["conn"]

    # Every command posted to b, the stream on a.
    status, ack = await command(http, b, tok, {"type": "subscribe", "room": "b", "conn": conn, "ref": 1})
    assert (status, ack) == (200, {"type": "ack", "channel": "room:b", "ref": 1})
    status, ack = await command(http, b, tok, {"type": "publish", "room": "b", "data": {"n": 1}})
    assert status == 200 and (await next_message(sse))["id"] == ack["id"]
    assert await command(http, b, tok, {"type": "presence", "room": "b"}) == (
        200,
        {"type": "presence", "room": "b", "users": ["alice"]},
    )
    status, err = await command(http, b, token("mallory"), {"type": "unsubscribe", "room": "b", "conn": conn})
    assert (status, err["code"]) == (403, "forbidden")
    status, err = await command(http, b, tok, {"type": "subscribe", "room": "b", "conn": f"{a.node.id}:424242"})
    assert (status, err["code"]) == (404, "not_found")
    status, ack = await command(http, b, tok, {"type": "unsubscribe", "room": "b", "conn": conn})
    assert (status, ack) == (200, {"type": "ack", "channel": "room:b"})
    await api_publish(http, a, "room:b", {"n": 2})
    lobby = await api_publish(http, a, "room:lobby", {"n": 3})
    assert (await next_message(sse))["id"] == lobby

    # The forward's cost: a round trip over NATS (median of 50, in the log for the notes).
    local, forwarded = [], []
    for _ in range(50):
        for target, times in ((a, local), (b, forwarded)):
            started = time.perf_counter()
            status, _ = await command(http, target, tok, {"type": "ping", "conn": conn})
            times.append(time.perf_counter() - started)
            assert status == 200
    medians = [statistics.median(times) * 1e3 for times in (local, forwarded)]
    print("command latency: local {:.2f} ms, forwarded {:.2f} ms".format(*medians))
    metrics = await (await http.get(b.url + "/metrics")).text()
    # subscribe, unsubscribe and the 50 pings named the conn; publish and presence ran on b itself.
    assert 'herald_api_commands_total{forwarded="true",result="ok"} 52.0' in metrics
    assert 'herald_api_commands_total{forwarded="false",result="ok"} 2.0' in metrics

    # A conn whose node is gone: 404 at once, not a timeout. (Rarely, under a loaded
    # xdist run, the first request after the stop still found the node's subscription
    # and timed out as 503: the next one is the check.)
    await a.stop()
    for attempt in range(3):
        started = time.monotonic()
        status, err = await command(http, b, tok, {"type": "subscribe", "room": "b", "conn": conn})
        if status == 404 or attempt == 2:
            break
        assert (status, err["code"]) == (503, "unavailable"), err
    assert (status, err["code"]) == (404, "not_found") and time.monotonic() - started < 2


async def test_stats_and_metrics_list_every_transport(node: RunningNode, http: aiohttp.ClientSession) -> None:
    await open_stream(http, node, token("alice"), [])
    async with http.get(node.url + "/api/stats", headers={"Authorization": "Bearer " + node.settings.admin.key}) as r:
        stats = await r.json()
    assert stats["connections"] == {"ws": 0, "sse": 1}
    metrics = await (await http.get(node.url + "/metrics")).text()
    assert 'herald_connections{transport="sse"} 1.0' in metrics and 'herald_connections{transport="ws"} 0.0' in metrics


@pytest.mark.parametrize("envelope", [True, False], ids=["envelope", "bare"])
async def test_a_stream_ended_by_the_node_says_why(
    node: RunningNode, http: aiohttp.ClientSession, envelope: bool
) -> None:
    # exp 1.5 s from now (ttl=1 counts from the whole second: as little as ~0 s left on a loaded CI)
    sse = await open_stream(http, node, token("alice", exp=time.time() + 1.5), [], envelope)
    ends = await sse.read_to_end(timeout=5)
    assert [(e.event, e.json()) for e in ends] == [
        ("close", {"type": "close", "code": 4001, "reason": "token expired"})
    ]


async def test_pages_of_an_allowed_other_site_may_read_streams_and_send_commands(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    node = await node_factory(limits={"origins": ["https://app.example"]})
    tok = token("alice")
    async with http.options(
        node.url + "/api/command",
        headers={"Origin": "https://app.example", "Access-Control-Request-Headers": "authorization"},
    ) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
    async with http.options(node.url + "/api/command", headers={"Origin": "https://evil.example"}) as resp:
        assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
    async with http.post(
        node.url + "/api/command",
        json={"type": "ping"},
        headers={"Authorization": f"Bearer {tok}", "Origin": "https://app.example"},
    ) as resp:
        assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    resp = await http.get(node.url + "/sse", params={"token": tok}, headers={"Origin": "https://app.example"})
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    resp.close()
    # Same-site or non-browser clients get no CORS headers at all.
    async with http.post(
        node.url + "/api/command", json={"type": "ping"}, headers={"Authorization": f"Bearer {tok}"}
    ) as r:
        assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers


async def test_a_forwarded_commands_conn_cannot_forge_log_lines(
    node_factory: NodeFactory, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """The node that holds the conn logs a token it refuses (a secret being
    rotated: the node asked took it) with the conn the client wrote: its CR
    and LF must not start lines of their own in the log."""
    tag = "fl" + uuid.uuid4().hex[:8]
    shared: dict[str, Any] = {"subject": {"prefix": tag}, "stream": {"name": tag.upper(), "storage": "memory"}}
    a = await node_factory(**shared, jwt={"secret": "another-secret-that-is-long-enough-for-hs256"})
    b = await node_factory(**shared)
    conn = f"{a.node.id}:1\r\nERROR herald forged line"
    status, err = await command(http, b, token("mallory"), {"type": "ping", "conn": conn})
    assert (status, err["code"]) == (401, "bad_token"), err
    refused = [r.getMessage() for r in caplog.records if "refused token" in r.getMessage()]
    assert refused and not any("\n" in m or "\r" in m for m in refused), refused
