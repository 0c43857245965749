"""Settings: frozen dataclasses built once from ``herald.toml`` and ``HERALD_*``.

Every key has an environment name: ``[http] port`` → ``HERALD_HTTP_PORT``; the
environment wins over the file. A bad key or value raises ConfigError with one
line naming the key.

- ``schema``: the dataclasses, ConfigError, the parsers of ``rooms.history``
  and ``hooks.routes``; imports nothing of the project.
- ``loading``: the file and the environment → Settings (``load_settings``,
  ``with_overrides``).
- ``validation``: the checks of a whole Settings (``validate``).

This module re-exports all of them.
"""

from __future__ import annotations

from .loading import DEFAULT_CONFIG_PATH, ENV_PREFIX, load_settings, with_overrides
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
    SubjectSettings,
    WsSettings,
    hook_routes,
    room_history_rules,
)
from .validation import validate

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "AdminSettings",
    "AuthSettings",
    "BackpressureSettings",
    "ConfigError",
    "HistorySettings",
    "HooksSettings",
    "HttpSettings",
    "JwtSettings",
    "LimitsSettings",
    "LogSettings",
    "NatsSettings",
    "NodeSettings",
    "PresenceSettings",
    "PublishSettings",
    "RoomsSettings",
    "Settings",
    "SseSettings",
    "StreamSettings",
    "SubjectSettings",
    "WsSettings",
    "hook_routes",
    "load_settings",
    "room_history_rules",
    "validate",
    "with_overrides",
]
