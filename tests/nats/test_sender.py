"""A client's message carries its publisher, stamped by the node (NATS header
``Herald-From``, ``from`` on the wire: docs/protocol.md 3.2, 6.3), on every
path a stored message takes to a client, on a real nats-server."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from broker.embedded import NatsServer
from gateway.client import HeraldClient

from ..helpers import ADMIN_KEY, RunningNode, SseClient, api_publish, core_publish, recv_json, token

ALICE = token("alice", rooms=["lobby"], publish=["lobby"])


async def sse_stream(http: aiohttp.ClientSession, node: RunningNode, user: str, **query: str) -> SseClient:
    resp = await http.get(node.url + "/sse", params={"token": token(user), "room": "lobby", "envelope": "1", **query})
    assert resp.status == 200, await resp.text()
    return SseClient(resp)


async def alice_publishes(http: aiohttp.ClientSession, node: RunningNode, data: Any, **extra: Any) -> dict[str, Any]:
    """Alice's publish over POST /api/command; its answer."""
    cmd = {"type": "publish", "room": "lobby", "data": data, **extra}
    async with http.post(node.url + "/api/command", json=cmd, headers={"Authorization": f"Bearer {ALICE}"}) as resp:
        answer: dict[str, Any] = await resp.json()
        assert resp.status == 200, answer
        return answer


def senders(frames: list[dict[str, Any]]) -> list[tuple[str | None, str | None]]:
    return [(m.get("id"), m.get("from")) for m in frames]


async def test_alices_message_reaches_bob_from_alice_live_on_ws_and_sse(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(node.ws_url, params={"token": token("bob"), "room": "lobby"}) as ws:
        assert (await recv_json(ws))["type"] == "welcome"
        sse = await sse_stream(http, node, "bob")
        bare = SseClient(await http.get(node.url + "/sse", params={"token": token("bob"), "room": "lobby"}))
        stored = await alice_publishes(http, node, {"text": "hi"}, event="chat")
        await alice_publishes(http, node, {"typing": True}, ephemeral=True)
        backend = await api_publish(http, node, "room:lobby", {"text": "from the backend"})
        expected = [(stored["id"], "alice"), (None, "alice"), (backend, None)]
        assert senders([await recv_json(ws) for _ in expected]) == expected
        assert senders([(await sse.next()).json() for _ in expected]) == expected
        # Bare SSE: the payload alone, as before (its data has no room for a from).
        assert [(await bare.next()).data for _ in expected] == [
            '{"text":"hi"}',
            '{"typing":true}',
            '{"text":"from the backend"}',
        ]
        sse.response.close()
        bare.response.close()


@pytest.mark.parametrize("transport", ["ws", "sse"])
async def test_a_resume_and_history_keep_the_sender(
    node: RunningNode, http: aiohttp.ClientSession, transport: str
) -> None:
    first = await api_publish(http, node, "room:lobby", {"n": 0})
    mine = (await alice_publishes(http, node, {"n": 1}))["id"]
    theirs = await api_publish(http, node, "room:lobby", {"n": 2})
    expected = [(mine, "alice"), (theirs, None)]
    if transport == "ws":
        params = {"token": token("bob"), "room": "lobby", "since": first}
        async with http.ws_connect(node.ws_url, params=params) as ws:
            assert (await recv_json(ws))["type"] == "welcome"
            assert senders([await recv_json(ws) for _ in expected]) == expected
            await ws.send_json({"type": "history", "room": "lobby", "limit": 2})
            assert senders((await recv_json(ws))["messages"]) == expected
    else:
        sse = await sse_stream(http, node, "bob", since=first)
        assert senders([(await sse.next()).json() for _ in expected]) == expected
        sse.response.close()
    async with http.get(
        node.url + "/api/history",
        params={"channel": "room:lobby", "limit": "2"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ) as resp:
        assert senders((await resp.json())["messages"]) == expected


async def test_a_raw_nats_publisher_may_name_a_sender_and_the_inbox_keeps_it(
    node: RunningNode, nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    """A NATS publisher is trusted as the rest of the backend: its Herald-From
    reaches clients (here through the inbox replay); one that is no user id
    is dropped."""
    subject = f"{node.settings.subject.prefix}.user.bob"
    await core_publish(nats_server.url, subject, b'{"n":1}', headers={"Herald-From": "billing"})
    await core_publish(nats_server.url, subject, b'{"n":2}', headers={"Herald-From": "not an id"})
    async with http.ws_connect(node.ws_url, params={"token": token("bob")}) as ws:
        assert (await recv_json(ws))["unread"] == 2
        frames = [await recv_json(ws) for _ in range(2)]
        assert [m.get("from") for m in frames] == ["billing", None]


async def test_the_python_client_hands_out_the_sender(node: RunningNode, http: aiohttp.ClientSession) -> None:
    async with HeraldClient([node.url], token=token("bob"), rooms=["lobby"]) as client:
        await client.ping()  # connected: what is published now reaches it
        stored = await alice_publishes(http, node, {"text": "hi"})
        message = await anext(aiter(client))
        assert (message.id, message.sender, message.data) == (stored["id"], "alice", {"text": "hi"})
        page = await client.history("lobby")
        assert [m.sender for m in page] == ["alice"]
