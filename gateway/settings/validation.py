"""Checking Settings as a whole: ranges, choices, the syntax of names and URLs,
and keys that only make sense together. A failed check raises ConfigError
naming the key, on one line.
"""

from __future__ import annotations

from pathlib import Path

from broker.channels import Subjects

from ..auth import key_algorithm
from ..limits import normal_origin
from .schema import ConfigError, Settings, hook_routes, room_history_rules


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config error: {key}: {message}")


def validate(s: Settings) -> None:
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
