"""Settings: frozen dataclasses built once from ``herald.toml`` and ``HERALD_*``.

Every key has an environment name: ``[http] port`` → ``HERALD_HTTP_PORT``; the
environment wins over the file. A bad key or value raises ConfigError with one
line naming the key.

- ``schema``: the dataclasses, ConfigError, the parsers of ``rooms.history``
  and ``hooks.routes``; imports nothing of the project.
- ``loading``: the file and the environment → Settings (``load_settings``,
  ``with_overrides``).
- ``validation``: the checks of a whole Settings (``validate``).

This module re-exports all of them. ``schema`` is imported at once; ``loading``
and ``validation`` on first use of one of their names. Python runs this file
before any of its modules, and ``validation`` imports ``gateway.auth``, which
imports ``gateway.settings.schema``: importing them here would make importing
``gateway.auth`` first a cycle (and would load the loader with every schema).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .schema import (
    AdminSettings,
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

if TYPE_CHECKING:
    from .loading import DEFAULT_CONFIG_PATH, ENV_PREFIX, load_settings, with_overrides
    from .validation import validate

# Name → the module of this package that defines it, imported on first use.
_LAZY = {
    "DEFAULT_CONFIG_PATH": "loading",
    "ENV_PREFIX": "loading",
    "load_settings": "loading",
    "with_overrides": "loading",
    "validate": "validation",
}

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "AdminSettings",
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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
