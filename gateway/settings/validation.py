"""Checking Settings as a whole: ranges, choices, the syntax of names and URLs,
and keys that only make sense together. A failed check raises ConfigError
naming the key, on one line.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from pathlib import Path

from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import InvalidKeyError

from broker.channels import Subjects
from broker.redact import redacted

from ..limits import normal_origin
from ..public_keys import key_algorithm
from .schema import (
    AdminSettings,
    AuthSettings,
    BackpressureSettings,
    ConfigError,
    HistorySettings,
    HooksSettings,
    HttpSettings,
    JwtSettings,
    LimitsSettings,
    LogSettings,
    NatsSettings,
    NodeSettings,
    PresenceSettings,
    PublishSettings,
    RoomsSettings,
    Settings,
    SseSettings,
    StreamSettings,
    WsSettings,
    hook_routes,
    hook_url,
    room_history_rules,
)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config error: {key}: {message}")


# The largest number any setting takes: NATS limits are 64-bit, timers and
# JSON want exact integers; nothing meaningful is near it.
MAX_NUMBER = 2**53
# Settings where a negative number means something: -1 for "none".
NEGATIVE_MEANS_NONE = {"stream.max_bytes"}


def validate(s: Settings) -> None:
    """Raise ConfigError naming the first bad key, checking the sections in this order."""
    _numbers(s)
    _node(s.node)
    _http(s.http)
    _publish(s.publish, s.http)
    _admin(s.admin, s.http)
    _nats(s.nats)
    _subject(s)
    _stream(s.stream)
    _presence(s.presence)
    _hooks(s.hooks)
    _rooms(s.rooms)
    _history(s.history)
    _dedup_window(s)
    _jwt(s.jwt, s.http)
    _auth(s.auth)
    _ws(s.ws)
    _sse(s.sse)
    _backpressure(s.backpressure)
    _limits(s.limits)
    _log(s.log)


def _numbers(s: Settings) -> None:
    """What no number may be, whichever setting it is: negative (but -1 where
    it means none), or beyond ``MAX_NUMBER``."""
    for section in dataclasses.fields(s):
        part = getattr(s, section.name)
        if not dataclasses.is_dataclass(part):
            continue
        for field in dataclasses.fields(part):
            value = getattr(part, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            key = f"{section.name}.{field.name}"
            lowest = -1 if key in NEGATIVE_MEANS_NONE else 0
            _require(value >= lowest, key, "must be >= 0" if lowest == 0 else "must be >= 0, or -1 for none")
            _require(value <= MAX_NUMBER, key, f"must be at most {MAX_NUMBER}")


# Names that go into NATS subjects, streams and buckets: ASCII only.
_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _node(node: NodeSettings) -> None:
    _require(
        _NAME.fullmatch(node.id.replace(".", "_")) is not None,
        "node.id",
        "letters, digits, '-', '_' or '.'",
    )


def _http(http: HttpSettings) -> None:
    _require(bool(http.host), "http.host", 'must not be empty (every interface: "0.0.0.0")')
    _require(0 <= http.port <= 65535, "http.port", "must be 0..65535")
    _require(0 < http.backlog <= 65535, "http.backlog", "must be 1 to 65535")
    _require(http.max_body >= 1024, "http.max_body", "must be >= 1024")
    _require(http.shutdown_grace >= 0, "http.shutdown_grace", "must be >= 0")
    _require(http.drain_delay >= 0, "http.drain_delay", "must be >= 0")
    _require(http.handshake_timeout > 0, "http.handshake_timeout", "must be > 0")
    _require(http.command_timeout > 0, "http.command_timeout", "must be > 0")
    _require(
        http.worker_timeout == 0 or http.worker_timeout >= 2,
        "http.worker_timeout",
        "must be 0 (never) or >= 2 (each worker says it is alive every second)",
    )
    _require(0 <= http.reconnect_spread <= 300, "http.reconnect_spread", "must be 0 to 300 seconds")
    _require(
        0 <= http.tcp_user_timeout <= 3600,
        "http.tcp_user_timeout",
        "must be 0 (the kernel's own limit) to 3600 seconds",
    )
    for cidr in http.trusted_proxies:
        try:
            ipaddress.ip_network(cidr)
        except ValueError:
            _require(False, "http.trusted_proxies", f"{cidr!r} is not a network like 10.0.0.0/8 or 127.0.0.1/32")


def _previous(current: str, previous: str, key: str, needs: str) -> None:
    """A ``*_previous`` key is the one a rotation replaces: it needs the one
    replacing it, and is another (the values are never quoted: they are secrets)."""
    if previous:
        _require(bool(current), key, f"needs {needs} (the key that replaces it)")
        _require(previous != current, key, f"is the same as {needs}: drop it, or set the old key there")


def _publish(publish: PublishSettings, http: HttpSettings) -> None:
    _previous(publish.key, publish.key_previous, "publish.key_previous", "publish.key")
    _require(1 <= publish.dedup_window <= 86400, "publish.dedup_window", "must be 1 to 86400 seconds")
    _require(1 <= publish.max_batch <= 10_000, "publish.max_batch", "must be 1 to 10000")
    _require(
        publish.max_batch_body >= http.max_body, "publish.max_batch_body", "must be >= http.max_body (one item's limit)"
    )


def _admin(admin: AdminSettings, http: HttpSettings) -> None:
    _previous(admin.key, admin.key_previous, "admin.key_previous", "admin.key")
    _require(0 <= admin.port <= 65535, "admin.port", "must be 0..65535 (0: on the main port)")
    _require(bool(admin.host), "admin.host", 'must not be empty (every interface: "0.0.0.0")')
    _require(
        not admin.port or admin.port != http.port, "admin.port", "must differ from http.port (0: on the main port)"
    )


def _nats(nats: NatsSettings) -> None:
    _require(len(nats.urls) > 0, "nats.urls", "at least one URL")
    for url in nats.urls:
        scheme_ok = url.split("://", 1)[0] in ("nats", "tls", "ws", "wss") and "://" in url
        _require(scheme_ok, "nats.urls", f"bad URL {redacted(url)!r}")
    _require(nats.connect_timeout > 0, "nats.connect_timeout", "must be > 0")
    _require(nats.ping_interval > 0, "nats.ping_interval", "must be > 0")
    _require(nats.publish_timeout > 0, "nats.publish_timeout", "must be > 0")
    _require(nats.user_subscriptions in ("per-user", "shared"), "nats.user_subscriptions", "must be per-user or shared")
    _require(nats.unsubscribe_delay >= 0, "nats.unsubscribe_delay", "must be >= 0")


def _subject(s: Settings) -> None:
    try:
        Subjects(s.subject.prefix, s.live_prefix)
    except ValueError as exc:
        raise ConfigError(f"config error: subject.prefix / subject.live_prefix: {exc}") from None


def _stream(stream: StreamSettings) -> None:
    _require(
        _NAME.fullmatch(stream.name) is not None,
        "stream.name",
        "letters, digits, '-' or '_'",
    )
    _require(stream.replicas in (1, 3, 5), "stream.replicas", "must be 1, 3 or 5")
    _require(stream.storage in ("file", "memory"), "stream.storage", "must be file or memory")


def _presence(presence: PresenceSettings) -> None:
    _require(1.0 <= presence.ttl <= 300.0, "presence.ttl", "must be between 1 and 300 seconds")


def _hooks(h: HooksSettings) -> None:
    _previous(h.secret, h.secret_previous, "hooks.secret_previous", "hooks.secret")
    try:
        hook_routes(h.routes)
    except ValueError as exc:
        _require(False, "hooks.routes", str(exc))
    _require(not h.url or hook_url(h.url), "hooks.url", "must be an http(s) URL with a host")
    for key in ("offline_after", "unread_after"):
        _require(getattr(h, key) >= 0, f"hooks.{key}", "must be >= 0 seconds")
    for key in ("timeout", "horizon", "max_backoff"):
        _require(getattr(h, key) > 0, f"hooks.{key}", "must be > 0 seconds")
    _require(1 <= h.concurrency <= 1000, "hooks.concurrency", "must be between 1 and 1000")
    _require(1 <= h.max_ack_pending <= 1_000_000, "hooks.max_ack_pending", "must be between 1 and 1000000")
    _require(0 <= h.metrics_port <= 65535, "hooks.metrics_port", "must be 0..65535 (0: none)")


def _rooms(rooms: RoomsSettings) -> None:
    try:
        room_history_rules(rooms.history)
    except ValueError as exc:
        _require(False, "rooms.history", str(exc))


def _history(history: HistorySettings) -> None:
    for key in ("user_max", "room_max", "replay_max"):
        _require(getattr(history, key) >= 1, f"history.{key}", "must be >= 1")
    _require(1 <= history.page_max <= 1000, "history.page_max", "must be 1 to 1000")
    for key in ("user_max_age", "room_max_age", "replay_timeout"):
        _require(getattr(history, key) > 0, f"history.{key}", "must be > 0 seconds")


def _dedup_window(s: Settings) -> None:
    """The stream remembers an Idempotency-Key no longer than it keeps
    messages (JetStream: duplicate window <= max age, the longest history age)."""
    ages = [s.history.user_max_age, s.history.room_max_age, *(age for _, _, age in room_history_rules(s.rooms.history))]
    _require(
        s.publish.dedup_window <= max(ages),
        "publish.dedup_window",
        f"must be at most the longest history age ({max(ages):g} s: history.user_max_age, history.room_max_age,"
        " rooms.history): the stream forgets an Idempotency-Key once it drops messages that old",
    )


def _jwt(jwt: JwtSettings, http: HttpSettings) -> None:
    """The token keys, and what needs them (``http.dev_tokens`` signs with ``jwt.secret``)."""
    _require(not (jwt.secret and jwt.public_key), "jwt.secret", "set jwt.secret or jwt.public_key, not both")
    _require(
        not http.dev_tokens or bool(jwt.secret),
        "http.dev_tokens",
        "needs jwt.secret (the node must be able to sign tokens)",
    )
    current = jwt.secret or jwt.public_key
    _previous(current, jwt.secret_previous, "jwt.secret_previous", "jwt.secret or jwt.public_key")
    _previous(current, jwt.public_key_previous, "jwt.public_key_previous", "jwt.secret or jwt.public_key")
    for key, secret in (("jwt.secret", jwt.secret), ("jwt.secret_previous", jwt.secret_previous)):
        if secret:
            _hmac_secret(key, secret)
    for key, path in (("jwt.public_key", jwt.public_key), ("jwt.public_key_previous", jwt.public_key_previous)):
        if path:
            _public_key_file(key, path)


def _hmac_secret(key: str, secret: str) -> None:
    try:
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
    except InvalidKeyError:  # else every token would fail to verify, as a node error
        raise ConfigError(
            f"config error: {key}: looks like a public key or a JWK, which PyJWT refuses as an HMAC secret"
        ) from None


def _public_key_file(key: str, path: str) -> None:
    try:
        found = Path(path).is_file()
    except OSError:  # e.g. a name too long
        found = False
    _require(found, key, f"no such file {path!r}")
    try:
        key_algorithm(Path(path).read_bytes())
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"config error: {key}: {exc}") from None


def _auth(auth: AuthSettings) -> None:
    _require(auth.mode in ("jwt", "hook", "either"), "auth.mode", "must be jwt, hook or either")
    _require(
        not auth.connect_url or auth.connect_url.startswith(("http://", "https://")),
        "auth.connect_url",
        "must be an http(s) URL",
    )
    if auth.mode != "jwt":
        _require(bool(auth.connect_url), "auth.connect_url", f"needed with auth.mode = {auth.mode}")
        _require(
            bool(auth.connect_secret), "auth.connect_secret", f"needed with auth.mode = {auth.mode} (signs the hook)"
        )
    _previous(auth.connect_secret, auth.connect_secret_previous, "auth.connect_secret_previous", "auth.connect_secret")
    _require(0 < auth.connect_timeout <= 30, "auth.connect_timeout", "must be > 0 and <= 30 seconds")
    _require(0 <= auth.connect_cache_ttl <= 86400, "auth.connect_cache_ttl", "must be 0 to 86400 seconds")


def _ws(ws: WsSettings) -> None:
    _require(ws.heartbeat >= 0, "ws.heartbeat", "must be >= 0")
    _require(ws.max_frame >= 1024, "ws.max_frame", "must be >= 1024")
    _require(ws.close_timeout > 0, "ws.close_timeout", "must be > 0")


def _sse(sse: SseSettings) -> None:
    _require(sse.keepalive > 0, "sse.keepalive", "must be > 0")
    _require(sse.retry >= 0, "sse.retry", "must be >= 0")


def _backpressure(bp: BackpressureSettings) -> None:
    _require(bp.max_bytes >= 1024, "backpressure.max_bytes", "must be >= 1024")
    _require(bp.max_messages >= 1, "backpressure.max_messages", "must be >= 1")
    _require(bp.policy in ("disconnect", "drop-oldest"), "backpressure.policy", "must be disconnect or drop-oldest")
    _require(bp.write_buffer >= 1024, "backpressure.write_buffer", "must be >= 1024")
    _require(
        bp.write_buffer < bp.max_bytes,
        "backpressure.write_buffer",
        "must be smaller than backpressure.max_bytes",
    )
    _require(bp.socket_buffer >= 0, "backpressure.socket_buffer", "must be >= 0 (0: kernel default)")
    _require(bp.stall_timeout > 0, "backpressure.stall_timeout", "must be > 0")
    _require(0 <= bp.write_delay <= 1, "backpressure.write_delay", "must be between 0 and 1 (seconds)")


def _limits(limits: LimitsSettings) -> None:
    _require(limits.max_connections >= 0, "limits.max_connections", "must be >= 0 (0: no limit)")
    _require(limits.max_subscriptions >= 1, "limits.max_subscriptions", "must be >= 1")
    _require(
        limits.connections_policy in ("refuse-new", "close-oldest"),
        "limits.connections_policy",
        "must be refuse-new or close-oldest",
    )
    for key in ("publish_rate", "command_rate", "abuse_strikes", "max_connections_per_user"):
        _require(getattr(limits, key) >= 1, f"limits.{key}", "must be >= 1")
    for key in ("rate_window", "api_rate"):
        _require(getattr(limits, key) > 0, f"limits.{key}", "must be > 0")
    for origin in limits.origins:
        _require(
            origin == "*" or normal_origin(origin) is not None,
            "limits.origins",
            f"{origin!r} is not an origin like https://app.example.com (scheme://host[:port], no path) or *",
        )


def _log(log: LogSettings) -> None:
    _require(log.level in ("debug", "info", "warning", "error"), "log.level", "debug, info, warning or error")
