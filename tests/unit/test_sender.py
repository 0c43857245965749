"""The publishing user of a client's message, stamped by the node as ``from``
(docs/protocol.md 3.2, 6.3): over real sockets to a node on the memory
broker. The stored paths on a real nats-server: tests/nats/test_sender.py."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from broker import Delivery
from broker.channels import parse_channel, sender_of
from gateway.client.events import Message, event_of
from gateway.frames import SSE, SSE_ENVELOPE, WS, message_json

from ..helpers import ADMIN_KEY, RunningNode, api_publish, make_settings, recv_json, start_node, token
from ..memory_broker import MemoryBroker


@pytest.fixture
async def node() -> AsyncIterator[RunningNode]:
    running = await start_node(make_settings(), MemoryBroker)
    yield running
    await running.stop()


def lobby(seq: int, sender: str | None) -> Delivery:
    return Delivery(parse_channel("room:lobby"), seq, 0, time.time(), "chat", b'{"text":"hi"}', sender=sender)


def test_a_message_frame_names_its_sender_once_encoded() -> None:
    assert message_json(lobby(7, "alice")) == (
        b'{"type":"message","channel":"room:lobby","id":"7","event":"chat","from":"alice","data":{"text":"hi"}}'
    )
    assert b'"from"' not in message_json(lobby(7, None))  # a backend's message: no from
    assert b'"from":"alice"' in WS.message(lobby(7, "alice"))
    assert b'"from":"alice"' in SSE_ENVELOPE.message(lobby(7, "alice"))
    # Bare SSE sends the payload alone, as its contract says: from needs the envelope.
    assert SSE.message(lobby(7, "alice")) == SSE.message(lobby(7, None))


def test_a_sender_header_that_is_no_user_id_is_dropped() -> None:
    assert sender_of({"Herald-From": "alice"}) == "alice"
    assert sender_of({}) is None
    for bad in ("", "a b", "a.b", "x" * 129, "al\nice"):
        assert sender_of({"Herald-From": bad}) is None, bad


def test_the_python_client_reads_from_as_sender() -> None:
    frame = {"type": "message", "channel": "room:a", "id": "3", "event": "e", "from": "alice", "data": 1}
    assert event_of(frame) == Message("room:a", "3", "e", 1, sender="alice")
    assert event_of({**frame, "from": 5}) == Message("room:a", "3", "e", 1)  # not a user id: none
    assert Message("room:a", "3", "e", 1, sender="alice").as_json()["from"] == "alice"
    assert "from" not in Message("room:a", "3", "e", 1).as_json()


async def test_bob_sees_alice_as_the_sender_of_what_she_publishes(node: RunningNode) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(node.ws_url, params={"token": token("alice", publish=["*"]), "room": "lobby"}) as alice,
        http.ws_connect(node.ws_url, params={"token": token("bob"), "room": "lobby"}) as bob,
    ):
        for ws in (alice, bob):
            assert (await recv_json(ws))["type"] == "welcome"
        await alice.send_json({"type": "publish", "room": "lobby", "event": "chat", "data": {"text": "hi"}, "ref": 1})
        ack = await recv_json(alice)
        assert ack["type"] == "ack", ack
        stored = await recv_json(bob)
        assert (stored["id"], stored["from"], stored["data"]) == (ack["id"], "alice", {"text": "hi"})
        await alice.send_json({"type": "publish", "room": "lobby", "data": "typing", "ephemeral": True})
        typing = await recv_json(bob)
        assert (typing.get("id"), typing["from"], typing["data"]) == (None, "alice", "typing")

        # The backend publishes as no one.
        backend = await api_publish(http, node, "room:lobby", {"text": "from the backend"})
        frame = await recv_json(bob)
        assert frame["id"] == backend and "from" not in frame

        await bob.send_json({"type": "history", "room": "lobby", "limit": 5})
        page = (await recv_json(bob))["messages"]
        assert [(m["id"], m.get("from")) for m in page] == [(ack["id"], "alice"), (backend, None)]
        async with http.get(
            node.url + "/api/history",
            params={"channel": "room:lobby"},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        ) as resp:
            assert [m.get("from") for m in (await resp.json())["messages"]] == ["alice", None]


@pytest.mark.parametrize("ephemeral", [False, True])
async def test_a_client_cannot_choose_its_from(node: RunningNode, ephemeral: bool) -> None:
    """A publish naming a ``from`` is refused (it would be a claim the node does
    not check), over WebSocket and POST /api/command alike; nothing is published."""
    cmd = {"type": "publish", "room": "lobby", "data": {}, "from": "bob", "ephemeral": ephemeral, "ref": "f"}
    tok = token("mallory", publish=["*"])
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(node.ws_url, params={"token": tok, "room": "lobby"}) as ws:
            assert (await recv_json(ws))["type"] == "welcome"
            await ws.send_json(cmd)
            answer = await recv_json(ws)
        async with http.post(node.url + "/api/command", json=cmd, headers={"Authorization": f"Bearer {tok}"}) as resp:
            over_http = (resp.status, await resp.json())
    expected = "publish takes no from: the node names the publishing user"
    assert (answer["type"], answer["code"], answer["message"], answer["ref"]) == ("error", "bad_request", expected, "f")
    assert (over_http[0], over_http[1]["code"], over_http[1]["message"]) == (400, "bad_request", expected)
    broker = node.node.broker
    assert isinstance(broker, MemoryBroker) and broker.log == []
