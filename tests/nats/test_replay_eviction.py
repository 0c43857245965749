"""A channel whose last message leaves the stream (max_age expiry,
stream.max_bytes eviction) between the replay's leader lookup and its read:
the replay waited for a message that would never come, for the whole request
timeout (5 s), and the connection was closed 1013 instead of getting its reset."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import nats

from ..helpers import RunningNode, api_publish, recv_json, token


async def test_a_channel_emptied_during_a_replay_gets_its_reset_at_once(
    node: RunningNode, http: aiohttp.ClientSession
) -> None:
    ids = [await api_publish(http, node, "room:q", i) for i in range(3)]
    history = node.node.broker.history
    leader = history._leader  # type: ignore[attr-defined]

    class EvictingLeader:
        """The leader's answer, then the subject's messages expire."""

        async def get(self, subject: str) -> Any:
            got = await leader.get(subject)
            if subject.endswith(".room.q"):
                nc = await nats.connect(node.settings.nats.urls[0])
                await nc.jetstream().purge_stream(node.settings.stream.name, subject=subject)
                await nc.close()
            return got

    history._leader = EvictingLeader()  # type: ignore[attr-defined]
    started = time.monotonic()
    params = {"token": token("al"), "room": "q", "since": ids[0]}
    async with http.ws_connect(node.ws_url, params=params) as ws:
        assert (await recv_json(ws, 3))["type"] == "welcome"
        frames = [await recv_json(ws, 3) for _ in range(3)]
    assert time.monotonic() - started < 2
    assert ("reset", "room:q") in [(f["type"], f.get("channel")) for f in frames]
