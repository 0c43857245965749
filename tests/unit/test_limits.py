"""Limits without a node: ``limits.origins`` values are checked when the
settings load (the limits themselves, against real nodes: tests/nats/test_limits.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.settings import ConfigError, load_settings, with_overrides

APP = "https://app.example.com"

BASE = load_settings(env={}, use_default_file=False)


@pytest.mark.parametrize(
    "value",
    ["app.example.com", f"{APP}/", f"{APP}/path", "ftp://app.example.com", "", "null", "*.example.com"],
)
def test_bad_origin_values_are_rejected_at_load(value: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"limits\.origins") as info:
        with_overrides(BASE, limits={"origins": (value,)})
    assert "\n" not in str(info.value)
    path = tmp_path / "herald.toml"
    path.write_text(f"[limits]\norigins = [{json.dumps(value)}]\n")
    with pytest.raises(ConfigError, match=r"limits\.origins"):
        load_settings(path, env={}, use_default_file=False)
    if value:  # an empty env item is skipped, by the list syntax
        with pytest.raises(ConfigError, match=r"limits\.origins"):
            load_settings(env={"HERALD_LIMITS_ORIGINS": f"{APP},{value}"}, use_default_file=False)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("https://", id="no-host"),
        pytest.param("https://*.example.com", id="wildcard-host"),
        pytest.param("https://app.example.com?x=1", id="query"),
        pytest.param("https://user@app.example.com", id="userinfo"),
        pytest.param("https://app.example.com:abc", id="bad-port"),
        pytest.param("https://app.example.com ", id="trailing-space"),
    ],
)
def test_origin_values_that_can_never_match_are_rejected_at_load(value: str) -> None:
    with pytest.raises(ConfigError, match=r"limits\.origins"):
        with_overrides(BASE, limits={"origins": (value,)})


def test_good_origin_values_load() -> None:
    for origins in [(), ("*",), (APP, "http://localhost:3000", "http://127.0.0.1:8080")]:
        assert with_overrides(BASE, limits={"origins": origins}).limits.origins == origins
    loaded = load_settings(env={"HERALD_LIMITS_ORIGINS": f"{APP}, http://localhost:3000"}, use_default_file=False)
    assert loaded.limits.origins == (APP, "http://localhost:3000")
