"""The NATS side of the webhook dispatcher: user-channel messages from the
stream, one at a time per message across every dispatcher of the cluster.

A durable pull consumer on ``<prefix>.user.>`` is shared by all dispatchers
(a work queue): JetStream hands each message to one of them and hands it again
only after ``ack_wait`` without an answer — so a dispatcher that dies
mid-delivery is replaced, and while one works on a message, or waits for it
to fall due (it reports progress), no other gets it. Retrying, and waiting
longer than that, are ``nak`` with a delay: a restart loses nothing. What
finally fails is published to a dead-letter stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator

import nats.errors
import nats.js.errors
import orjson
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig
from nats.js.kv import KeyValue

from .base import BrokerUnavailable
from .channels import Subjects, channel_id, event_of, is_user
from .coalesce import Fresh
from .dispatch import DispatchingClient
from .hook_message import Backlog, HookMessage
from .kv import key_token, leader_reads, live_keys
from .link import close_quietly
from .readmark import decode, stream_id, trusted
from .redact import redacted_urls
from .server_clock import ServerClock
from .tasks import spawn
from .throttle import Throttle

log = logging.getLogger("herald.hooks")
# The dead-letter stream's metadata key that names the stream incarnation consumed.
_SERVED = "herald_hooks_stream"
warn = Throttle(log, interval=30.0)
# A dead-letter record's header block beyond its fields: the NATS/1.0 line, Herald-Truncated.
_HEADROOM = 128
_REASON_MAX = 1000  # characters of a failure kept in Herald-Reason


class HookSource:
    """Connects, makes the consumer and the dead-letter stream, and yields the
    messages; answers whether a user is online and what they have read."""

    def __init__(
        self,
        urls: tuple[str, ...],
        subjects: Subjects,
        stream: str,
        ack_wait: float,
        connect_timeout: float = 5.0,
        max_ack_pending: int = 10_000,
    ) -> None:
        self._urls = urls
        self._shown_urls = redacted_urls(urls)  # for the log, as the node's own connect error names them
        self._subjects = subjects
        self._stream = stream
        self._ack_wait = ack_wait
        self._max_ack_pending = max_ack_pending
        self._connect_timeout = connect_timeout
        self.consumer = f"{stream}_hooks"
        self.dead_stream = f"{stream}_HOOKS_DEAD"
        self.dead_subject = f"_herald.{stream}.hooks.dead"
        self._nc: DispatchingClient | None = None
        self._js: JetStreamContext | None = None
        self._acks: set[asyncio.Task[None]] = set()
        self._buckets: dict[str, KeyValue] = {}  # the nodes' KV buckets, bound (see _bucket)
        # Asked at most once a second, one request for every check meanwhile:
        self._alive = Fresh(self._list_alive)  # the live node instances (see online)
        self._place = Fresh(self._stream_place)  # the stream's incarnation and last sequence
        self._bound = False  # the consumer was found or made (False: waiting for the stream or the consumer)
        self._waited = False  # the stream was missing at some point while this dispatcher ran
        self._incarnation: str | None = None  # the stream's, when the consumer was last found or made
        self._closing = False  # close() under way: the disconnect it causes is no loss
        self._clock = ServerClock()  # nats-server's: ages are judged on the clock that stamped the messages
        self.now = self._clock.now

    @property
    def ready(self) -> bool:
        """Consuming: connected to NATS, the consumer bound (False: waiting for one of them)."""
        return self._bound and self._nc is not None and self._nc.is_connected

    async def _lost(self) -> None:
        if not self._closing and not (self._nc is not None and self._nc.is_closed):
            warn("lost", "webhook dispatcher lost NATS: waiting for it to come back")

    async def _closed(self) -> None:
        """nats-py closes for good on most of the server's -ERRs (maximum
        connections or subscriptions exceeded...): ``messages`` then ends with
        BrokerUnavailable, and ``herald hooks`` exits 1 for its supervisor to
        start it again, instead of waiting unready for a reconnect that never comes."""
        if not self._closing and self._nc is not None:
            self._nc.fail_requests()  # no answer comes now: the waits end here, not at their timeouts

    def _check_open(self) -> None:
        # Read from the client, not set by _closed: nats-py marks itself closed
        # first and calls closed_cb last, after what it cut off has failed.
        nc = self._nc
        if nc is not None and nc.is_closed and not self._closing:
            raise BrokerUnavailable(f"NATS connection closed for good ({nc.last_error or 'no error given'})")

    async def _nats_error(self, exc: Exception) -> None:
        # nats-py retries the first connect too (max_reconnect_attempts=-1) and says so only here.
        warn("nats", "webhook dispatcher: NATS at %s: %r (retrying)", self._shown_urls, exc)

    async def start(self) -> None:
        """Connect and bind the consumer, waiting as long as it takes for NATS
        and for the stream (the nodes create it): a dispatcher may start
        first. ``ready`` says when it is consuming."""
        delay = 0.5
        while self._nc is None:
            try:
                nc = DispatchingClient()  # as the node's: fail_requests on a close for good
                await nc.connect(
                    list(self._urls),
                    name="herald-hooks",
                    connect_timeout=self._connect_timeout,  # type: ignore[arg-type]  # nats-py waits a float as well
                    max_reconnect_attempts=-1,  # once connected, nats-py reconnects by itself
                    reconnect_time_wait=1,
                    allow_reconnect=True,
                    error_cb=self._nats_error,
                    disconnected_cb=self._lost,
                    closed_cb=self._closed,
                )
                self._nc = nc
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                warn("connect", "webhook dispatcher cannot reach NATS at %s (%r): retrying", self._shown_urls, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._js = self._nc.jetstream()
        await self._bind()

    async def _bind(self) -> None:
        """Wait for the stream, then make (or find) the consumer and the
        dead-letter stream. Waiting, not creating the stream: only the nodes
        hold its settings, and a dispatcher's copy could differ from theirs."""
        self._bound = False
        js = self._js
        assert js is not None
        delay = 0.5
        while True:
            self._check_open()
            try:
                info = await js.stream_info(self._stream)
                incarnation = stream_id(info.created)
                dead = await self._dead_stream(js)
                served = None if dead is None else (dead.metadata or {}).get(_SERVED, "")  # "": kept none yet
                await self._ensure_consumer(js, incarnation, served)
                if served != incarnation:
                    await self._serve(js, dead, incarnation)
            except nats.js.errors.NotFoundError:
                self._waited = True
                warn("stream", "stream %s not found: waiting for a node to create it", self._stream)
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                warn("jetstream", "webhook dispatcher cannot use NATS JetStream (%r): retrying", exc)
            else:
                self._bound = True
                await self.backlog()  # the server's clock, before the first message is judged
                log.info("webhook dispatcher consuming %s", self._stream)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _dead_stream(self, js: JetStreamContext) -> StreamConfig | None:
        """The dead-letter stream's config (None: no dispatcher ever made it).
        Its metadata names the stream incarnation the dispatchers last consumed."""
        try:
            return (await js.stream_info(self.dead_stream)).config
        except nats.js.errors.NotFoundError:
            return None

    async def _serve(self, js: JetStreamContext, dead: StreamConfig | None, incarnation: str) -> None:
        """Keep ``incarnation`` as the one consumed (making the dead-letter stream if need be)."""
        if dead is None:
            config = StreamConfig(name=self.dead_stream, subjects=[self.dead_subject], metadata={_SERVED: incarnation})
            await js.add_stream(config)
            return
        await js.update_stream(dataclasses.replace(dead, metadata={**(dead.metadata or {}), _SERVED: incarnation}))

    async def _ensure_consumer(self, js: JetStreamContext, incarnation: str, served: str | None) -> None:
        """The shared durable consumer: found if it exists, else made. Made
        when the stream is first seen as it was, it starts with what comes
        next; made for a stream that appeared or was recreated — while this
        dispatcher ran, or since the dispatchers last consumed one (``served``) —
        it starts at its beginning (nothing in it is older than the
        dispatchers' watch, and what came before the consumer must not be lost)."""
        with contextlib.suppress(nats.js.errors.NotFoundError):
            info = await js.consumer_info(self._stream, self.consumer)
            # hooks.timeout changed since it was made: with the old ack_wait a
            # POST slower than it would be handed out again while in flight;
            # hooks.max_ack_pending changed: raised, it ends a stall.
            stale_wait = abs((info.config.ack_wait or 0) - self._ack_wait) > 0.001
            if stale_wait or info.config.max_ack_pending != self._max_ack_pending:
                config = dataclasses.replace(
                    info.config, ack_wait=self._ack_wait, max_ack_pending=self._max_ack_pending
                )
                await js.add_consumer(self._stream, config)
                log.info(
                    "webhook consumer of %s: ack_wait now %g s, max_ack_pending %d",
                    self._stream,
                    self._ack_wait,
                    self._max_ack_pending,
                )
            self._incarnation = incarnation
            return
        known = self._incarnation if self._incarnation is not None else served or None
        from_start = self._waited or (known is not None and known != incarnation)
        await js.add_consumer(
            self._stream,
            ConsumerConfig(
                durable_name=self.consumer,
                filter_subject=f"{self._subjects.prefix}.user.>",
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL if from_start else DeliverPolicy.NEW,
                ack_wait=self._ack_wait,
                max_deliver=-1,
                max_ack_pending=self._max_ack_pending,
            ),
        )
        if from_start:
            log.warning(
                "stream %s is new since this dispatcher started: webhooks start at its first message", self._stream
            )
        self._incarnation = incarnation

    async def messages(self, batch: int) -> AsyncIterator[list[HookMessage]]:
        """Batches of up to ``batch`` messages, as they come, until cancelled.
        A consumer that is gone (its stream deleted, and made again by a
        node) is waited for and bound again."""
        js = self._js
        assert js is not None
        sub = await js.pull_subscribe_bind(self.consumer, self._stream)
        idle = 0.0
        while True:
            self._check_open()
            try:
                msgs = await sub.fetch(batch, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                idle += 1.0
                if idle < 5.0:
                    continue
                msgs = []  # quiet for a while: make sure the consumer is still there
            except nats.errors.Error as exc:  # disconnected (nats-py reconnects), or the consumer is gone
                self._check_open()  # or NATS closed the connection: no pause first
                log.warning("fetching webhook messages failed: %r", exc)
                await asyncio.sleep(1.0)
                msgs = []
            if not msgs:
                idle = 0.0
                if not await self._consumer_exists(js):
                    log.warning(
                        "the webhook consumer of %s is gone (the stream deleted?): waiting for it", self._stream
                    )
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                    await self._bind()
                    sub = await js.pull_subscribe_bind(self.consumer, self._stream)
                continue
            idle = 0.0
            yield [m for m in map(self._message, msgs) if m is not None]

    async def _consumer_exists(self, js: JetStreamContext) -> bool:
        try:
            await js.consumer_info(self._stream, self.consumer)
        except nats.js.errors.NotFoundError:
            return False
        except (TimeoutError, nats.errors.Error):
            return True  # cannot tell (NATS away): keep fetching, nats-py reconnects
        return True

    def _message(self, msg: Msg) -> HookMessage | None:
        channel = self._subjects.channel_of(msg.subject)
        if channel is None or not is_user(channel):
            spawn(self._acks, msg.ack())  # not ours: never again
            return None
        meta = msg.metadata
        return HookMessage(
            id=meta.sequence.stream,
            user=channel_id(channel),
            event=event_of(msg.headers or {}),
            data=msg.data,
            timestamp=meta.timestamp.timestamp() if meta.timestamp else self.now(),
            attempt=meta.num_delivered or 1,
            _msg=msg,
            stream=self._incarnation or "",
            clock=self.now,
        )

    async def _bucket(self, name: str) -> KeyValue | None:
        """One of the nodes' KV buckets (None: none yet), bound once: binding
        is a STREAM.INFO, and every message's checks read two buckets."""
        kv = self._buckets.get(name)
        if kv is None:
            assert self._js is not None
            try:
                kv = self._buckets[name] = leader_reads(await self._js.key_value(f"{self._stream}_{name}"))
            except nats.js.errors.NotFoundError:
                return None
        return kv

    async def _user_value(self, bucket: str, user: str) -> bytes | None:
        """The user's value in one of the nodes' KV buckets (None: no bucket or no key)."""
        kv = await self._bucket(bucket)
        if kv is None:
            return None
        try:
            return (await kv.get(key_token(user))).value
        except nats.js.errors.NotFoundError:  # no such key, or the bucket deleted since
            return None

    async def _list_alive(self) -> set[str]:
        kv = await self._bucket("nodes")
        if kv is None:
            return set()
        try:
            return set(await live_keys(kv, "*"))
        except nats.js.errors.NotFoundError:
            return set()

    async def online(self, user: str) -> bool:
        """Whether ``user`` has a connection on a live node (the nodes' tables)."""
        table = orjson.loads(await self._user_value("conns", user) or b"{}")
        if not table:
            return False
        # One listing per message would make (and delete) a consumer per
        # webhook. A node's key lives a ttl after it dies anyway.
        alive = await self._alive.recent(1.0)
        return any(isinstance(v, list) and v and v[0] in alive for v in table.values())

    async def read_position(self, user: str) -> int:
        """What the user has read, by the nodes' rule (broker/readmark.py): a
        position of another incarnation of the stream, or past its end, is
        nothing read."""
        value = await self._user_value("read", user)
        seq, written_for = decode(value)
        stream, last = await self._place.recent(1.0)
        if written_for == stream:
            return seq  # checked against the stream's end when written (that end may be newer than ours)
        return trusted(value, stream, last)[0]

    async def _stream_place(self) -> tuple[str, int]:
        """The stream's incarnation and last sequence."""
        assert self._js is not None
        info = await self._js.stream_info(self._stream)
        return stream_id(info.created), int(info.state.last_seq or 0)

    async def dead_letter(self, message: HookMessage, reason: str) -> str | None:
        """Keep what could not be delivered in the dead-letter stream (made
        again if it was deleted): its payload as it was, what it was and why
        in headers. None once kept; else why it could not be (the message is
        not answered: the caller decides)."""
        js = self._js
        if js is None:
            return "not connected to NATS"
        headers = {
            "Nats-Msg-Id": f"dead-{message.stream}-{message.id}",  # a second dispatcher's copy is dropped
            "Herald-Delivery-Id": str(message.id),
            "Herald-Stream": message.stream,
            "Herald-User": message.user,
            "Herald-Event": message.event,
            "Herald-Reason": _header_value(reason),
            "Herald-Attempts": str(message.attempt),
        }
        data = self._fitting(message.data, headers)
        try:
            try:
                await js.publish(self.dead_subject, data, headers=headers)
            except nats.js.errors.NoStreamResponseError:  # deleted under us (an operator done with its records)
                log.warning("dead-letter stream %s is gone: making it again", self.dead_stream)
                await self._serve(js, None, message.stream)
                await js.publish(self.dead_subject, data, headers=headers)
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            return repr(exc)
        return None

    def _fitting(self, data: bytes, headers: dict[str, str]) -> bytes:
        """``data`` as it is if the record fits in NATS's max_payload (it
        does unless the message was within a few hundred bytes of it), else
        cut to fit, with ``Herald-Truncated`` giving its full length: a record
        that cannot be stored leaves its message to be POSTed again and again."""
        assert self._nc is not None
        room = self._nc.max_payload - _HEADROOM - sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())
        if len(data) <= room:
            return data
        headers["Herald-Truncated"] = str(len(data))
        return data[: max(0, room)]

    async def backlog(self) -> Backlog | None:
        """What the consumer holds (None: cannot tell now); sets ``now``'s clock."""
        nc = self._nc
        if nc is None or self._js is None:
            return None
        subject = f"$JS.API.CONSUMER.INFO.{self._stream}.{self.consumer}"
        try:
            info = await self._clock.ask(nc, subject, timeout=5.0)
            limit = int(info["config"].get("max_ack_pending") or 0)
            return Backlog(int(info.get("num_pending") or 0), int(info.get("num_ack_pending") or 0), limit)
        except (TimeoutError, nats.errors.Error, ValueError, AttributeError, KeyError, TypeError):
            return None  # NATS away, or an error answer (no consumer yet): nothing to show

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        self._closing = True
        if nc is not None:
            # Not drain(): it would wait for the open pull request (up to 30 s).
            # The last acks are flushed; anything unanswered comes back after ack_wait.
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                await nc.flush(timeout=1)
            # Quietly: with NATS away, closing raises from the dropped transport.
            await close_quietly(nc)


def _header_value(text: str) -> str:
    """``text`` as a header value: one line (an exception's text may have
    several), bounded, and encodable."""
    line = " ".join(text.split())[:_REASON_MAX]
    return line.encode("utf-8", "replace").decode("utf-8")
