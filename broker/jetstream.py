"""The NATS / JetStream broker.

One stream captures the input subjects and republishes every stored message to
a live subject; nodes subscribe to live subjects only, so every delivery carries
its stream sequence, the previous sequence on its subject and the store time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
from nats.js.api import DiscardPolicy, RePublish, StreamConfig

from .base import BrokerStats, BrokerUnavailable, RetentionPolicy
from .channels import Subjects
from .connections import KvConnections
from .dispatch import DispatchingClient
from .history import stream_cap
from .kv import storage_type
from .link import NatsLink, close_quietly
from .live import LiveOptions, NatsPubSub
from .presence import KvPresence
from .readmark import stream_id
from .reads import KvReadPositions
from .redact import redacted, redacted_urls
from .relay import NatsRelay
from .roles import BrokerEvents
from .store import NatsHistory, StreamPlace
from .tasks import cancel_and_wait, spawn

log = logging.getLogger("herald.broker")
# How long a close waits for the connections a drain closed to be counted out.
COUNT_OUT_WAIT = 3.0
# JetStream errors that mean "not yet" rather than "no": no leader, no answer.
_NOT_READY = (
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
)

# "no suitable peers for placement": the cluster does not see its peers yet.
_NO_PEERS = 10005


# The stream's limits a node's settings set, and the settings they come from.
_LIMITS = {
    "max_msgs_per_subject": "history.user_max / room_max, rooms.history",
    "max_age": "history.user_max_age / room_max_age, rooms.history",
    "max_bytes": "stream.max_bytes",
    "duplicate_window": "publish.dedup_window",
}


def _log_changes(stream: str, before: StreamConfig, after: StreamConfig) -> None:
    """Say which limits this node's start changed: nodes with other settings
    would change them back when they start."""
    for name, settings in _LIMITS.items():
        old, new = getattr(before, name), getattr(after, name)
        if old != new:
            log.warning(
                "stream %s: %s changed from %s to %s by this node's settings (%s); every node must have the same",
                stream,
                name,
                old,
                new,
                settings,
            )


def _not_ready(exc: BaseException | None) -> bool:
    if isinstance(exc, nats.js.errors.APIError) and exc.err_code == _NO_PEERS:
        return True
    return isinstance(exc, _NOT_READY)


@dataclass(frozen=True, slots=True)
class NatsConfig:
    """Where the cluster and the stream are, and the limits the broker's roles apply."""

    urls: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    name: str = "herald"
    connect_timeout: float = 5.0
    reconnect_wait: float = 1.0
    ping_interval: float = 10.0
    subjects: Subjects = field(default_factory=Subjects)
    stream: str = "HERALD"
    replicas: int = 1
    storage: str = "file"
    history: RetentionPolicy = field(default_factory=RetentionPolicy)
    max_bytes: int = -1
    publish_timeout: float = 5.0
    # Seconds the stream remembers a publish's Nats-Msg-Id (idempotency key).
    dedup_window: float = 120.0
    # At start, how long to wait for JetStream to answer (a cluster electing its leader).
    stream_wait: float = 30.0
    unsubscribe_delay: float = 1.0
    pending_msgs_limit: int = 65536
    pending_bytes_limit: int = 64 * 1024 * 1024
    # One wildcard subscription for all user channels instead of one per user
    # (each costs nats-py a task and a queue, ~5 KiB): for nodes that serve
    # most of the users, at the price of receiving every user's messages.
    shared_user_subscription: bool = False
    # Bounds of a replay: seconds it may take, messages a gap repair may fetch.
    replay_timeout: float = 10.0
    max_repair: int = 10_000
    # Presence: this node's id, and how long a silent node's users stay listed.
    node_id: str = "herald"
    presence_ttl: float = 15.0
    # Room globs whose members' first arrival / last departure is announced.
    join_leave_rooms: tuple[str, ...] = ()

    @property
    def duplicate_window(self) -> float:
        """Seconds the stream remembers a message id: no longer than it keeps messages."""
        return min(self.dedup_window, self.history.max_age)


class NatsBroker:
    """``broker.roles.Broker`` over a NATS cluster with JetStream: the
    connection, the stream and its buckets, and the roles built on them."""

    def __init__(self, config: NatsConfig, events: BrokerEvents) -> None:
        self._config = config
        self._on_closed_for_good = events.closed
        self._subjects = config.subjects
        self._link = link = NatsLink()
        self._stats = BrokerStats()
        self.history = NatsHistory(
            link,
            StreamPlace(config.stream, config.subjects, config.history, config.publish_timeout, config.replay_timeout),
            events.clock_offset,
        )
        self.pubsub = NatsPubSub(
            link,
            LiveOptions(
                config.stream,
                config.subjects,
                config.publish_timeout,
                config.unsubscribe_delay,
                config.shared_user_subscription,
                config.max_repair,
                config.duplicate_window,
            ),
            events,
            self.history,
            self._stats,
            self.history.clock.now,
        )
        self._sequencer = self.pubsub.sequencer
        self.reads = KvReadPositions(
            f"{config.stream}_read",
            link,
            self.history.position,
            self._stats,
            config.publish_timeout,
            config.history.user.max_age,
        )
        self.presence = KvPresence(
            link,
            config.subjects,
            config.stream,
            config.node_id,
            config.presence_ttl,
            config.join_leave_rooms,
            config.publish_timeout,
        )
        self.connections = KvConnections(
            link, config.stream, self.presence.instance, self.presence.alive, events.kick, config.publish_timeout
        )
        self.presence.on_lapse = self.connections.recount
        self.relay = NatsRelay(link, config.stream, config.node_id, events.request, self.presence.alive_now)
        self._stream_ready = False
        self._stream_created: float | None = None
        self._closing = False
        # The first connect: its attempts' errors are the reason it fails, said once in BrokerUnavailable.
        self._connecting = False
        self._connect_error: Exception | None = None
        self._last_error_log = 0.0
        self._suppressed_errors = 0
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle -----------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._link.connected

    @property
    def ready(self) -> bool:
        return self.connected and self._stream_ready

    async def start(self, manage_stream: bool = True) -> None:
        """Connect; create or update the stream unless ``manage_stream`` is False
        (short-lived publishers must not rewrite the nodes' stream limits)."""
        nc = DispatchingClient()
        urls = list(self._config.urls)
        self._connecting, self._connect_error = True, None
        try:
            # max_reconnect_attempts=-1 would retry the first connect forever:
            # bound it, so a wrong URL fails fast with a clear message.
            await asyncio.wait_for(
                nc.connect(
                    servers=urls,
                    name=self._config.name,
                    connect_timeout=max(1, int(self._config.connect_timeout)),
                    reconnect_time_wait=self._config.reconnect_wait,  # type: ignore[arg-type]
                    # A server that stops answering (frozen, cut off) is left after
                    # two unanswered pings, not nats-py's 2 x 120 s.
                    ping_interval=self._config.ping_interval,  # type: ignore[arg-type]
                    max_outstanding_pings=2,
                    max_reconnect_attempts=-1,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                ),
                timeout=self._config.connect_timeout,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            await close_quietly(nc)
            why = self._connect_error or exc
            detail = f"{why.__class__.__name__}: {why}" if str(why) else why.__class__.__name__
            raise BrokerUnavailable(
                f"cannot connect to NATS at {redacted_urls(urls)} within {self._config.connect_timeout:g}s ({detail})"
            ) from None
        finally:
            self._connecting = False
        self._link.nc = nc
        self._link.js = nc.jetstream(timeout=self._config.publish_timeout)
        try:
            await self.connections.listen()
            await self._link.replies.subscribe()
            if manage_stream:
                await self.relay.listen()  # a node: other nodes may address it
                await self._ensure_stream_when_ready()
            else:
                self._stream_ready = True
        except BaseException:
            await self.close()  # the connection and its tasks end here, not when the loop is gone
            raise

    async def _ensure_stream_when_ready(self) -> None:
        """``_ensure_stream``, retried while JetStream does not answer yet (a
        cluster that is still electing its leader), for ``stream_wait`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.stream_wait
        while True:
            try:
                await self._ensure_stream()
                return
            except BrokerUnavailable as exc:
                if not _not_ready(exc.__cause__) or loop.time() > deadline:
                    raise
                log.info("JetStream not ready yet (%s): retrying", exc)
                await asyncio.sleep(0.5)

    def _stream_config(self) -> StreamConfig:
        c = self._config
        return StreamConfig(
            name=c.stream,
            description="Herald: every message of every channel, in one sequence",
            subjects=self._subjects.stream_subjects(),
            storage=storage_type(c.storage),
            num_replicas=c.replicas,
            max_msgs_per_subject=stream_cap(c.history),
            max_age=c.history.max_age,
            max_bytes=c.max_bytes,
            duplicate_window=c.duplicate_window,
            discard=DiscardPolicy.OLD,
            allow_direct=True,
            allow_atomic=True,  # a publish of many messages stores all or none (nats-server 2.12+)
            republish=RePublish(src=f"{self._subjects.prefix}.>", dest=f"{self._subjects.live_prefix}.>"),
        )

    async def _ensure_stream(self, update: bool = True) -> None:
        """Create the stream, or (``update``: at start) give it this node's
        limits. A reconnect only checks it is there: nodes whose settings
        differ (a rolling change of [history]) must not set it back and forth
        on every NATS blip, dropping what the newest settings keep."""
        js = self._link.js
        assert js is not None  # connected once: set in start()
        config = self._stream_config()
        try:
            try:
                current = await js.stream_info(config.name or "")
            except nats.js.errors.NotFoundError:
                try:
                    info = await js.add_stream(config)
                    log.info("created stream %s", config.name)
                except nats.js.errors.BadRequestError as refused:
                    try:  # another node created it meanwhile?
                        info = await js.update_stream(config)
                    except nats.js.errors.NotFoundError:
                        # No: the server refused it (e.g. another stream already
                        # captures these subjects). Say why.
                        raise refused from None
            else:
                info = current
                if update:
                    info = await js.update_stream(config)
                    _log_changes(config.name or "", current.config, info.config)
            for bucket in (self.reads, self.presence, self.connections):
                await bucket.ensure(js, self._config.replicas, self._config.storage)
        except (TimeoutError, nats.errors.Error) as exc:
            raise BrokerUnavailable(f"cannot create or update stream {config.name}: {exc}") from exc
        # A stream created anew (a NATS store lost, or deleted by hand) numbers
        # from 1 again: what the sequencer knows of the old one no longer holds.
        created = info.created.timestamp() if info.created else 0.0
        if self._stream_created is None:
            self._sequencer.start_at(int(info.state.last_seq or 0))
        elif created != self._stream_created:
            log.warning("stream %s was recreated: its sequence starts over", config.name)
            self._sequencer.restart()
        self._stream_created = created
        self.reads.stream_id = stream_id(info.created)
        # A server before 2.12 drops allow_atomic: batches then go message by message.
        self.pubsub.atomic_batches = info.config.allow_atomic is True
        self._stream_ready = True

    async def close(self) -> None:
        self._closing = True
        nc = self._link.nc
        if nc is None:
            return
        # The drain's count-outs first, while connected: a connection left
        # counted would take a place of its user on the other nodes, which
        # take this one for alive until they list the live nodes again.
        await self.connections.settle(COUNT_OUT_WAIT)
        # Then presence: its last leaves are announced on NATS.
        await self.presence.close()
        self._link.nc = None
        # drain() cannot be bounded (it flushes for 10 s after a cancel): the
        # subscriptions are forgotten (no UNSUB: the connection ends), so
        # flush briefly and close.
        await self.pubsub.close()
        if nc.is_connected:  # else nothing can be flushed
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.flush(1), timeout=1.5)
        # Connections counted out during the drain: a moment to finish, then
        # ended here (not destroyed pending when the loop closes).
        tasks = self._tasks | self.connections.tasks | self.relay.tasks
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            await cancel_and_wait(pending)
        await close_quietly(nc)

    def stats(self) -> BrokerStats:
        if self.connected and self.history.clock_due():
            spawn(self._tasks, self.history.read_clock())  # seen by the next scrape
        self._stats.connected = self.connected
        self._stats.subscriptions = self.pubsub.subscriptions
        return self._stats

    # -- NATS callbacks -------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        # nats-py awaits this once per dropped message on overflow: keep it cheap.
        if isinstance(exc, nats.errors.SlowConsumerError):
            self._stats.slow_consumer_errors += 1
        if self._connecting:
            self._connect_error = exc
            return
        now = time.monotonic()
        if now - self._last_error_log < 5.0:
            self._suppressed_errors += 1
            return
        suppressed, self._suppressed_errors = self._suppressed_errors, 0
        self._last_error_log = now
        log.warning("NATS error: %r (%d similar suppressed)", exc, suppressed)

    async def _on_disconnected(self) -> None:
        # The server we come back to may have lost the stream: not ready until checked.
        self._stream_ready = False
        self.presence.pause()
        # Live messages wait until the stream is checked and the gap caught up.
        self._sequencer.pause()
        closed = self._link.nc is not None and self._link.nc.is_closed  # no reconnect: _on_closed says it
        if not (self._closing or self._connecting or closed):
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        self._stats.reconnects += 1
        url = self._link.nc.connected_url if self._link.nc is not None else None
        log.info("reconnected to NATS at %s", redacted(url.geturl()) if url else "?")
        # The server may have lost the stream (a fresh store): recreate it.
        spawn(self._tasks, self._restore_stream())

    async def _restore_stream(self) -> None:
        while not self._closing and self.connected:
            try:
                await self._ensure_stream(update=False)
                # What the held channels missed while disconnected, then the live flow.
                self._sequencer.catch_up()
                return
            except BrokerUnavailable as exc:
                self._stream_ready = False
                log.error("%s; retrying", exc)
            await asyncio.sleep(self._config.reconnect_wait)

    @property
    def closed_for_good(self) -> bool:
        """NATS closed the connection and nats-py will not reconnect it."""
        nc = self._link.nc
        return nc is not None and nc.is_closed and not self._closing

    async def _on_closed(self) -> None:
        """nats-py closes for good on any -ERR of the server but a stale
        connection or a permissions violation (maximum subscriptions or
        connections exceeded, an authorization violation...)."""
        if self._closing or self._connecting:
            return
        self._stream_ready = False
        error = self._link.nc.last_error if self._link.nc is not None else None
        reason = f"NATS connection closed for good ({error or 'no error given'})"
        self._link.fail(reason)  # no answer comes now: the waits end here, not at their timeouts
        if self._on_closed_for_good is None:
            log.error("%s", reason)
        else:
            self._on_closed_for_good(reason)
