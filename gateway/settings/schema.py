"""The settings schema: one frozen dataclass per ``herald.toml`` section, with
its defaults; ConfigError; and the parsers of values whose syntax is ours
(``rooms.history``, ``hooks.routes``). Imports nothing of the project and reads
no file or environment, so any module may import it without a cycle.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """One bad key or value; the message names it, on one line (a name or value
    quoted from the file may hold a newline or bytes that are not text)."""

    def __init__(self, message: str) -> None:
        printable = message.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        super().__init__(re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m[0])[1:-1], printable))


@dataclass(frozen=True, slots=True)
class NodeSettings:
    id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    # Seconds between two hand-backs of the heap's free pages to the OS
    # (glibc's malloc_trim; gateway/heap.py says why). 0: never.
    heap_trim_interval: float = 60.0


@dataclass(frozen=True, slots=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    backlog: int = 2048
    max_body: int = 65536
    shutdown_grace: float = 3.0
    # Seconds a new connection has to send its whole request (and an idle
    # keep-alive connection to send the next): slow-header clients are cut.
    handshake_timeout: float = 10.0
    # POST /api/command: seconds to send the body, and for the node holding
    # the stream to answer a command forwarded to it.
    command_timeout: float = 10.0
    # On SIGTERM: seconds readyz answers 503 before clients are told to go,
    # and the window over which their reconnects are spread (random per client).
    drain_delay: float = 0.0
    reconnect_spread: float = 2.0
    # serve --workers: a worker whose event loop has not said it is alive
    # (every second) for this long is killed and the node stopped (0: never).
    worker_timeout: float = 30.0
    # POST /api/dev/token mints a token for any user: development only (herald dev).
    dev_tokens: bool = False
    # CIDRs of the proxies in front of the node: X-Forwarded-For is honoured
    # only from them (the right-most address not itself trusted is the client).
    trusted_proxies: tuple[str, ...] = ()
    # TCP_USER_TIMEOUT of each stream's socket (WS and SSE), in seconds: bytes
    # the peer has not acknowledged for this long abort the connection, so a
    # half-open stream (the client's network went, no FIN came) is counted out
    # after about this plus one keep-alive. 0: the kernel's own limit (~15 min).
    tcp_user_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class NatsSettings:
    urls: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    connect_timeout: float = 5.0
    reconnect_wait: float = 1.0
    ping_interval: float = 10.0
    publish_timeout: float = 5.0
    unsubscribe_delay: float = 1.0
    pending_msgs_limit: int = 65536
    pending_bytes_limit: int = 64 * 1024 * 1024
    user_subscriptions: str = "per-user"


@dataclass(frozen=True, slots=True)
class SubjectSettings:
    prefix: str = "herald"
    live_prefix: str = ""  # default: "<prefix>_live"


@dataclass(frozen=True, slots=True)
class StreamSettings:
    name: str = "HERALD"
    replicas: int = 1
    storage: str = "file"
    max_bytes: int = -1


@dataclass(frozen=True, slots=True)
class HistorySettings:
    user_max: int = 50
    user_max_age: float = 7 * 86400.0
    room_max: int = 1000
    room_max_age: float = 86400.0
    # A connection without a resume position first gets its user's unread messages.
    inbox: bool = True
    # Most messages one resume (or one gap repair) replays; the newest are kept.
    replay_max: int = 10_000
    replay_timeout: float = 10.0
    # Most messages one page of history holds (the history command, GET /api/history).
    page_max: int = 200


@dataclass(frozen=True, slots=True)
class PresenceSettings:
    # Seconds after which a node that stopped refreshing (crashed) no longer
    # counts: its users leave every room's presence within this bound.
    ttl: float = 15.0


@dataclass(frozen=True, slots=True)
class RoomsSettings:
    # Room globs whose members get join / leave frames.
    join_leave: tuple[str, ...] = ()
    # Room globs clients may publish into at all (the token's publish claim still applies).
    client_publish: tuple[str, ...] = ("*",)
    # History per room glob, "glob=max_messages/max_age_seconds"; first match wins,
    # other rooms use history.room_max / room_max_age.
    history: tuple[str, ...] = ()


def room_history_rules(rules: tuple[str, ...]) -> tuple[tuple[str, int, float], ...]:
    """Parse ``rooms.history`` entries; ValueError names the bad one."""
    parsed = []
    for rule in rules:
        glob, sep, limits = rule.partition("=")
        count, slash, age = limits.partition("/")
        try:
            if not (sep and slash and glob.strip()):
                raise ValueError
            max_msgs, max_age = int(count), float(age)
            if max_msgs < 1 or not max_age > 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"{rule!r} is not glob=max_messages/max_age_seconds, e.g. chat-*=200/3600") from None
        parsed.append((glob.strip(), max_msgs, max_age))
    return tuple(parsed)


@dataclass(frozen=True, slots=True)
class JwtSettings:
    secret: str = ""
    public_key: str = ""
    # During a rotation, tokens signed with the key being replaced are taken too.
    secret_previous: str = ""
    public_key_previous: str = ""
    audience: str = ""
    issuer: str = ""
    require_exp: bool = True
    leeway: float = 0.0


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Who a stream is: its JWT (``[jwt]``), or the app's answer to the connect hook."""

    # "jwt": tokens only; "hook": the connect hook decides, tokens are ignored;
    # "either": a token when the request has one, else the connect hook.
    mode: str = "jwt"
    connect_url: str = ""
    # Signs each hook request (Herald-Signature, as webhooks are signed); during
    # a rotation both sign.
    connect_secret: str = ""
    connect_secret_previous: str = ""
    # Seconds for the app's answer; past it the stream is refused (503 / 1013).
    connect_timeout: float = 2.0
    # Seconds an answer is reused for the same Cookie header (never past its
    # expires); 0: the hook is asked for every stream and command.
    connect_cache_ttl: float = 60.0


@dataclass(frozen=True, slots=True)
class PublishSettings:
    key: str = ""
    key_previous: str = ""  # during a rotation both are taken
    # Seconds a publish's Idempotency-Key is remembered (the stream's duplicate window).
    dedup_window: float = 120.0
    # POST /api/publish with a JSON array: most items, and most bytes in the whole body.
    max_batch: int = 1000
    max_batch_body: int = 1048576

    @property
    def bearer_keys(self) -> tuple[str, ...]:
        """The keys taken: ``key``, and during a rotation ``key_previous``."""
        return tuple(k for k in (self.key, self.key_previous) if k)


@dataclass(frozen=True, slots=True)
class AdminSettings:
    key: str = ""
    key_previous: str = ""  # during a rotation both are taken
    host: str = "127.0.0.1"
    port: int = 0

    @property
    def bearer_keys(self) -> tuple[str, ...]:
        """The keys taken: ``key``, and during a rotation ``key_previous``."""
        return tuple(k for k in (self.key, self.key_previous) if k)


@dataclass(frozen=True, slots=True)
class HooksSettings:
    """The webhook dispatcher (``herald hooks``): user-channel messages of
    users who are offline (or leave them unread) are POSTed to ``url``."""

    url: str = ""
    # "event-glob=url" entries: the first whose glob matches the event wins; else ``url``.
    routes: tuple[str, ...] = ()
    secret: str = ""
    secret_previous: str = ""  # during a key rotation both sign each request
    offline_after: float = 60.0
    unread_after: float = 0.0  # 0: a user online at the time is never sent a webhook
    timeout: float = 10.0
    horizon: float = 86400.0  # retry until the message is this old, then dead-letter it
    max_backoff: float = 600.0
    concurrency: int = 16
    # Messages handed out and not yet answered, across all dispatchers: those
    # being POSTed and those waiting (Retry-After, backoff, offline_after,
    # unread_after). At it, JetStream hands out no new message on any route.
    max_ack_pending: int = 10_000
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"


def hook_url(url: str) -> bool:
    """Whether ``url`` is one a webhook can be POSTed to: http(s), a host, a valid port."""
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1) > 0
    except ValueError:  # e.g. "http://[::1/hook", a port out of range
        return False


def hook_routes(routes: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Parse ``hooks.routes``; ValueError names the bad entry."""
    parsed = []
    for route in routes:
        glob, sep, url = route.partition("=")
        if not (sep and glob.strip() and hook_url(url.strip())):
            raise ValueError(f"{route!r} is not event-glob=http(s)://host/path")
        parsed.append((glob.strip(), url.strip()))
    return tuple(parsed)


@dataclass(frozen=True, slots=True)
class WsSettings:
    heartbeat: float = 30.0
    max_frame: int = 65536
    close_timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class SseSettings:
    keepalive: float = 15.0
    retry: int = 2000


@dataclass(frozen=True, slots=True)
class BackpressureSettings:
    max_bytes: int = 1024 * 1024
    max_messages: int = 2000
    policy: str = "disconnect"
    drop_oldest_rooms: tuple[str, ...] = ()
    write_buffer: int = 64 * 1024
    socket_buffer: int = 128 * 1024
    stall_timeout: float = 30.0
    # Seconds a loop pass's writes wait so that more messages join them (one
    # write per connection per pass): fewer syscalls for that much latency.
    write_delay: float = 0.0


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    max_subscriptions: int = 100
    # Open streams (WS + SSE) on this node; one more gets HTTP 503. 0: no limit.
    max_connections: int = 20000
    # Open connections per user, across the cluster, and what happens to one more:
    # "refuse-new" (WS close 4029 / HTTP 429) or "close-oldest" (that one gets 4029).
    max_connections_per_user: int = 10
    connections_policy: str = "refuse-new"
    # Browser origins allowed to open streams: empty = the node's own origin, "*" = any.
    origins: tuple[str, ...] = ()
    # Client commands per connection per rate_window: publishes, and the rest.
    publish_rate: int = 20
    command_rate: int = 120
    rate_window: float = 60.0
    # Refused commands in a row that close the connection 4029.
    abuse_strikes: int = 10
    # HTTP publishes per second per publish key (also the burst).
    api_rate: float = 1000.0


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = "info"


@dataclass(frozen=True, slots=True)
class Settings:
    node: NodeSettings = field(default_factory=NodeSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    nats: NatsSettings = field(default_factory=NatsSettings)
    subject: SubjectSettings = field(default_factory=SubjectSettings)
    stream: StreamSettings = field(default_factory=StreamSettings)
    history: HistorySettings = field(default_factory=HistorySettings)
    presence: PresenceSettings = field(default_factory=PresenceSettings)
    rooms: RoomsSettings = field(default_factory=RoomsSettings)
    jwt: JwtSettings = field(default_factory=JwtSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    publish: PublishSettings = field(default_factory=PublishSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    ws: WsSettings = field(default_factory=WsSettings)
    sse: SseSettings = field(default_factory=SseSettings)
    backpressure: BackpressureSettings = field(default_factory=BackpressureSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    log: LogSettings = field(default_factory=LogSettings)
    hooks: HooksSettings = field(default_factory=HooksSettings)

    @property
    def live_prefix(self) -> str:
        return self.subject.live_prefix or f"{self.subject.prefix}_live"
