"""Building Settings: ``herald.toml`` (or ``$HERALD_CONFIG``) and ``HERALD_*``.

Every key has an environment name: ``[http] port`` → ``HERALD_HTTP_PORT``; the
environment wins over the file. Values are coerced to the type of the key's
default here, then checked as a whole by ``validation.validate``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .schema import ConfigError, Settings
from .validation import validate

DEFAULT_CONFIG_PATH = Path("config/herald.toml")
ENV_PREFIX = "HERALD_"
# Environment names that are not settings keys (HERALD_TOKEN: the client token of herald listen).
_ENV_NOT_KEYS = frozenset({"HERALD_CONFIG", "HERALD_TOKEN"})


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


def with_overrides(settings: Settings, **sections: dict[str, Any]) -> Settings:
    """A copy with some keys replaced: ``with_overrides(s, http={"port": 0})``."""
    changes = {name: dataclasses.replace(getattr(settings, name), **values) for name, values in sections.items()}
    result = dataclasses.replace(settings, **changes)
    validate(result)
    return result
