"""Webhooks for users who did not get their messages live: a real nats-server,
a real node (presence, read positions), dispatchers and a real aiohttp
receiver on local ports."""

from __future__ import annotations

import asyncio
import collections
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import nats
import nats.js.errors
import orjson
import pytest
from aiohttp import web

import broker.hooks
import gateway.hooks
from broker.embedded import NatsServer, free_port
from broker.throttle import Throttle
from gateway.hooks import Dispatcher, verify
from gateway.settings import Settings, with_overrides

from ..helpers import (
    PUBLISH_HEADERS,
    RunningNode,
    api_publish,
    cli_env,
    make_settings,
    recv_json,
    scrape,
    start_node,
    token,
    wait_for,
)

SECRET = "hook-secret-0123456789"


@dataclass
class Receiver:
    """A webhook endpoint on a local port; ``answers`` scripts its replies in turn (then 200)."""

    url: str = ""
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # time.monotonic() of each request
    answers: list[int | str | float] = field(default_factory=list)  # status, "hang", or seconds then 200

    def ids(self) -> list[str]:
        return [h["Herald-Delivery-Id"] for h, _ in self.requests]

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        self.times.append(time.monotonic())
        answer = self.answers.pop(0) if self.answers else 200
        if answer == "hang":
            await asyncio.sleep(3600)
        if isinstance(answer, float):
            await asyncio.sleep(answer)
            answer = 200
        headers = {"Retry-After": "1"} if answer == 429 else {"Location": "/moved"} if answer in (301, 302, 303) else {}
        return web.Response(status=int(answer), text="ok" if answer == 200 else "no", headers=headers)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/hook", r.handle)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    r.url = f"http://127.0.0.1:{port}/hook"
    yield r
    await runner.cleanup()


def hook_settings(node: RunningNode, url: str, **hooks: Any) -> Settings:
    values = {"url": url, "secret": SECRET, "offline_after": 0.0, "max_backoff": 0.3, "timeout": 1.0, **hooks}
    return with_overrides(node.settings, hooks=values)


@pytest.fixture
async def dispatchers() -> AsyncIterator[Callable[[Settings], Dispatcher]]:
    """``start(settings)`` runs a dispatcher in a task until the test ends."""
    running: list[asyncio.Task[None]] = []

    def start(settings: Settings) -> Dispatcher:
        d = Dispatcher(settings)
        running.append(asyncio.create_task(d.run()))
        return d

    yield start
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


async def consumer_ready(nats_server: NatsServer, settings: Settings) -> None:
    """The durable consumer exists (it only takes messages published after it)."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()

    async def exists() -> bool:
        try:
            await js.consumer_info(settings.stream.name, f"{settings.stream.name}_hooks")
            return True
        except nats.errors.Error:
            return False

    try:
        await wait_for(exists, timeout=10, interval=0.05)
    finally:
        await nc.close()


async def test_offline_user_gets_one_signed_webhook_online_user_none(
    node: RunningNode, http: aiohttp.ClientSession, receiver: Receiver, dispatchers: Any, nats_server: NatsServer
) -> None:
    settings = hook_settings(node, receiver.url, offline_after=0.5)
    dispatcher = dispatchers(settings)
    await consumer_ready(nats_server, settings)
    online = await http.ws_connect(node.ws_url, params={"token": token("bob")})
    assert (await recv_json(online))["type"] == "welcome"

    to_bob = await api_publish(http, node, "user:bob", {"text": "you are here"})
    to_carol = await api_publish(http, node, "user:carol", {"text": "you are away"})
    await wait_for(lambda: receiver.requests, timeout=10)
    await asyncio.sleep(1.5)  # bob's would have come by now, and a second carol one
    assert receiver.ids() == [to_carol]
    headers, body = receiver.requests[0]
    assert verify(SECRET, headers["Herald-Signature"], body)
    doc = orjson.loads(body)
    assert doc["user"] == "carol" and doc["channel"] == "user:carol" and doc["id"] == to_carol
    assert doc["data"] == {"text": "you are away"} and doc["event"] == "message" and doc["timestamp"].endswith("Z")
    counts = dispatcher.metrics.deliveries
    assert counts.labels("delivered")._value.get() == 1
    assert counts.labels("skipped_online")._value.get() == 1
    assert to_bob not in receiver.ids()
    await online.close()


async def test_a_message_read_before_the_delay_is_not_sent(
    node: RunningNode, http: aiohttp.ClientSession, receiver: Receiver, dispatchers: Any, nats_server: NatsServer
) -> None:
    settings = hook_settings(node, receiver.url, offline_after=1.5)
    dispatchers(settings)
    await consumer_ready(nats_server, settings)
    first = await api_publish(http, node, "user:dora", {"n": 1})
    ws = await http.ws_connect(node.ws_url, params={"token": token("dora")})  # the inbox brings it
    await recv_json(ws)
    assert (await recv_json(ws))["id"] == first
    await ws.send_json({"type": "read", "id": first, "ref": "r"})
    assert (await recv_json(ws))["type"] == "ack"
    await ws.close()
    second = await api_publish(http, node, "user:dora", {"n": 2})
    await wait_for(lambda: receiver.requests, timeout=10)
    await asyncio.sleep(0.5)
    assert receiver.ids() == [second]


async def test_unread_after_sends_what_an_online_user_left_unread(
    node: RunningNode, http: aiohttp.ClientSession, receiver: Receiver, dispatchers: Any, nats_server: NatsServer
) -> None:
    settings = hook_settings(node, receiver.url, unread_after=1.0)
    dispatchers(settings)
    await consumer_ready(nats_server, settings)
    ws = await http.ws_connect(node.ws_url, params={"token": token("jo")})
    await recv_json(ws)
    read = await api_publish(http, node, "user:jo", "seen")
    assert (await recv_json(ws))["id"] == read
    await ws.send_json({"type": "read", "id": read})
    unread = await api_publish(http, node, "user:jo", "not seen")
    await wait_for(lambda: receiver.requests, timeout=10)
    await asyncio.sleep(1.5)
    assert receiver.ids() == [unread]
    await ws.close()


async def test_retries_after_5xx_then_stops_at_success(
    node: RunningNode,
    http: aiohttp.ClientSession,
    receiver: Receiver,
    dispatchers: Any,
    nats_server: NatsServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Retries are logged (at most once a minute per URL): they were only counted."""
    receiver.answers = [500, 500, 200]
    settings = hook_settings(node, receiver.url)
    dispatcher = dispatchers(settings)
    await consumer_ready(nats_server, settings)
    sent = await api_publish(http, node, "user:erin", "hi")
    await wait_for(lambda: len(receiver.requests) >= 3, timeout=15)
    await asyncio.sleep(1.5)
    assert receiver.ids() == [sent] * 3  # twice refused, once delivered, never again
    assert dispatcher.metrics.deliveries.labels("retried")._value.get() == 2
    assert dispatcher.metrics.deliveries.labels("delivered")._value.get() == 1
    said = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"webhook to {receiver.url} failed (HTTP 500): retrying")


async def test_credentials_in_the_url_are_not_logged(
    node: RunningNode,
    http: aiohttp.ClientSession,
    receiver: Receiver,
    dispatchers: Any,
    nats_server: NatsServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A receiver behind basic auth (https://user:password@host/...): the
    retry warning names the URL without them, as the connect hook's do."""
    receiver.answers = [500, 200]
    with_credentials = receiver.url.replace("http://", "http://herald:s3cret-password@", 1)
    settings = hook_settings(node, with_credentials)
    dispatchers(settings)
    await consumer_ready(nats_server, settings)
    await api_publish(http, node, "user:hal", "hi")
    await wait_for(lambda: len(receiver.requests) >= 2, timeout=15)
    said = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert said and said[0].startswith(f"webhook to {receiver.url} failed (HTTP 500)"), said
    assert not [r for r in caplog.records if "s3cret-password" in r.getMessage()]


async def test_429_waits_for_retry_after_and_4xx_is_not_retried(
    node: RunningNode, http: aiohttp.ClientSession, receiver: Receiver, dispatchers: Any, nats_server: NatsServer
) -> None:
    receiver.answers = [429, 200, 410]
    settings = hook_settings(node, receiver.url, concurrency=1)
    dispatcher = dispatchers(settings)
    await consumer_ready(nats_server, settings)
    limited = await api_publish(http, node, "user:fay", 1)
    await wait_for(lambda: len(receiver.requests) >= 2, timeout=10)
    gone = await api_publish(http, node, "user:fay", 2)
    await wait_for(lambda: len(receiver.requests) >= 3, timeout=10)
    await asyncio.sleep(1.5)
    assert receiver.ids() == [limited, limited, gone]
    assert dispatcher.metrics.deliveries.labels("rejected")._value.get() == 1
    dead = await dead_letters(nats_server, settings)
    assert [(d["id"], d["reason"]) for d in dead] == [(gone, "HTTP 410")]


async def test_a_redirect_is_not_followed_but_dead_lettered_naming_where(
    node: RunningNode, http: aiohttp.ClientSession, receiver: Receiver, dispatchers: Any, nats_server: NatsServer
) -> None:
    """Followed, a 301/302/303 becomes a GET without the body, whose 200
    would count as delivered: the message would be lost."""
    receiver.answers = [302]
    settings = hook_settings(node, receiver.url, concurrency=1)
    dispatcher = dispatchers(settings)
    await consumer_ready(nats_server, settings)
    moved = await api_publish(http, node, "user:gus", 1)
    await wait_for(lambda: receiver.requests, timeout=10)
    dead = await wait_for_dead_letters(nats_server, settings, 1)
    assert receiver.ids() == [moved] and dispatcher.metrics.deliveries.labels("delivered")._value.get() == 0
    assert [(d["id"], d["reason"]) for d in dead] == [(moved, "HTTP 302: redirected to /moved (set hooks.url to it)")]


async def test_receiver_down_past_the_horizon_is_dead_lettered(
    node: RunningNode, http: aiohttp.ClientSession, dispatchers: Any, nats_server: NatsServer
) -> None:
    closed = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens
    settings = hook_settings(node, closed, horizon=1.5)
    dispatcher = dispatchers(settings)
    await consumer_ready(nats_server, settings)
    sent = await api_publish(http, node, "user:gus", {"x": 1})
    await wait_for(lambda: dispatcher.metrics.deliveries.labels("dead")._value.get() == 1, timeout=15)
    assert dispatcher.metrics.deliveries.labels("retried")._value.get() >= 2
    dead = await dead_letters(nats_server, settings)
    assert len(dead) == 1 and dead[0]["id"] == sent and dead[0]["user"] == "gus"
    assert "ClientConnectorError" in dead[0]["reason"] and int(dead[0]["attempts"]) >= 3
    assert orjson.loads(dead[0]["data"]) == {"x": 1}


async def test_refused_messages_near_max_payload_are_dead_lettered_once(
    node: RunningNode, receiver: Receiver, dispatchers: Any, nats_server: NatsServer
) -> None:
    """The record used to hold the payload as an escaped JSON string: one of
    an 800 KB message (under NATS's 1 MB max_payload) was refused by NATS,
    and the message POSTed again every ack_wait, forever, counted as
    rejected each time. The payload is kept as it is now, cut (and marked)
    only if the record's headers would take it over max_payload."""
    receiver.answers = [410, 410]
    settings = hook_settings(node, receiver.url, concurrency=1)
    dispatcher = dispatchers(settings)
    await consumer_ready(nats_server, settings)
    nc = await nats.connect(nats_server.url)
    try:
        quoted = orjson.dumps(["x"] * 200_000)  # 800 KB: each '"' escaped in a JSON string
        edge = b'"' + b"y" * (nc.max_payload - 300) + b'"'  # fits, but not with the record's headers
        acks = [await nc.jetstream().publish(f"{settings.subject.prefix}.user.big", data) for data in (quoted, edge)]
    finally:
        await nc.close()
    dead = await wait_for_dead_letters(nats_server, settings, 2)
    await asyncio.sleep(3.5)  # ack_wait is 3 s: an unanswered message would be back by now
    assert receiver.ids() == [str(a.seq) for a in acks] == [d["id"] for d in dead]
    assert dispatcher.metrics.deliveries.labels("rejected")._value.get() == 2
    assert dead[0]["data"] == quoted and "truncated" not in dead[0]
    assert edge.startswith(dead[1]["data"]) and int(dead[1]["truncated"]) == len(edge)
    assert dead[1]["reason"] == "HTTP 410" and dead[1]["user"] == "big" and dead[1]["stream"]


async def test_a_deleted_dead_letter_stream_is_made_again(
    node: RunningNode, http: aiohttp.ClientSession, receiver: Receiver, dispatchers: Any, nats_server: NatsServer
) -> None:
    """An operator deletes <stream>_HOOKS_DEAD (done with its records) while
    a dispatcher runs: the next refused message used to find no stream and
    be POSTed again every ack_wait, forever."""
    settings = hook_settings(node, receiver.url)
    dispatcher = dispatchers(settings)
    await wait_for(lambda: dispatcher.source.ready, timeout=15)
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().delete_stream(f"{settings.stream.name}_HOOKS_DEAD")
    finally:
        await nc.close()
    receiver.answers = [410]
    sent = await api_publish(http, node, "user:gone", {"x": 1})
    dead = await wait_for_dead_letters(nats_server, settings, 1)
    await asyncio.sleep(3.5)  # ack_wait is 3 s
    assert receiver.ids() == [sent] and [d["id"] for d in dead] == [sent]


async def test_two_dispatchers_send_each_message_once(
    node: RunningNode, http: aiohttp.ClientSession, receiver: Receiver, dispatchers: Any, nats_server: NatsServer
) -> None:
    settings = hook_settings(node, receiver.url)
    first, second = dispatchers(settings), dispatchers(settings)
    await consumer_ready(nats_server, settings)
    sent = [await api_publish(http, node, f"user:u{i % 7}", i) for i in range(40)]
    await wait_for(lambda: len(receiver.requests) >= 40, timeout=15)
    await asyncio.sleep(1.0)
    assert sorted(receiver.ids(), key=int) == sent
    assert collections.Counter(receiver.ids()).most_common(1)[0][1] == 1
    per = [d.metrics.deliveries.labels("delivered")._value.get() for d in (first, second)]
    assert sum(per) == 40


async def test_a_message_whose_lookups_were_slow_is_not_sent_twice(
    node: RunningNode, http: aiohttp.ClientSession, receiver: Receiver, dispatchers: Any, nats_server: NatsServer
) -> None:
    # ack_wait is 2 x timeout + 1 s = 3 s. Lookups that take 2.5 s (NATS slow:
    # a leader election) and a POST of 0.9 s end past it: JetStream hands the
    # message out again unless the dispatcher said it was still on it.
    settings = hook_settings(node, receiver.url, timeout=1.0)
    dispatcher = dispatchers(settings)
    looked_up = dispatcher.source.online

    async def slow_online(user: str) -> bool:
        await asyncio.sleep(2.5)
        return await looked_up(user)

    dispatcher.source.online = slow_online  # type: ignore[method-assign]
    await consumer_ready(nats_server, settings)
    receiver.answers = [0.9, 0.9]
    sent = await api_publish(http, node, "user:slow", 1)
    await wait_for(lambda: receiver.requests, timeout=10)
    await asyncio.sleep(3.5)  # a second copy would have been handed out at 3 s, POSTed at 5.5 s
    assert receiver.ids() == [sent]


async def test_lookups_bind_no_bucket_and_list_no_nodes_per_message(
    node: RunningNode, http: aiohttp.ClientSession, receiver: Receiver, dispatchers: Any, nats_server: NatsServer
) -> None:
    # Each message's checks (is the user online, what has it read) read the
    # nodes' buckets. Bound per message, that is two STREAM.INFO; the live
    # nodes listed per message, a consumer made (on a cluster, a proposal of
    # its meta leader) for every webhook to an online user.
    settings = hook_settings(node, receiver.url, unread_after=0.5)
    dispatchers(settings)
    await consumer_ready(nats_server, settings)
    online = await http.ws_connect(node.ws_url, params={"token": token("here")})  # a table, on a live node
    assert (await recv_json(online))["type"] == "welcome"
    await api_publish(http, node, "user:here", 0)
    await wait_for(lambda: receiver.requests, timeout=10)  # the buckets are bound, the nodes listed once
    nc = await nats.connect(nats_server.url)
    kv_streams = f"KV_{settings.stream.name}_"
    asked: collections.Counter[str] = collections.Counter()

    async def count(msg: Any) -> None:
        api = msg.subject.split(".")
        if api[2] == "STREAM" and api[3] == "INFO" and api[4].startswith(kv_streams):
            asked["bind"] += 1
        if api[2] == "CONSUMER" and api[3] == "CREATE" and api[4] == f"{kv_streams}nodes":
            asked["list nodes"] += 1

    await nc.subscribe("$JS.API.>", cb=count)  # the same account sees every JetStream request
    await nc.flush()
    items = [{"channel": "user:here" if i % 2 else f"user:away{i}", "data": i} for i in range(1, 41)]
    async with http.post(node.url + "/api/publish", json=items, headers=PUBLISH_HEADERS) as resp:
        assert resp.status == 200
    await wait_for(lambda: len(receiver.requests) >= 41, timeout=15)
    await nc.close()
    await online.close()
    # The node lists the nodes too: about once a second (presence.ttl / 3) and on connects.
    assert asked["bind"] == 0 and asked["list nodes"] <= 6, asked


async def test_a_killed_dispatchers_message_is_sent_after_restart_with_the_same_id(
    node: RunningNode,
    http: aiohttp.ClientSession,
    receiver: Receiver,
    dispatchers: Any,
    nats_server: NatsServer,
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    settings = hook_settings(node, receiver.url)
    receiver.answers = ["hang"]  # the first request never gets its answer
    proc = spawn(["hooks"], dispatcher_env(settings, nats_server))
    await consumer_ready(nats_server, settings)
    sent = await api_publish(http, node, "user:hal", {"important": True})
    await wait_for(lambda: receiver.requests, timeout=10)
    proc.send_signal(signal.SIGKILL)  # mid-delivery: nothing acked
    proc.wait()
    dispatchers(settings)  # its replacement
    await wait_for(lambda: len(receiver.requests) >= 2, timeout=15)  # after ack_wait (2 x timeout + 1 s)
    await asyncio.sleep(0.5)
    assert receiver.ids() == [sent, sent]
    assert verify(SECRET, receiver.requests[1][0]["Herald-Signature"], receiver.requests[1][1])


async def test_herald_hooks_needs_a_url_and_a_secret() -> None:
    for env in ({}, {"HERALD_HOOKS_URL": "http://127.0.0.1:9/h"}):
        proc = await asyncio.create_subprocess_exec(
            *cli_env_command(), "hooks", env=cli_env(**env), stderr=asyncio.subprocess.PIPE
        )
        _, err = await proc.communicate()
        assert proc.returncode == 2 and b"hooks." in err, err


async def test_herald_hooks_says_it_waits_for_nats(spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    """Started before NATS is up, it says so (nats-py retries that first connect silently)."""
    closed = f"nats://127.0.0.1:{free_port()}"
    proc = spawn(
        ["hooks"], cli_env(HERALD_NATS_URLS=closed, HERALD_HOOKS_URL="http://127.0.0.1:9/h", HERALD_HOOKS_SECRET="s")
    )

    def said() -> bool:
        return "NATS at" in proc.err_path.read_text() + proc.out_path.read_text()  # type: ignore[attr-defined]

    await wait_for(said, timeout=10, interval=0.2)


async def test_metrics_port_serves_webhook_metrics(
    node: RunningNode, http: aiohttp.ClientSession, receiver: Receiver, nats_server: NatsServer, spawn: Any
) -> None:
    settings = hook_settings(node, receiver.url)
    port = free_port()
    spawn(["hooks"], dispatcher_env(settings, nats_server, HERALD_HOOKS_METRICS_PORT=str(port)))
    await consumer_ready(nats_server, settings)
    await api_publish(http, node, "user:ivy", 1)
    await wait_for(lambda: receiver.requests, timeout=10)

    async def counted() -> bool:
        try:
            metrics = await scrape(http, f"http://127.0.0.1:{port}")
        except aiohttp.ClientError:
            return False
        return metrics.get('herald_webhook_deliveries_total{result="delivered"}') == 1

    await wait_for(counted, timeout=10, interval=0.2)
    metrics = await scrape(http, f"http://127.0.0.1:{port}")
    assert "herald_webhook_queue_depth" in metrics and "herald_webhook_latency_seconds_count" in metrics


def cli_env_command() -> list[str]:
    import sys

    return [sys.executable, "-m", "gateway"]


def dispatcher_env(settings: Settings, nats_server: NatsServer, **extra: str) -> dict[str, str]:
    h = settings.hooks
    return cli_env(
        HERALD_NATS_URLS=nats_server.url,
        HERALD_SUBJECT_PREFIX=settings.subject.prefix,
        HERALD_STREAM_NAME=settings.stream.name,
        HERALD_HOOKS_URL=h.url,
        HERALD_HOOKS_SECRET=h.secret,
        HERALD_HOOKS_OFFLINE_AFTER=str(h.offline_after),
        HERALD_HOOKS_TIMEOUT=str(h.timeout),
        HERALD_HOOKS_MAX_BACKOFF=str(h.max_backoff),
        **extra,
    )


async def dead_letters(nats_server: NatsServer, settings: Settings) -> list[dict[str, Any]]:
    """The dead-letter records: their headers by short name (id, reason, ...) and ``data``, the payload."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        stream = f"{settings.stream.name}_HOOKS_DEAD"
        info = await js.stream_info(stream)
        out = []
        for seq in range(1, (info.state.last_seq or 0) + 1):
            msg = await js.get_msg(stream, seq)
            fields = {k.removeprefix("Herald-").lower(): v for k, v in (msg.headers or {}).items()}
            out.append({**fields, "id": fields.pop("delivery-id", ""), "data": msg.data})
        return out
    finally:
        await nc.close()


# -- the dispatcher's life: started before the stream, the stream recreated ------------

HOOKS = {"secret": SECRET, "offline_after": 0.0, "max_backoff": 0.3, "timeout": 1.0}


async def test_a_dispatcher_started_before_the_stream_waits_then_delivers(
    nats_server: NatsServer, http: aiohttp.ClientSession, receiver: Receiver, dispatchers: Any
) -> None:
    settings = with_overrides(make_settings(nats_server.url), hooks={"url": receiver.url, **HOOKS})
    dispatcher = dispatchers(settings)
    await asyncio.sleep(3.0)  # the nodes come up later
    assert not dispatcher.source.ready
    assert dispatcher.metrics.registry.get_sample_value("herald_webhook_dispatcher_ready") == 0.0
    node = await start_node(settings)
    try:
        await wait_for(lambda: dispatcher.source.ready, timeout=15)
        sent = await api_publish(http, node, "user:carol", {"text": "while you were away"})
        await wait_for(lambda: receiver.requests, timeout=15)
        assert receiver.ids() == [sent]
    finally:
        await node.stop()


async def test_a_recreated_stream_is_bound_again_and_old_read_positions_do_not_silence_it(
    nats_server: NatsServer, http: aiohttp.ClientSession, receiver: Receiver, dispatchers: Any
) -> None:
    settings = with_overrides(make_settings(nats_server.url), hooks={"url": receiver.url, **HOOKS})
    node = await start_node(settings)
    dispatcher = dispatchers(settings)
    try:
        await wait_for(lambda: dispatcher.source.ready, timeout=15)
        # dora reads up to 5 while online: nothing is sent for those.
        async with http.ws_connect(node.ws_url, params={"token": token("dora")}) as ws:
            await recv_json(ws)
            ids = [await api_publish(http, node, "user:dora", {"n": i}) for i in range(5)]
            for _ in ids:
                await recv_json(ws)
            await ws.send_json({"type": "read", "id": ids[-1]})
            assert (await recv_json(ws))["id"] == ids[-1]
    finally:
        await node.stop()
    nc = await nats.connect(nats_server.url)
    await nc.jetstream().delete_stream(settings.stream.name)  # under the running dispatcher
    await nc.close()
    await wait_for(lambda: not dispatcher.source.ready, timeout=15)

    node = await start_node(settings)  # a node makes the stream again: ids start over
    try:
        sent = await api_publish(http, node, "user:dora", {"text": "after the recreation"})
        assert int(sent) <= int(ids[-1])  # below the old read position
        await wait_for(lambda: sent in receiver.ids(), timeout=20)
        assert dispatcher.source.ready
    finally:
        await node.stop()


async def wait_for_dead_letters(nats_server: NatsServer, settings: Settings, n: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    async def enough() -> bool:
        try:
            found[:] = await dead_letters(nats_server, settings)
        except nats.js.errors.NotFoundError:  # not made yet
            return False
        return len(found) >= n

    await wait_for(enough, timeout=10, interval=0.2)
    return found


async def test_a_longer_timeout_lengthens_the_shared_consumer_s_ack_wait(
    node: RunningNode, receiver: Receiver, dispatchers: Any, nats_server: NatsServer
) -> None:
    """The consumer a dispatcher with timeout 1 s made keeps JetStream from
    handing a message out again for 3 s: one restarted with timeout 6 s
    (a POST may take that long) lengthens it, or a slow POST would be sent
    a second time while the first is in flight."""
    first = dispatchers(hook_settings(node, receiver.url, timeout=1.0))
    await wait_for(lambda: first.source.ready, timeout=15)
    second = dispatchers(hook_settings(node, receiver.url, timeout=6.0))
    await wait_for(lambda: second.source.ready, timeout=15)
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jetstream().consumer_info(node.settings.stream.name, f"{node.settings.stream.name}_hooks")
        assert info.config.ack_wait == 13.0  # 2 x timeout + 1
    finally:
        await nc.close()


async def test_not_ready_while_nats_is_away_and_it_says_it_waits(
    receiver: Receiver, dispatchers: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker.hooks, "warn", Throttle(broker.hooks.log))  # not muted by another test's outage
    server = NatsServer(port=free_port()).start()
    try:
        settings = with_overrides(make_settings(server.url), hooks={"url": receiver.url, **HOOKS})
        node = await start_node(settings)
        dispatcher = dispatchers(settings)
        await wait_for(lambda: dispatcher.source.ready, timeout=15)
        await node.stop()
        server.stop()
        await wait_for(lambda: not dispatcher.source.ready, timeout=10)
        assert dispatcher.metrics.registry.get_sample_value("herald_webhook_dispatcher_ready") == 0.0
        await wait_for(lambda: any("lost NATS" in r.getMessage() for r in caplog.records), timeout=10)
    finally:
        server.cleanup()


async def test_a_stream_recreated_while_no_dispatcher_ran_is_read_from_its_start(
    nats_server: NatsServer, http: aiohttp.ClientSession, receiver: Receiver, dispatchers: Any
) -> None:
    """A dispatcher starting on a stream other than the one the dispatchers
    last consumed (the dead-letter stream's metadata names it) reads it from
    its first message: what was published before it started is sent."""
    settings = with_overrides(make_settings(nats_server.url), hooks={"url": receiver.url, **HOOKS})
    node = await start_node(settings)
    first = Dispatcher(settings)
    task = asyncio.create_task(first.run())
    await wait_for(lambda: first.source.ready, timeout=15)
    old = await api_publish(http, node, "user:sam", {"text": "before"})
    await wait_for(lambda: receiver.ids() == [old], timeout=10)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await node.stop()
    nc = await nats.connect(nats_server.url)
    await nc.jetstream().delete_stream(settings.stream.name)
    await nc.close()
    node = await start_node(settings)  # the stream made again, no dispatcher running
    try:
        sent = await api_publish(http, node, "user:sam", {"text": "while no dispatcher ran"})
        assert sent == old  # numbered from 1 again
        dispatcher = dispatchers(settings)
        await wait_for(lambda: dispatcher.source.ready, timeout=15)
        await wait_for(lambda: receiver.ids() == [old, sent], timeout=10)
        later = await api_publish(http, node, "user:sam", {"text": "after"})
        await wait_for(lambda: receiver.ids() == [old, sent, later], timeout=10)  # once each
        # Herald-Stream tells the two "1"s apart: deduplicating on the pair keeps both.
        pairs = [(h["Herald-Stream"], h["Herald-Delivery-Id"]) for h, _ in receiver.requests]
        assert len(set(pairs)) == 3 and pairs[0][0] != pairs[1][0] == pairs[2][0] != ""
    finally:
        await node.stop()


async def test_sigterm_while_nats_is_away_exits_cleanly(
    http: aiohttp.ClientSession, receiver: Receiver, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """Closing a client whose server is gone used to raise (uvloop's closed
    transport): ``herald hooks`` exited 1 with a traceback on SIGTERM, and
    nats-py's tasks were destroyed pending."""
    server = NatsServer(port=free_port()).start()
    try:
        settings = with_overrides(make_settings(server.url), hooks={"url": receiver.url, **HOOKS})
        node = await start_node(settings)
        proc = spawn(["hooks"], dispatcher_env(settings, server))
        await consumer_ready(server, settings)
        await node.stop()
        server.kill()
        await asyncio.sleep(2.0)  # it notices, and goes on asking a server that is not there
        proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: proc.poll() is not None, timeout=15, interval=0.1)
        err = proc.err_path.read_text()  # type: ignore[attr-defined]
        assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
    finally:
        server.cleanup()


async def test_a_clean_stop_does_not_say_nats_was_lost(
    node: RunningNode, receiver: Receiver, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its own close disconnects it: that used to log "lost NATS" at every shutdown."""
    monkeypatch.setattr(broker.hooks, "warn", Throttle(broker.hooks.log))  # not muted by another test's outage
    dispatcher = Dispatcher(hook_settings(node, receiver.url))
    task = asyncio.create_task(dispatcher.run())
    await wait_for(lambda: dispatcher.source.ready, timeout=15)
    dispatcher.stop(task)
    await asyncio.gather(task, return_exceptions=True)
    assert not [r for r in caplog.records if "lost NATS" in r.getMessage()]


async def test_waits_that_fill_max_ack_pending_are_shown_and_raising_it_ends_the_stall(
    node: RunningNode,
    receiver: Receiver,
    dispatchers: Any,
    nats_server: NatsServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A message waiting for its retry (a delayed nak) keeps its place in the
    shared consumer's max_ack_pending. It was a fixed 10,000: a backlog on
    one failing route stopped every other webhook, and nothing showed it. It
    is hooks.max_ack_pending now, a full one is in the gauges and the log,
    and a dispatcher started with a larger one raises it."""
    monkeypatch.setattr(gateway.hooks, "warn", Throttle(gateway.hooks.log))  # not muted by another test
    dead_route = f"sms.*=http://127.0.0.1:{free_port()}/sms"  # nothing listens: retried with backoff
    settings = hook_settings(node, receiver.url, routes=[dead_route], max_backoff=600.0, max_ack_pending=20)
    first = dispatchers(settings)
    await consumer_ready(nats_server, settings)
    nc = await nats.connect(nats_server.url)
    try:
        js, user = nc.jetstream(), f"{settings.subject.prefix}.user"
        for i in range(20):
            await js.publish(f"{user}.texter", b"%d" % i, headers={"Herald-Event": "sms.send"})

        def gauge(name: str) -> float | None:
            return first.metrics.registry.get_sample_value(name)

        await wait_for(lambda: gauge("herald_webhook_ack_pending") == 20, timeout=10, interval=0.2)
        assert gauge("herald_webhook_ack_pending_limit") == 20
        assert any("webhooks stalled" in r.getMessage() for r in caplog.records)
        mail = await js.publish(f"{user}.mailer", b"{}", headers={"Herald-Event": "mail.send"})
        await asyncio.sleep(2.0)
        assert receiver.ids() == []  # a healthy route, held up by the other's waits
        dispatchers(with_overrides(settings, hooks={"max_ack_pending": 40}))
        await wait_for(lambda: receiver.ids() == [str(mail.seq)], timeout=15, interval=0.2)
    finally:
        await nc.close()


async def test_waits_for_offline_after_hold_no_place_in_max_ack_pending(
    node: RunningNode, http: aiohttp.ClientSession, receiver: Receiver, dispatchers: Any, nats_server: NatsServer
) -> None:
    """A message younger than offline_after used to be handed back at once
    with a delayed nak, which kept its place in max_ack_pending for the whole
    wait: above max_ack_pending / offline_after messages a second (100 here)
    the shared consumer sat at its limit — "webhooks stalled" in the log,
    HeraldWebhooksStalling firing, no new message handed out on any route
    until a wait ended — though no receiver failed. The stream is in time
    order: a dispatcher now waits for the message it holds to fall due, and
    holds only what it fetched and what it is sending."""
    settings = hook_settings(node, receiver.url, offline_after=1.0, max_ack_pending=100, concurrency=16)
    dispatchers(settings)
    await consumer_ready(nats_server, settings)
    nc = await nats.connect(nats_server.url)
    js, stream = nc.jetstream(), settings.stream.name
    held: list[int] = []

    async def watch() -> None:
        while True:
            held.append((await js.consumer_info(stream, f"{stream}_hooks")).num_ack_pending)
            await asyncio.sleep(0.05)

    published: dict[str, float] = {}
    watching = asyncio.create_task(watch())
    start = time.monotonic()
    try:
        for b in range(40):  # 400 messages a second for 2 s, to 800 offline users
            items = [{"channel": f"user:away{b}-{i}", "data": i} for i in range(20)]
            async with http.post(node.url + "/api/publish", json=items, headers=PUBLISH_HEADERS) as resp:
                assert resp.status == 200
                published |= {str(i): time.monotonic() for i in (await resp.json())["ids"]}
            await asyncio.sleep(max(0.0, start + (b + 1) * 0.05 - time.monotonic()))
        await wait_for(lambda: len(receiver.requests) >= 800, timeout=30, interval=0.05)
    finally:
        watching.cancel()
        await nc.close()
    waited = [t - published[i] for i, t in zip(receiver.ids(), receiver.times, strict=True)]
    rate = 799 / (receiver.times[-1] - receiver.times[0])
    print(f"POSTed {rate:.0f}/s, {min(waited):.2f} to {max(waited):.2f} s after publishing, held at most {max(held)}")
    assert sorted(receiver.ids(), key=int) == sorted(published, key=int)  # each once
    # None before offline_after; none held up: at the consumer's limit (the defect), 800 took 8 s to
    # hand out. Not 2 s: on two busy cores the POSTs alone ran at 160-215/s (3.0-3.9 s seen).
    assert min(waited) > 0.9 and max(waited) < 5.0
    assert max(held) <= 40  # fetched + in flight (2 x concurrency), not rate x offline_after (400)


async def test_sigterm_while_waiting_exits_at_once_and_another_sends_it(
    node: RunningNode,
    http: aiohttp.ClientSession,
    receiver: Receiver,
    dispatchers: Any,
    nats_server: NatsServer,
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    """A dispatcher waiting for a message to fall due stops promptly; the
    message is handed back, and the next dispatcher sends it when due, with
    the same Herald-Delivery-Id."""
    settings = hook_settings(node, receiver.url, offline_after=4.0)
    proc = spawn(["hooks"], dispatcher_env(settings, nats_server))
    await consumer_ready(nats_server, settings)
    sent = await api_publish(http, node, "user:quinn", {"n": 1})
    published = time.monotonic()
    nc = await nats.connect(nats_server.url)
    try:
        js, stream = nc.jetstream(), settings.stream.name

        async def taken() -> bool:
            return (await js.consumer_info(stream, f"{stream}_hooks")).num_ack_pending == 1

        await wait_for(taken, timeout=10, interval=0.1)  # the dispatcher holds it, waiting
    finally:
        await nc.close()
    proc.send_signal(signal.SIGTERM)
    stopping = time.monotonic()
    await wait_for(lambda: proc.poll() is not None, timeout=10, interval=0.05)
    assert time.monotonic() - stopping < 3.0 and proc.returncode == 0  # not offline_after (4 s)
    assert receiver.requests == []
    dispatchers(settings)  # its replacement
    await wait_for(lambda: receiver.requests, timeout=15)
    assert receiver.times[0] - published >= 4.0 - 0.1  # when due, not at once
    await asyncio.sleep(1.0)
    assert receiver.ids() == [sent]
    assert verify(SECRET, receiver.requests[0][0]["Herald-Signature"], receiver.requests[0][1])
