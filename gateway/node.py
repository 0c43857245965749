"""A node: the parts one process needs, and the life of its sessions."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Callable

from broker import Broker, DeliveryCallback, History, LossCallback, Retention
from broker.channels import Subjects
from broker.jetstream import NatsBroker, NatsConfig
from broker.throttle import Throttle

from .auth import Authenticator, AuthError, Identity
from .disconnect import REPLACED, SHUTDOWN, Disconnect
from .frames import Codec
from .hub import Hub
from .limits import TokenBucket, normal_origin
from .metrics import Metrics
from .outbound import Flusher, QueueLimits, Wire
from .session import Closer, Session, State
from .settings import Settings, room_history_rules

log = logging.getLogger("herald.node")

BrokerFactory = Callable[[DeliveryCallback, LossCallback], Broker]


def nats_config(settings: Settings) -> NatsConfig:
    h = settings.history
    n = settings.nats
    return NatsConfig(
        urls=n.urls,
        name=f"herald-{settings.node.id}",
        connect_timeout=n.connect_timeout,
        reconnect_wait=n.reconnect_wait,
        subjects=Subjects(settings.subject.prefix, settings.live_prefix),
        stream=settings.stream.name,
        replicas=settings.stream.replicas,
        storage=settings.stream.storage,
        history=History(
            Retention(h.user_max, h.user_max_age),
            Retention(h.room_max, h.room_max_age),
            tuple((glob, Retention(n, age)) for glob, n, age in room_history_rules(settings.rooms.history)),
        ),
        max_bytes=settings.stream.max_bytes,
        publish_timeout=n.publish_timeout,
        unsubscribe_delay=n.unsubscribe_delay,
        pending_msgs_limit=n.pending_msgs_limit,
        pending_bytes_limit=n.pending_bytes_limit,
        shared_user_subscription=n.user_subscriptions == "shared",
        replay_timeout=h.replay_timeout,
        max_repair=h.replay_max,
        node_id=settings.node.id,
        presence_ttl=settings.presence.ttl,
        join_leave_rooms=settings.rooms.join_leave,
    )


class Node:
    def __init__(self, settings: Settings, broker_factory: BrokerFactory | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.auth = Authenticator(settings.jwt)
        bp = settings.backpressure
        self.hub = Hub(bp.drop_oldest_rooms, drop_oldest_all=bp.policy == "drop-oldest")
        factory = broker_factory or (lambda deliver, lose: NatsBroker(nats_config(settings), deliver, lose))
        self.broker: Broker = factory(self.hub.deliver, self.hub.lost)
        self.hub.broker = self.broker
        self.hub.on_reset = self.metrics.resets_gap.inc
        self.broker.kick = self.kick
        self.flusher = Flusher(self.metrics.dropped_queue_full.inc, bp.write_delay)
        self.limits = QueueLimits(
            bp.max_bytes,
            bp.max_messages,
            bp.write_buffer,
            bp.stall_timeout,
            max_held=max(bp.max_messages, settings.history.replay_max),
        )
        self.sessions: set[Session] = set()
        self._by_id: dict[str, Session] = {}
        self.draining = False
        self._ids = itertools.count(1)
        self.warn = Throttle(log)
        self._api_buckets: dict[str, TokenBucket] = {}
        # Compared with a request's Origin once both are normalised.
        self.allowed_origins = tuple("*" if o == "*" else (normal_origin(o) or o) for o in settings.limits.origins)
        self.metrics.watch_broker(self.broker.stats)
        self.metrics.watch_queue_bytes(self.queued_bytes)

    @property
    def id(self) -> str:
        return self.settings.node.id

    def api_bucket(self, key: str) -> TokenBucket:
        """The publish API's rate bucket of one key (one per configured key: bounded)."""
        bucket = self._api_buckets.get(key)
        if bucket is None:
            rate = self.settings.limits.api_rate
            burst = max(1.0, rate)  # at least one whole token, or nothing would pass
            bucket = self._api_buckets[key] = TokenBucket(burst, burst / rate)
        return bucket

    def queued_bytes(self) -> float:
        return float(sum(s.outbound.pending_bytes() for s in self.sessions))

    def authenticate(self, token: str | None, peer: str) -> Identity:
        try:
            return self.auth.verify(token)
        except AuthError as exc:
            self.metrics.auth_failures.labels(exc.reason).inc()
            self.warn("auth:" + exc.reason, "refused token from %s: %s", peer, exc)
            raise

    def new_conn_id(self) -> str:
        return f"{self.id}:{next(self._ids)}"

    def kick(self, conn_id: str) -> None:
        """The cluster made room for a newer connection of this one's user."""
        session = self._by_id.get(conn_id)
        if session is not None:
            session.close(REPLACED)

    def open_session(self, conn_id: str, identity: Identity, codec: Codec, wire: Wire, closer: Closer) -> Session:
        session = Session(
            conn_id,
            identity,
            codec,
            wire,
            closer,
            self.flusher,
            self.limits,
            self.metrics.transport[codec.name],
        )
        self.sessions.add(session)
        self._by_id[conn_id] = session
        session.metrics.opened.inc()
        session.metrics.connections.inc()
        return session

    async def finish_session(self, session: Session, reason: Disconnect) -> None:
        """The transport is done with ``session``: unsubscribe and count it."""
        if session.state is State.CLOSED:
            return
        final = session.closed(reason)
        self.sessions.discard(session)
        self._by_id.pop(session.id, None)
        self.broker.close_connection(session.user, session.id)
        session.metrics.connections.dec()
        self.metrics.closed.labels(session.transport, final.label).inc()
        # Shielded: a cancel (the handler's client went) must not stop it
        # halfway and leave the rest of the session's channels held forever.
        try:
            await asyncio.shield(self.hub.leave_all(session))
        except Exception as exc:  # noqa: BLE001 - logged; the node goes on
            self.warn("leave", "releasing the channels of %s failed: %r", session.id, exc)

    async def start(self) -> None:
        await self.broker.start()

    async def shutdown(self) -> None:
        """Stop serving: readyz goes 503 (and new clients are refused) at once;
        after ``http.drain_delay`` every client is told 1012 / its SSE stream
        ends, each with its own reconnect delay within ``http.reconnect_spread``
        so the other nodes are not hit by all of them at once; returns when all
        are gone or after ``http.shutdown_grace``. Idempotent."""
        http = self.settings.http
        if not self.draining:
            self.draining = True
            if http.drain_delay:
                await asyncio.sleep(http.drain_delay)
        spread_ms = int(http.reconnect_spread * 1000)
        for session in list(self.sessions):
            session.close(SHUTDOWN.reconnect_in(random.randint(0, spread_ms)) if spread_ms else SHUTDOWN)
        deadline = time.monotonic() + http.shutdown_grace
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.sessions:
            log.info("%d connections did not close within the grace; aborting", len(self.sessions))

    async def close(self) -> None:
        await self.broker.close()
