"""A rolling rotation of the client-token secret, the publish key and the
admin key (README: Rotating secrets) on nodes sharing one stream: while nodes
with and without the new key serve side by side nothing is refused, and once
``*_previous`` is dropped the old key is refused on every path — the front
door's and aiohttp's routes of POST /api/publish alike. Without a node:
tests/unit/test_key_rotation.py."""

from __future__ import annotations

import logging

import aiohttp
import orjson
import pytest

from ..helpers import ADMIN_KEY, PUBLISH_KEY, SECRET, NodeFactory, RunningNode, recv_until, token
from .test_auth import open_ws, query, sse_refusal, ws_refusal
from .test_front_paths import BODY, SHAPES, exchange

NEW_SECRET = "the-new-secret-that-is-long-enough-for-hs256"
NEW_PUBLISH = "new-publish-key"
NEW_ADMIN = "new-admin-key"
NEW = (NEW_SECRET, NEW_PUBLISH, NEW_ADMIN)
OLD = (SECRET, PUBLISH_KEY, ADMIN_KEY)
PATHS = ("front", "aiohttp", "expect")


async def publish_status(
    node: RunningNode, key: str, shapes: tuple[str, ...] = PATHS, more: bytes = b""
) -> dict[str, int]:
    """The status of a publish with ``key`` on each path (``shapes``): the front
    door's, aiohttp's, and after 100-continue; ``more``: header lines to add."""
    statuses = {}
    for shape in shapes:
        extra = {**SHAPES, "expect": b"Expect: 100-continue\r\n"}[shape] + more
        head = b"POST /api/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        head += b"Authorization: Bearer %b\r\nContent-Length: %d\r\n%b\r\n" % (key.encode(), len(BODY), extra)
        answer = await exchange(node, head + BODY, seconds=1.0)
        if answer.startswith(b"HTTP/1.1 100"):
            answer = answer.partition(b"\r\n\r\n")[2]
        statuses[shape] = int(answer.split(b" ", 2)[1])
    return statuses


async def admin_status(
    http: aiohttp.ClientSession, node: RunningNode, key: str, more: dict[str, str] | None = None
) -> tuple[int, int]:
    headers = {"Authorization": f"Bearer {key}", **(more or {})}
    async with http.get(node.url + "/api/stats", headers=headers) as stats:
        pass
    async with http.post(node.url + "/api/disconnect", data=orjson.dumps({"user": "nobody"}), headers=headers) as drop:
        pass
    return stats.status, drop.status


def rotating(keys: tuple[str, str, str], previous: tuple[str, str, str] = ("", "", "")) -> dict[str, dict[str, str]]:
    """Settings with (jwt.secret, publish.key, admin.key) ``keys`` and their ``*_previous``."""
    return {
        "jwt": {"secret": keys[0], "secret_previous": previous[0]},
        "publish": {"key": keys[1], "key_previous": previous[1]},
        "admin": {"key": keys[2], "key_previous": previous[2]},
    }


async def test_old_and_new_keys_are_taken_during_a_rotation_and_only_the_new_after(
    node_factory: NodeFactory, http: aiohttp.ClientSession
) -> None:
    old = await node_factory()  # not yet restarted: the old keys only
    shared: dict[str, dict[str, str]] = {"subject": {"prefix": old.settings.subject.prefix}}
    shared["stream"] = {"name": old.settings.stream.name, "storage": "memory"}
    during = await node_factory(**shared, **rotating(NEW, OLD))
    after = await node_factory(**shared, **rotating(NEW))
    old_token, new_token = token("olga"), token("nina", key=NEW_SECRET)

    # Phase 1: nodes restarted one by one with the new keys and the old as *_previous: the issuer still
    # signs with the old secret and backends still use the old keys; a client may land on either node.
    for node in (old, during):
        ws, welcome = await open_ws(http, node, old_token, ["lobby"])
        assert welcome["user"] == "olga"
        await ws.close()
        assert await publish_status(node, PUBLISH_KEY) == {"front": 200, "aiohttp": 200, "expect": 200}, node.url
        assert await admin_status(http, node, ADMIN_KEY) == (200, 200), node.url
    # Phase 2: every node takes both; issuer and backends switch to the new keys.
    ws, _ = await open_ws(http, during, new_token, ["lobby"])
    assert await publish_status(during, NEW_PUBLISH) == {"front": 200, "aiohttp": 200, "expect": 200}
    assert await admin_status(http, during, NEW_ADMIN) == (200, 200)
    # Phase 3: *_previous dropped. The old keys are refused on every path; a fresh connect with an old
    # token is refused 4001 / 401 (the client gets a new token), while a stream opened with one stays.
    held, _ = await open_ws(http, during, old_token, ["lobby"])
    assert await publish_status(after, PUBLISH_KEY) == {"front": 401, "aiohttp": 401, "expect": 401}
    assert await publish_status(after, "a-stranger") == {"front": 401, "aiohttp": 401, "expect": 401}
    assert await publish_status(during, "a-stranger") == {"front": 401, "aiohttp": 401, "expect": 401}
    assert await admin_status(http, after, ADMIN_KEY) == (401, 401)
    assert (await ws_refusal(http, after, query(old_token)))[0] == 4001
    assert (await sse_refusal(http, after, query(old_token))).status == 401
    ws2, welcome = await open_ws(http, after, new_token, ["lobby"])
    assert welcome["user"] == "nina"
    assert await publish_status(after, NEW_PUBLISH) == {"front": 200, "aiohttp": 200, "expect": 200}
    for client in (ws, held, ws2):
        assert (await recv_until(client, "message"))["channel"] == "room:lobby"
    for client in (ws, held, ws2):
        await client.close()


async def test_a_refused_key_is_logged_once_per_interval_without_the_key(
    node: RunningNode, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A backend or admin tool left on a key no longer configured (a rotation
    whose previous key was dropped too soon) shows in the node's log, not only
    in herald_api_publishes_total: one line per interval, naming who sent it
    but no key."""
    caplog.set_level(logging.WARNING, logger="herald.http")
    assert await publish_status(node, "a-stale-publish-key") == {"front": 401, "aiohttp": 401, "expect": 401}
    assert await admin_status(http, node, "a-stale-admin-key") == (401, 401)
    lines = [r.getMessage() for r in caplog.records if r.name == "herald.http"]
    assert lines == [
        "refused POST /api/publish from 127.0.0.1: missing or wrong publish key",
        "refused GET /api/stats from 127.0.0.1: missing or wrong admin key",
        "refused POST /api/disconnect from 127.0.0.1: missing or wrong admin key",
    ], lines
    assert not any("stale" in text for text in caplog.text.splitlines())


@pytest.mark.parametrize("shape", PATHS)
async def test_a_refused_key_is_logged_with_the_client_behind_a_trusted_proxy(
    node_factory: NodeFactory, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture, shape: str
) -> None:
    """The refused key's line names the client as the rest of the node does
    (http.trusted_proxies: the address X-Forwarded-For gives), on every path
    of a publish; the first line of an interval is the one logged."""
    node = await node_factory(http={"trusted_proxies": ["127.0.0.0/8"]})
    caplog.set_level(logging.WARNING, logger="herald.http")
    forwarded = b"X-Forwarded-For: 198.51.100.7\r\n"
    assert await publish_status(node, "a-stale-key", (shape,), forwarded) == {shape: 401}
    more = {"X-Forwarded-For": "198.51.100.8"}
    assert await admin_status(http, node, "a-stale-key", more) == (401, 401)
    lines = [r.getMessage() for r in caplog.records if r.name == "herald.http"]
    assert lines == [
        "refused POST /api/publish from 198.51.100.7: missing or wrong publish key",
        "refused GET /api/stats from 198.51.100.8: missing or wrong admin key",
        "refused POST /api/disconnect from 198.51.100.8: missing or wrong admin key",
    ], lines
