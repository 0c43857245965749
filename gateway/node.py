"""A node's composition root: ``build_node`` makes every part of one process
and hands each only what it needs; ``Node`` holds them for the application's
life (start, drain, close)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from broker import Broker, BrokerEvents, Retention, RetentionPolicy
from broker.channels import Subjects
from broker.jetstream import NatsBroker, NatsConfig
from broker.throttle import Throttle

from .admission import Gate
from .auth import Authenticator, AuthError
from .command_route import CommandRouter
from .commands import Commands
from .connect_hook import ConnectHook
from .flusher import Flusher
from .http import TrustedProxies
from .hub import Hub
from .metrics import Metrics
from .outbound import QueueLimits
from .readiness import not_ready
from .resume import Resumer
from .server_api import NodeRequests, UserActions
from .sessions import Sessions
from .settings import Settings, room_history_rules
from .subscriptions import Subscriptions

log = logging.getLogger("herald.node")
# How long a drain waits for its connections to be counted out before telling clients to go.
COUNT_OUT_WAIT = 3.0

BrokerFactory = Callable[[BrokerEvents], Broker]


def nats_config(settings: Settings) -> NatsConfig:
    h = settings.history
    n = settings.nats
    return NatsConfig(
        urls=n.urls,
        name=f"herald-{settings.node.id}",
        connect_timeout=n.connect_timeout,
        reconnect_wait=n.reconnect_wait,
        ping_interval=n.ping_interval,
        subjects=Subjects(settings.subject.prefix, settings.live_prefix),
        stream=settings.stream.name,
        replicas=settings.stream.replicas,
        storage=settings.stream.storage,
        history=RetentionPolicy(
            Retention(h.user_max, h.user_max_age),
            Retention(h.room_max, h.room_max_age),
            tuple((glob, Retention(n, age)) for glob, n, age in room_history_rules(settings.rooms.history)),
        ),
        max_bytes=settings.stream.max_bytes,
        publish_timeout=n.publish_timeout,
        dedup_window=settings.publish.dedup_window,
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


class Failure:
    """Why the node must stop on its own (its NATS connection closed for
    good: a node without NATS would answer 503 to everything until
    restarted), and ``stop``, set then (and by SIGTERM: see server.run_node)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.stop = asyncio.Event()

    def __call__(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.stop.set()


@dataclass(frozen=True, slots=True)
class Node:
    """The parts of one node, made complete by ``build_node``."""

    settings: Settings
    metrics: Metrics
    broker: Broker
    hub: Hub
    subscriptions: Subscriptions
    sessions: Sessions
    gate: Gate
    resumer: Resumer
    commands: Commands
    router: CommandRouter
    failure: Failure
    proxies: TrustedProxies  # http.trusted_proxies: who a request's client is, for logs and the connect hook
    hook: ConnectHook | None = None  # auth.mode "hook" or "either"

    @property
    def id(self) -> str:
        return self.settings.node.id

    async def start(self) -> None:
        await self.broker.start()

    async def shutdown(self) -> None:
        """Stop serving: readyz goes 503 (and new clients are refused) at once;
        after ``http.drain_delay`` every connection is counted out of its
        user's count (a client coming back elsewhere at once is not refused
        for it), then every client is told 1012 / its SSE stream ends, each
        with its own reconnect delay within ``http.reconnect_spread`` so the
        other nodes are not hit by all of them at once; returns when all are
        gone or after ``http.shutdown_grace``. Idempotent."""
        http = self.settings.http
        if not self.sessions.draining:
            self.sessions.draining = True
            if http.drain_delay:
                await asyncio.sleep(http.drain_delay)
            if self.broker.ready:  # else the writes would only wait for NATS
                await self.gate.count_out_first(list(self.sessions), min(COUNT_OUT_WAIT, http.shutdown_grace))
        await self.sessions.close_all(http.reconnect_spread, http.shutdown_grace)

    async def close(self) -> None:
        if self.hook is not None:
            await self.hook.close()
        await self.broker.close()


def build_node(settings: Settings, broker_factory: BrokerFactory | None = None) -> Node:
    """Every part of a node, each given only what it uses."""
    metrics = Metrics()
    warn = Throttle(log)

    def refused(exc: AuthError, peer: str) -> None:
        metrics.auth_failures.labels(exc.reason).inc()
        warn("auth:" + exc.reason, "refused token from %s: %s", peer, exc)

    authenticator = Authenticator(settings.jwt, refused)
    bp = settings.backpressure
    hub = Hub(bp.drop_oldest_rooms, bp.policy == "drop-oldest", metrics.resets_gap.inc)
    queue_limits = QueueLimits(
        bp.max_bytes,
        bp.max_messages,
        bp.write_buffer,
        bp.stall_timeout,
        max_held=max(bp.max_messages, settings.history.replay_max),
    )
    flusher = Flusher(metrics.dropped_queue_full.inc, bp.write_delay)
    sessions = Sessions(settings.node.id, flusher, queue_limits, metrics)

    def clock_read(offset: float) -> None:
        flusher.clock_offset = offset
        metrics.clock_offset.set(offset)

    async def requested(body: bytes) -> bytes:
        # What another node asks this one: ``requests`` is made below, before
        # the broker starts (no request can arrive earlier).
        return await requests.answer(body)

    failure = Failure()
    events = BrokerEvents(hub.deliver, hub.lost, sessions.kick, requested, clock_read, failure)
    broker = (broker_factory or (lambda e: NatsBroker(nats_config(settings), e)))(events)
    subscriptions = Subscriptions(hub, broker.pubsub, broker.presence)
    resumer = Resumer(subscriptions, broker.history, broker.reads, hub.droppable, settings.history, metrics)
    commands = Commands(
        settings.limits,
        settings.rooms.client_publish,
        subscriptions,
        resumer,
        broker.pubsub,
        broker.history,
        settings.history.page_max,
        broker.reads,
        broker.presence,
        authenticator,
        metrics,
        warn,
    )
    auth = settings.auth
    hook = ConnectHook(auth, metrics) if auth.mode != "jwt" else None
    proxies = TrustedProxies(settings.http.trusted_proxies)
    gate = Gate(
        settings.limits,
        sessions,
        subscriptions,
        broker.connections,
        authenticator,
        metrics,
        warn,
        auth.mode,
        hook,
        proxies,
    )
    router = CommandRouter(
        settings.node.id, gate.identify, sessions, commands, broker.relay, settings.http.command_timeout, metrics
    )
    actions = UserActions(sessions, subscriptions, gate.count_out_first, hook.forget if hook else None)
    requests = NodeRequests(router, actions)
    metrics.watch_broker(broker.stats)
    metrics.watch_queue_bytes(flusher.held.total)
    metrics.watch_ready(lambda: not_ready(sessions, broker) is None)
    return Node(
        settings, metrics, broker, hub, subscriptions, sessions, gate, resumer, commands, router, failure, proxies, hook
    )
