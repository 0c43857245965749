"""Settings: frozen dataclasses built once from ``herald.toml`` and ``HERALD_*``.

Every key has an environment name: ``[http] port`` → ``HERALD_HTTP_PORT``; the
environment wins over the file. A bad key or value raises ConfigError with one
line naming the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import socket
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .limits import normal_origin

DEFAULT_CONFIG_PATH = Path("config/herald.toml")
ENV_PREFIX = "HERALD_"
# Environment names that are not settings keys.
_ENV_NOT_KEYS = frozenset({"HERALD_CONFIG"})


class ConfigError(ValueError):
    """One bad key or value; the message names it, on one line (a name or value
    quoted from the file may hold a newline or bytes that are not text)."""

    def __init__(self, message: str) -> None:
        printable = message.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        super().__init__(re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m[0])[1:-1], printable))


@dataclass(frozen=True, slots=True)
class NodeSettings:
    id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")


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
    # On SIGTERM: seconds readyz answers 503 before clients are told to go,
    # and the window over which their reconnects are spread (random per client).
    drain_delay: float = 0.0
    reconnect_spread: float = 2.0
    # POST /api/dev/token mints a token for any user: development only (herald dev).
    dev_tokens: bool = False


@dataclass(frozen=True, slots=True)
class NatsSettings:
    urls: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    connect_timeout: float = 5.0
    reconnect_wait: float = 1.0
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
    audience: str = ""
    issuer: str = ""
    require_exp: bool = True
    leeway: float = 0.0


@dataclass(frozen=True, slots=True)
class PublishSettings:
    key: str = ""


@dataclass(frozen=True, slots=True)
class AdminSettings:
    key: str = ""
    host: str = "127.0.0.1"
    port: int = 0


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
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"


def hook_routes(routes: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Parse ``hooks.routes``; ValueError names the bad entry."""
    parsed = []
    for route in routes:
        glob, sep, url = route.partition("=")
        if not (sep and glob.strip() and url.strip().startswith(("http://", "https://"))):
            raise ValueError(f"{route!r} is not event-glob=http(s)://url")
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


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Settings)
    return {f.name: hints[f.name] for f in dataclasses.fields(Settings)}


def _convert(name: str, default: Any, raw: Any, from_env: bool) -> Any:
    """Coerce ``raw`` to the type of ``default``; raise ConfigError naming the key."""
    try:
        if isinstance(default, bool):
            if isinstance(raw, bool):
                return raw
            if (
                from_env
                and isinstance(raw, str)
                and raw.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off")
            ):
                return raw.lower() in ("1", "true", "yes", "on")
            raise ValueError("expected true or false")
        if isinstance(default, int):
            if isinstance(raw, bool):
                raise ValueError("expected an integer")
            if isinstance(raw, int):
                return raw
            if from_env and isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
                return int(raw)
            raise ValueError("expected an integer")
        if isinstance(default, float):
            if isinstance(raw, bool):
                raise ValueError("expected a number")
            number: float | None = None
            if isinstance(raw, (int, float)):
                number = float(raw)
            elif from_env and isinstance(raw, str):
                with contextlib.suppress(ValueError):
                    number = float(raw)
            if number is None or not math.isfinite(number):
                raise ValueError("expected a finite number")
            return number
        if isinstance(default, tuple):
            if from_env and isinstance(raw, str):
                return tuple(item.strip() for item in raw.split(",") if item.strip())
            if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
                return tuple(raw)
            raise ValueError("expected a list of strings")
        if isinstance(raw, str):
            return raw
        raise ValueError("expected a string")
    except ValueError as exc:
        raise ConfigError(f"config error: {name}: {exc}, got {raw!r}") from None


def load_settings(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    use_default_file: bool = True,
) -> Settings:
    """Build Settings from a TOML file (``path``, else ``$HERALD_CONFIG``, else
    ``config/herald.toml`` if present) and the environment."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    chosen = path or env.get("HERALD_CONFIG")
    if chosen is None and use_default_file and DEFAULT_CONFIG_PATH.exists():
        chosen = DEFAULT_CONFIG_PATH
    if chosen is not None:
        try:
            with open(chosen, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"config error: cannot read {chosen}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config error: {chosen}: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config error: {chosen} is not UTF-8 (byte {exc.start})") from None

    sections = _sections()
    for section_name, section in data.items():
        if section_name not in sections:
            raise ConfigError(f"config error: unknown section [{section_name}]")
        if not isinstance(section, dict):
            raise ConfigError(f"config error: [{section_name}] must be a table")

    known_env: set[str] = set(_ENV_NOT_KEYS)
    built: dict[str, Any] = {}
    for section_name, cls in sections.items():
        defaults = cls()
        file_values = data.get(section_name, {})
        key_names = {f.name for f in dataclasses.fields(cls)}
        for key in file_values:
            if key not in key_names:
                raise ConfigError(f"config error: unknown key {section_name}.{key}")
        values: dict[str, Any] = {}
        for key in key_names:
            default = getattr(defaults, key)
            env_name = f"{ENV_PREFIX}{section_name.upper()}_{key.upper()}"
            known_env.add(env_name)
            if env_name in env:
                values[key] = _convert(f"{section_name}.{key} ({env_name})", default, env[env_name], True)
            elif key in file_values:
                values[key] = _convert(f"{section_name}.{key}", default, file_values[key], False)
        built[section_name] = cls(**values)

    for name in env:
        if name.startswith(ENV_PREFIX) and name not in known_env:
            raise ConfigError(f"config error: unknown environment variable {name}")

    settings = Settings(**built)
    validate(settings)
    return settings


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config error: {key}: {message}")


def validate(s: Settings) -> None:
    from broker.channels import Subjects

    _require(
        bool(s.node.id) and all(c.isalnum() or c in "-_." for c in s.node.id),
        "node.id",
        "letters, digits, '-', '_' or '.'",
    )
    _require(0 <= s.http.port <= 65535, "http.port", "must be 0..65535")
    _require(0 <= s.admin.port <= 65535, "admin.port", "must be 0..65535 (0: on the main port)")
    _require(s.http.backlog > 0, "http.backlog", "must be > 0")
    _require(s.http.max_body >= 1024, "http.max_body", "must be >= 1024")
    _require(s.http.shutdown_grace >= 0, "http.shutdown_grace", "must be >= 0")
    _require(s.http.drain_delay >= 0, "http.drain_delay", "must be >= 0")
    _require(s.http.handshake_timeout > 0, "http.handshake_timeout", "must be > 0")
    _require(s.limits.max_connections >= 0, "limits.max_connections", "must be >= 0 (0: no limit)")
    _require(0 <= s.http.reconnect_spread <= 300, "http.reconnect_spread", "must be 0 to 300 seconds")
    _require(len(s.nats.urls) > 0, "nats.urls", "at least one URL")
    for url in s.nats.urls:
        _require(
            url.split("://", 1)[0] in ("nats", "tls", "ws", "wss") and "://" in url, "nats.urls", f"bad URL {url!r}"
        )
    _require(s.nats.connect_timeout > 0, "nats.connect_timeout", "must be > 0")
    _require(s.nats.publish_timeout > 0, "nats.publish_timeout", "must be > 0")
    _require(
        s.nats.user_subscriptions in ("per-user", "shared"), "nats.user_subscriptions", "must be per-user or shared"
    )
    _require(s.nats.unsubscribe_delay >= 0, "nats.unsubscribe_delay", "must be >= 0")
    try:
        Subjects(s.subject.prefix, s.live_prefix)
    except ValueError as exc:
        raise ConfigError(f"config error: subject.prefix / subject.live_prefix: {exc}") from None
    _require(
        bool(s.stream.name) and s.stream.name.replace("_", "").replace("-", "").isalnum(),
        "stream.name",
        "letters, digits, '-' or '_'",
    )
    _require(s.stream.replicas in (1, 3, 5), "stream.replicas", "must be 1, 3 or 5")
    _require(s.stream.storage in ("file", "memory"), "stream.storage", "must be file or memory")
    _require(1.0 <= s.presence.ttl <= 300.0, "presence.ttl", "must be between 1 and 300 seconds")
    try:
        hook_routes(s.hooks.routes)
    except ValueError as exc:
        _require(False, "hooks.routes", str(exc))
    h = s.hooks
    _require(not h.url or h.url.startswith(("http://", "https://")), "hooks.url", "must be an http(s) URL")
    _require(h.offline_after >= 0 and h.unread_after >= 0, "hooks.offline_after", "delays must be >= 0")
    _require(h.timeout > 0 and h.horizon > 0 and h.max_backoff > 0, "hooks.timeout", "must be > 0 (and horizon)")
    _require(1 <= h.concurrency <= 1000, "hooks.concurrency", "must be between 1 and 1000")
    try:
        room_history_rules(s.rooms.history)
    except ValueError as exc:
        _require(False, "rooms.history", str(exc))
    for key in ("user_max", "room_max", "replay_max"):
        _require(getattr(s.history, key) >= 1, f"history.{key}", "must be >= 1")
    for key in ("user_max_age", "room_max_age", "replay_timeout"):
        _require(getattr(s.history, key) > 0, f"history.{key}", "must be > 0 seconds")
    _require(not (s.jwt.secret and s.jwt.public_key), "jwt.secret", "set jwt.secret or jwt.public_key, not both")
    _require(
        not s.http.dev_tokens or bool(s.jwt.secret),
        "http.dev_tokens",
        "needs jwt.secret (the node must be able to sign tokens)",
    )
    if s.jwt.public_key:
        try:
            found = Path(s.jwt.public_key).is_file()
        except OSError:  # e.g. a name too long
            found = False
        _require(found, "jwt.public_key", f"no such file {s.jwt.public_key!r}")
        from .auth import key_algorithm

        try:
            key_algorithm(Path(s.jwt.public_key).read_bytes())
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"config error: jwt.public_key: {exc}") from None
    _require(s.ws.heartbeat >= 0, "ws.heartbeat", "must be >= 0")
    _require(s.ws.max_frame >= 1024, "ws.max_frame", "must be >= 1024")
    _require(s.ws.close_timeout > 0, "ws.close_timeout", "must be > 0")
    _require(s.sse.keepalive > 0, "sse.keepalive", "must be > 0")
    _require(s.sse.retry >= 0, "sse.retry", "must be >= 0")
    _require(s.backpressure.max_bytes >= 1024, "backpressure.max_bytes", "must be >= 1024")
    _require(s.backpressure.max_messages >= 1, "backpressure.max_messages", "must be >= 1")
    _require(
        s.backpressure.policy in ("disconnect", "drop-oldest"),
        "backpressure.policy",
        "must be disconnect or drop-oldest",
    )
    _require(s.backpressure.write_buffer >= 1024, "backpressure.write_buffer", "must be >= 1024")
    _require(
        s.backpressure.write_buffer < s.backpressure.max_bytes,
        "backpressure.write_buffer",
        "must be smaller than backpressure.max_bytes",
    )
    _require(s.backpressure.socket_buffer >= 0, "backpressure.socket_buffer", "must be >= 0 (0: kernel default)")
    _require(s.backpressure.stall_timeout > 0, "backpressure.stall_timeout", "must be > 0")
    _require(0 <= s.backpressure.write_delay <= 1, "backpressure.write_delay", "must be between 0 and 1 (seconds)")
    _require(s.limits.max_subscriptions >= 1, "limits.max_subscriptions", "must be >= 1")
    _require(
        s.limits.connections_policy in ("refuse-new", "close-oldest"),
        "limits.connections_policy",
        "must be refuse-new or close-oldest",
    )
    for key in ("publish_rate", "command_rate", "abuse_strikes", "max_connections_per_user"):
        _require(getattr(s.limits, key) >= 1, f"limits.{key}", "must be >= 1")
    for key in ("rate_window", "api_rate"):
        _require(getattr(s.limits, key) > 0, f"limits.{key}", "must be > 0")
    for origin in s.limits.origins:
        _require(
            origin == "*" or normal_origin(origin) is not None,
            "limits.origins",
            f"{origin!r} is not an origin like https://app.example.com (scheme://host[:port], no path) or *",
        )
    _require(s.log.level in ("debug", "info", "warning", "error"), "log.level", "debug, info, warning or error")


def with_overrides(settings: Settings, **sections: dict[str, Any]) -> Settings:
    """A copy with some keys replaced: ``with_overrides(s, http={"port": 0})``."""
    changes = {name: dataclasses.replace(getattr(settings, name), **values) for name, values in sections.items()}
    result = dataclasses.replace(settings, **changes)
    validate(result)
    return result
