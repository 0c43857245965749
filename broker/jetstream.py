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
from collections.abc import Sequence
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RePublish, StreamConfig

from .base import (
    BrokerStats,
    BrokerUnavailable,
    Delivery,
    DeliveryCallback,
    History,
    KickCallback,
    LossCallback,
    Replay,
)
from .channels import DEFAULT_EVENT, Subjects
from .connections import UserConnections
from .dispatch import DispatchingClient, LiveSubscription
from .history import retain, stream_cap
from .interest import Interest
from .kv import storage_type
from .presence import Presence
from .sequencer import Sequencer
from .store import EVENT_HEADER, ReadPositions, event_of, first_sequence, last_sequence, read_stored
from .tasks import spawn
from .timestamps import parse_rfc3339

log = logging.getLogger("herald.broker")
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


def _not_ready(exc: BaseException | None) -> bool:
    if isinstance(exc, nats.js.errors.APIError) and exc.err_code == _NO_PEERS:
        return True
    return isinstance(exc, _NOT_READY)


# Set on join / leave announcements (by nodes, on live subjects only).
PRESENCE_HEADER = "Herald-Presence"
# Interest key of the shared user subscription; never a valid channel name.
ALL_USERS = "user:*"


@dataclass(frozen=True, slots=True)
class NatsConfig:
    urls: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    name: str = "herald"
    connect_timeout: float = 5.0
    reconnect_wait: float = 1.0
    subjects: Subjects = field(default_factory=Subjects)
    stream: str = "HERALD"
    replicas: int = 1
    storage: str = "file"
    history: History = field(default_factory=History)
    max_bytes: int = -1
    publish_timeout: float = 5.0
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


class NatsBroker:
    """Broker over a NATS cluster with JetStream. See ``broker.base.Broker``."""

    def __init__(self, config: NatsConfig, on_delivery: DeliveryCallback, on_loss: LossCallback | None = None) -> None:
        self._config = config
        self._subjects = config.subjects
        self._nc: DispatchingClient | None = None
        self._js: JetStreamContext | None = None
        self._subs: dict[str, LiveSubscription] = {}
        self._interest = Interest(self._subscribe, self._unsubscribe, config.unsubscribe_delay)
        self._stats = BrokerStats()
        self._sequencer = Sequencer(
            on_delivery, on_loss or _ignore, self.replay, self._stats, max_repair=config.max_repair
        )
        self._push = self._sequencer.push
        # Channels wanted (reference counted): the ones whose flow is kept gap-free.
        self._wanted: dict[str, int] = {}
        self._reads = ReadPositions(f"{config.stream}_read")
        self._presence = Presence(
            config.stream, config.node_id, config.presence_ttl, config.join_leave_rooms, self._announce
        )
        self._connections = UserConnections(config.stream, self._presence.instance, self._presence.alive)
        self.kick: KickCallback = _ignore
        self._stream_ready = False
        self._stream_created: float | None = None
        self._closing = False
        self._last_error_log = 0.0
        self._suppressed_errors = 0
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle -----------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def ready(self) -> bool:
        return self.connected and self._stream_ready

    async def start(self, manage_stream: bool = True) -> None:
        """Connect; create or update the stream unless ``manage_stream`` is False
        (short-lived publishers must not rewrite the nodes' stream limits)."""
        nc = DispatchingClient()
        urls = list(self._config.urls)
        try:
            # max_reconnect_attempts=-1 would retry the first connect forever:
            # bound it, so a wrong URL fails fast with a clear message.
            await asyncio.wait_for(
                nc.connect(
                    servers=urls,
                    name=self._config.name,
                    connect_timeout=max(1, int(self._config.connect_timeout)),
                    reconnect_time_wait=self._config.reconnect_wait,  # type: ignore[arg-type]
                    max_reconnect_attempts=-1,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                ),
                timeout=self._config.connect_timeout,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            await _close_quietly(nc)
            raise BrokerUnavailable(
                f"cannot connect to NATS at {','.join(urls)} within "
                f"{self._config.connect_timeout:g}s ({exc.__class__.__name__})"
            ) from None
        self._nc = nc
        self._js = nc.jetstream(timeout=self._config.publish_timeout)
        await nc.subscribe(self._kick_subject(self._presence.instance), cb=self._on_kick)
        if manage_stream:
            await self._ensure_stream_when_ready()
        else:
            self._stream_ready = True

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
            discard=DiscardPolicy.OLD,
            allow_direct=True,
            republish=RePublish(src=f"{self._subjects.prefix}.>", dest=f"{self._subjects.live_prefix}.>"),
        )

    async def _ensure_stream(self) -> None:
        assert self._js is not None
        config = self._stream_config()
        try:
            try:
                await self._js.stream_info(config.name or "")
            except nats.js.errors.NotFoundError:
                try:
                    info = await self._js.add_stream(config)
                    log.info("created stream %s", config.name)
                except nats.js.errors.BadRequestError as refused:
                    try:  # another node created it meanwhile?
                        info = await self._js.update_stream(config)
                    except nats.js.errors.NotFoundError:
                        # No: the server refused it (e.g. another stream already
                        # captures these subjects). Say why.
                        raise refused from None
            else:
                info = await self._js.update_stream(config)
            await self._reads.ensure(self._js, self._config.replicas, self._config.storage)
            await self._presence.ensure(self._js, self._config.replicas, self._config.storage)
            await self._connections.ensure(self._js, self._config.replicas, self._config.storage)
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
        self._stream_ready = True

    async def close(self) -> None:
        self._closing = True
        if self._nc is None:
            return
        # Presence first, while connected: its last leaves are announced on NATS.
        await self._presence.close()
        nc, self._nc = self._nc, None
        # drain() cannot be bounded (it flushes for 10 s after a cancel): the
        # subscriptions are released already, so flush briefly and close.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._interest.release_all(), timeout=1.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.flush(1), timeout=1.5)
        # Connections counted out during the drain: a moment to finish, then
        # ended here (not destroyed pending when the loop closes).
        tasks = set(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._sequencer.close()
        await _close_quietly(nc)

    def stats(self) -> BrokerStats:
        self._stats.connected = self.connected
        self._stats.subscriptions = len(self._subs)
        return self._stats

    # -- NATS callbacks -------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        # nats-py awaits this once per dropped message on overflow: keep it cheap.
        if isinstance(exc, nats.errors.SlowConsumerError):
            self._stats.slow_consumer_errors += 1
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
        # Live messages wait until the stream is checked and the gap caught up.
        self._sequencer.pause()
        if not self._closing:
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        self._stats.reconnects += 1
        url = self._nc.connected_url if self._nc is not None else None
        log.info("reconnected to NATS at %s", url.netloc if url else "?")
        # The server may have lost the stream (a fresh store): recreate it.
        spawn(self._tasks, self._restore_stream())

    async def _restore_stream(self) -> None:
        while not self._closing and self.connected:
            try:
                await self._ensure_stream()
                # What the held channels missed while disconnected, then the live flow.
                self._sequencer.catch_up()
                return
            except BrokerUnavailable as exc:
                self._stream_ready = False
                log.error("%s; retrying", exc)
            await asyncio.sleep(self._config.reconnect_wait)

    async def _on_closed(self) -> None:
        if not self._closing:
            log.error("NATS connection closed")

    # -- subscriptions ---------------------------------------------------------

    def _interest_key(self, channel: str) -> str:
        if self._config.shared_user_subscription and channel.startswith("user:"):
            return ALL_USERS
        return channel

    async def want(self, channel: str) -> None:
        await self._interest.want(self._interest_key(channel))
        count = self._wanted.get(channel, 0)
        self._wanted[channel] = count + 1
        if not count:
            self._sequencer.track(channel)

    async def unwant(self, channel: str) -> None:
        count = self._wanted.get(channel, 0)
        if count <= 1:
            self._wanted.pop(channel, None)
            self._sequencer.untrack(channel)
        else:
            self._wanted[channel] = count - 1
        await self._interest.unwant(self._interest_key(channel))

    async def _subscribe(self, channel: str) -> None:
        if self._nc is None:
            raise BrokerUnavailable("NATS is not connected")
        # Subscribe-and-confirm runs to completion even if the connection that
        # asked goes away meanwhile: a subscription left half made would be
        # unknown to Interest, and the next one would deliver everything twice.
        opening = asyncio.ensure_future(self._open_subscription(channel))
        try:
            sub = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(self._discard_opened)
            raise
        self._subs[channel] = sub

    async def _open_subscription(self, channel: str) -> LiveSubscription:
        nc = self._nc
        assert nc is not None
        handle = self._handle
        if channel == ALL_USERS:
            channel_of = self._subjects.channel_of

            def on_message(subject: bytes, data: bytes, headers: dict[str, str] | None) -> None:
                handle(channel_of(subject.decode()), data, headers)

            sub = await nc.subscribe_direct(self._subjects.live_family("user"), on_message)
        else:

            def on_message(subject: bytes, data: bytes, headers: dict[str, str] | None) -> None:
                handle(channel, data, headers)

            sub = await nc.subscribe_direct(self._subjects.live_subject(channel), on_message)
        # Round trip, so the server has the interest once want() returns: a
        # client told its channels are live can rely on it.
        try:
            await nc.flush(timeout=max(1, int(self._config.publish_timeout)))
        except (TimeoutError, nats.errors.Error) as exc:
            with contextlib.suppress(Exception):
                await nc.unsubscribe_direct(sub)
            raise BrokerUnavailable(f"subscribe not confirmed: {exc.__class__.__name__}") from None
        return sub

    def _discard_opened(self, opening: asyncio.Future[LiveSubscription]) -> None:
        if opening.cancelled() or opening.exception() is not None:
            return
        assert self._nc is not None
        spawn(self._tasks, self._nc.unsubscribe_direct(opening.result()))

    async def _unsubscribe(self, channel: str) -> None:
        sub = self._subs.pop(channel, None)
        if sub is not None and self._nc is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._nc.unsubscribe_direct(sub)

    def _handle(self, channel: str | None, data: bytes, headers: dict[str, str] | None) -> None:
        self._stats.messages_received += 1
        if channel is None:  # a live subject we cannot map (not published by the stream)
            self._stats.malformed_messages += 1
            return
        try:
            delivery = _decode(channel, data, headers)
        except (ValueError, KeyError):
            self._stats.malformed_messages += 1
            return
        self._push(delivery)

    # -- publishing -----------------------------------------------------------

    async def publish(self, channel: str, payload: bytes, event: str | None = None) -> int:
        if self._js is None or not self.connected:
            raise BrokerUnavailable("NATS is not connected")
        headers = {EVENT_HEADER: event} if event else None
        try:
            ack = await self._js.publish(
                self._subjects.input_subject(channel),
                payload,
                headers=headers,
                stream=self._config.stream,
            )
        except (OSError, nats.errors.Error) as exc:  # OSError: timeouts, and a socket reset under the request
            raise BrokerUnavailable(f"publish not acknowledged: {exc.__class__.__name__}") from None
        return int(ack.seq)

    async def publish_ephemeral(self, channel: str, payload: bytes, event: str | None = None) -> None:
        if self._nc is None or not self.connected:
            raise BrokerUnavailable("NATS is not connected")
        headers = {EVENT_HEADER: event} if event else None
        await self._nc.publish(self._subjects.live_subject(channel), payload, headers=headers)

    async def replay(self, channels: Sequence[str], after_seq: int, limit: int) -> Replay:
        c = self._config
        js = self._jetstream()
        read_limit = len(channels) * stream_cap(c.history)  # all the stream holds for them
        try:
            async with asyncio.timeout(c.replay_timeout):
                if len(channels) == 1:
                    # One channel (the inbox, a subscribe): a direct get of its
                    # last message usually shows there is nothing to read. If
                    # one is held, nothing after the position was evicted either
                    # (eviction takes the oldest first); if none is, the stream
                    # may have dropped them all.
                    subject = self._subjects.input_subject(channels[0])
                    last = await last_sequence(js, c.stream, subject)
                    if last == 0 and after_seq > 0:
                        gone = after_seq + 1 < await first_sequence(js, c.stream)
                        return Replay([], frozenset(channels) if gone else frozenset())
                    if last is not None and last <= after_seq:
                        return Replay([])
                if after_seq > 0:
                    found, first = await asyncio.gather(
                        self._fetch(channels, after_seq, read_limit), first_sequence(js, c.stream)
                    )
                else:
                    found, first = await self._fetch(channels, after_seq, read_limit), 0
        except TimeoutError:
            raise BrokerUnavailable(f"replay took longer than {c.replay_timeout:g}s") from None
        # Messages after the position that the stream dropped as a whole (age,
        # size): any of these channels may have had some.
        evicted = channels if after_seq + 1 < first else ()
        return retain(found, c.history, limit, time.time(), evicted)

    def _jetstream(self) -> JetStreamContext:
        if self._js is None or self._nc is None or not self.connected:
            raise BrokerUnavailable("NATS is not connected")
        return self._js

    async def _fetch(self, channels: Sequence[str], after_seq: int, limit: int) -> list[Delivery]:
        """Stored messages of ``channels`` after ``after_seq``, oldest first, at most ``limit``."""
        js = self._jetstream()
        assert self._nc is not None
        subjects = self._subjects
        return await read_stored(
            js,
            self._config.stream,
            [subjects.input_subject(c) for c in channels],
            after_seq,
            limit,
            self._nc._nuid.next().decode(),
            subjects.channel_of,
            self._config.publish_timeout,
        )

    async def read_position(self, user: str) -> int:
        self._jetstream()
        return await self._reads.get(user)

    async def mark_read(self, user: str, seq: int) -> int:
        self._jetstream()
        return await self._reads.advance(user, seq)

    def _kick_subject(self, instance: str) -> str:
        # Core NATS only: outside the stream's subjects, never stored.
        return f"_herald.{self._config.stream}.kick.{instance}"

    async def _on_kick(self, msg: Msg) -> None:
        self.kick(msg.data.decode(errors="replace"))

    async def open_connection(self, user: str, conn: str, limit: int, close_oldest: bool) -> None:
        victims = await self._connections.open(user, conn, limit, close_oldest)
        for instance, victim in victims:
            if instance == self._presence.instance:
                self.kick(victim)
            elif self._nc is not None:
                with contextlib.suppress(nats.errors.Error):
                    await self._nc.publish(self._kick_subject(instance), victim.encode())

    def close_connection(self, user: str, conn: str) -> None:
        spawn(self._tasks, self._connections.close(user, conn))

    async def _announce(self, channel: str, user: str, joined: bool) -> None:
        """A join / leave frame to the room's members: live only, never stored."""
        if self._nc is not None and self.connected:
            headers = {PRESENCE_HEADER: "join" if joined else "leave"}
            await self._nc.publish(self._subjects.live_subject(channel), user.encode(), headers=headers)

    def mark_present(self, channel: str, user: str, present: bool) -> None:
        self._presence.mark(channel, user, present)

    async def members(self, channel: str) -> list[str]:
        self._jetstream()
        return await self._presence.members(channel)


def _ignore(name: str) -> None:
    """The default loss and kick callback: nobody to tell."""


def _decode(channel: str, data: bytes, headers: dict[str, str] | None) -> Delivery:
    if not headers:
        return Delivery(channel, 0, 0, time.time(), DEFAULT_EVENT, data)
    event = event_of(headers)
    seq_text = headers.get("Nats-Sequence")
    if seq_text is None:  # ephemeral: published straight to the live subject
        announced = headers.get(PRESENCE_HEADER)
        if announced in ("join", "leave"):
            event = "!" + announced  # not a valid event name: cannot come from a publisher
        return Delivery(channel, 0, 0, time.time(), event, data)
    stamp = headers.get("Nats-Time-Stamp")
    return Delivery(
        channel,
        int(seq_text),
        int(headers.get("Nats-Last-Sequence") or 0),
        parse_rfc3339(stamp) if stamp else time.time(),
        event,
        data,
    )


async def _close_quietly(nc: DispatchingClient) -> None:
    # Best effort on a half-open client: whatever it raises, it is gone.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), timeout=2.0)
