"""nats-py closes a connection for good (no reconnect) on most of the
server's -ERRs: maximum subscriptions or connections exceeded, an
authorization violation... The webhook dispatcher and NatsPublisher must not
stay without NATS afterwards. (The node: tests/system/test_nats_closed.py.)

Here the -ERR is provoked on the client's own connection (subscriptions past
the server's max_subscriptions): the one way to single out one client."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import nats
import pytest

from broker import BrokerUnavailable
from broker.embedded import NatsServer
from broker.publisher import NatsPublisher
from gateway.hooks import Dispatcher
from gateway.settings import with_overrides

from ..helpers import ADMIN_KEY, PUBLISH_HEADERS, SECRET, api_publish, make_settings, start_node, wait_for

# Fewer than a node or a dispatcher takes; the test adds its own past it.
MAX_SUBSCRIPTIONS = 40


@pytest.fixture
def limited_server(tmp_path: Path) -> Iterator[NatsServer]:
    config = tmp_path / "nats.conf"
    config.write_text(f"max_subscriptions: {MAX_SUBSCRIPTIONS}\n")
    with NatsServer(store_dir=str(tmp_path / "js"), config_file=str(config)) as server:
        yield server


async def exceed_subscriptions(nc: object, closed: bool = True) -> None:
    """Make the server answer ``nc`` -ERR "maximum subscriptions exceeded"
    (and, if ``closed``, wait until nats-py closed the connection for it)."""
    for n in range(MAX_SUBSCRIPTIONS + 1):
        await nc.subscribe(f"past.limit.{n}")  # type: ignore[attr-defined]
    if closed:
        await wait_for(lambda: nc.is_closed, timeout=5)  # type: ignore[attr-defined]


async def test_nats_publisher_connects_anew_after_nats_closed_it(limited_server: NatsServer) -> None:
    settings = make_settings(limited_server.url)
    node = await start_node(settings)
    try:
        prefix, stream = settings.subject.prefix, settings.stream.name
        async with NatsPublisher([limited_server.url], prefix, stream, attempts=3, backoff=0.1) as pub:
            first = await pub.publish("room:lobby", b"1")
            await exceed_subscriptions(pub._broker._link.nc)
            assert await pub.publish("room:lobby", b"2") == first + 1
    finally:
        await node.stop()


async def test_the_dispatcher_ends_when_nats_closed_it(limited_server: NatsServer) -> None:
    """Not ready, waiting for a reconnect nats-py never makes, as it was: its
    run ends with BrokerUnavailable, and ``herald hooks`` exits 1 (cli)."""
    settings = with_overrides(make_settings(limited_server.url), hooks={"url": "http://127.0.0.1:9/", "secret": SECRET})
    node = await start_node(settings)
    dispatcher = Dispatcher(settings)
    task = asyncio.create_task(dispatcher.run())
    try:
        await wait_for(lambda: dispatcher.source.ready, timeout=15)
        await exceed_subscriptions(dispatcher.source._nc)
        with pytest.raises(BrokerUnavailable, match=r"closed for good.*maximum subscriptions exceeded"):
            await asyncio.wait_for(task, timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await node.stop()


async def test_a_publish_waiting_for_its_ack_fails_at_once_when_nats_closed_the_node(
    limited_server: NatsServer,
) -> None:
    """The node drains and exits 1 once NATS closed its connection for good
    (tests/system/test_nats_closed.py); a publish already waiting for its ack
    then waited out nats.publish_timeout (5 s) for an answer that could not
    come, and held the drain, and the exit, as long."""
    settings = make_settings(limited_server.url, nats={"publish_timeout": 5.0})
    node = await start_node(settings)
    nc = await nats.connect(limited_server.url)
    try:
        # No stream to ack it, but a subscriber that hears it (no "no responders"):
        # the publish waits for an ack, as one does when NATS closes mid-way.
        await nc.jetstream().delete_stream(settings.stream.name)
        await nc.subscribe(f"{settings.subject.prefix}.room.held")
        await nc.flush()
        # nats-server may not yet show that interest to another connection
        # (the publish would get "no responders" at once) until that
        # connection made a round trip of its own.
        await node.node.broker._link.nc.flush()  # type: ignore[attr-defined]
        async with aiohttp.ClientSession() as http:
            publish = asyncio.ensure_future(
                http.post(node.url + "/api/publish", json={"channel": "room:held", "data": 1}, headers=PUBLISH_HEADERS)
            )
            await asyncio.sleep(0.5)
            assert not publish.done()
            started = time.monotonic()
            await exceed_subscriptions(node.node.broker._link.nc)  # type: ignore[attr-defined]
            async with await publish as resp:
                answered = time.monotonic() - started
                assert resp.status == 503, await resp.text()
            await node.node.failure.stop.wait()
            await node.node.shutdown()
            await node.stop()
            stopped = time.monotonic() - started
        assert answered < 1.0, f"the publish was answered {answered:.1f}s after NATS closed the connection"
        assert stopped < 2.5, f"the node took {stopped:.1f}s to drain and stop"
    finally:
        await nc.close()
        await node.stop()


async def test_a_history_page_waiting_on_jetstream_fails_at_once_when_nats_closed_the_node(
    limited_server: NatsServer,
) -> None:
    """A page's requests waiting on JetStream (its leader lookup, its direct
    gets, a consumer's) once NATS had closed the connection for good waited
    out their timeout (nats.publish_timeout), and held the drain as long."""
    relay = HeldReplies(limited_server.port)
    await relay.start()
    settings = make_settings(relay.url, nats={"publish_timeout": 5.0})
    node = await start_node(settings)
    try:
        async with aiohttp.ClientSession() as http:
            await api_publish(http, node, "room:held", 1)
            relay.hold()
            await exceed_subscriptions(node.node.broker._link.nc, closed=False)  # type: ignore[attr-defined]
            url = node.url + "/api/history?channel=room:held"
            page = asyncio.ensure_future(http.get(url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}))
            # Its lookup's answer comes after the -ERR: held with it.
            await wait_for(lambda: relay.held is not None and b"MSG " in relay.held.partition(b"-ERR")[2], timeout=5)
            assert not page.done()
            started = time.monotonic()
            relay.release_through(b"-ERR")
            async with await page as resp:
                answered = time.monotonic() - started
                assert resp.status == 503, await resp.text()
        assert answered < 1.0, f"the page was answered {answered:.1f}s after NATS closed the connection"
    finally:
        await node.stop()
        await relay.stop()


async def test_the_dispatchers_waiting_requests_fail_at_once_when_nats_closed_it(limited_server: NatsServer) -> None:
    """The dispatcher's own requests waiting on NATS (a KV read, STREAM.INFO,
    CONSUMER.INFO: nats-py's) waited out their timeout (5 s) once NATS had
    closed its connection for good, and ``herald hooks`` exited only after them."""
    relay = HeldReplies(limited_server.port)
    await relay.start()
    hooks = {"url": "http://127.0.0.1:9/", "secret": SECRET, "offline_after": 0.0, "timeout": 10.0}
    settings = make_settings(limited_server.url)
    node = await start_node(settings)
    dispatcher = Dispatcher(with_overrides(settings, nats={"urls": (relay.url,)}, hooks=hooks))
    task = asyncio.create_task(dispatcher.run())
    try:
        await wait_for(lambda: dispatcher.source.ready, timeout=15)
        assert not await dispatcher.source.online("bob")  # the conns bucket bound
        relay.hold()
        await exceed_subscriptions(dispatcher.source._nc, closed=False)
        asked = asyncio.ensure_future(dispatcher.source.online("bob"))  # a KV read: its answer after the -ERR, held
        await wait_for(lambda: relay.held is not None and b"MSG " in relay.held.partition(b"-ERR")[2], timeout=5)
        started = time.monotonic()
        relay.release_through(b"-ERR")
        with pytest.raises(BrokerUnavailable, match=r"closed for good"):
            await asyncio.wait_for(task, timeout=15)
        with pytest.raises(nats.errors.ConnectionClosedError):
            await asyncio.wait_for(asked, timeout=1)
        ended = time.monotonic() - started
        assert ended < 0.5, f"the dispatcher ended {ended:.1f}s after NATS closed its connection"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await node.stop()
        await relay.stop()


class HeldReplies:
    """A TCP relay to nats-server whose server-to-client bytes can be held
    (``hold``) and let through up to the end of a line (``release_through``):
    a client then reads the server's -ERR but not what the server sent after it."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.held: bytearray | None = None  # None: forwarding
        self._writers: list[asyncio.StreamWriter] = []  # to the client, per connection
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def hold(self) -> None:
        self.held = bytearray()

    def release_through(self, marker: bytes) -> None:
        """Forward what is held up to the end of the line with ``marker``; hold the rest."""
        assert self.held is not None and len(self._writers) == 1
        end = self.held.index(b"\n", self.held.index(marker)) + 1
        self._writers[0].write(bytes(self.held[:end]))
        del self.held[:end]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers.append(writer)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, holds: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(65536):
                    if holds and self.held is not None:
                        self.held += data
                    else:
                        w.write(data)

        try:
            await asyncio.gather(pipe(reader, up_w, False), pipe(up_r, writer, True))
        finally:
            self._writers.remove(writer)
            writer.transport.abort()
            up_w.transport.abort()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()


async def test_a_flush_waiting_for_its_pong_fails_at_once_when_nats_closed_the_node(
    limited_server: NatsServer,
) -> None:
    """A subscribe's confirmation (a PING/PONG round trip: DispatchingClient.confirm)
    whose PONG had not been read when NATS closed the connection for good
    waited out its timeout (nats.publish_timeout) for a PONG nats-py would
    never read, holding the connect that made it as long."""
    relay = HeldReplies(limited_server.port)
    await relay.start()
    settings = make_settings(relay.url, nats={"publish_timeout": 5.0})
    node = await start_node(settings)
    try:
        nc = node.node.broker._link.nc  # type: ignore[attr-defined]
        relay.hold()
        await exceed_subscriptions(nc, closed=False)  # the server's -ERR, held
        confirm = asyncio.create_task(nc.confirm(5))  # its PONG comes after the -ERR, held too
        await wait_for(lambda: relay.held is not None and b"PONG" in relay.held.partition(b"-ERR")[2], timeout=5)
        started = time.monotonic()
        relay.release_through(b"-ERR")
        with pytest.raises(nats.errors.ConnectionClosedError):
            await asyncio.wait_for(confirm, timeout=10)
        failed = time.monotonic() - started
        assert failed < 1.0, f"the flush failed {failed:.1f}s after NATS closed the connection"
    finally:
        await node.stop()
        await relay.stop()
