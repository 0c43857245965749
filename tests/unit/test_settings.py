"""Settings from TOML + HERALD_* environment (gateway/settings/; README: Configuration)."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.settings import ConfigError, Settings, load_settings, with_overrides

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config" / "herald.toml"


def load(env: dict[str, str] | None = None, path: Path | None = None) -> Settings:
    return load_settings(path, env=env or {}, use_default_file=False)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "herald.toml"
    path.write_text(text)
    return path


def config_error(*names: str, env: dict[str, str] | None = None, path: Path | None = None) -> str:
    """Load, expect ConfigError, check the message is one line naming every one of ``names``."""
    with pytest.raises(ConfigError) as info:
        load(env, path)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    return message


# --- defaults and sources ------------------------------------------------------------------------------------


def test_defaults_with_no_file_and_empty_env() -> None:
    s = load()
    assert s == Settings()
    assert s.http.host == "127.0.0.1"
    assert s.http.port == 8080
    assert s.nats.urls == ("nats://127.0.0.1:4222",)
    assert s.subject.prefix == "herald"
    assert s.live_prefix == "herald_live"
    assert s.stream.name == "HERALD"
    assert s.history.user_max == 50
    assert s.history.user_max_age == 7 * 86400
    assert s.backpressure.policy == "disconnect"
    assert s.history.inbox is True
    assert s.jwt.secret == "" and s.jwt.public_key == ""


def test_settings_are_frozen() -> None:
    s = load()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.http.port = 1  # type: ignore[misc]


def test_env_overrides_file(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
[http]
host = "0.0.0.0"
port = 9000

[nats]
urls = ["nats://a:4222", "nats://b:4222"]
unsubscribe_delay = 2

[history]
inbox = false
""",
    )
    from_file = load(path=path)
    assert from_file.http.host == "0.0.0.0"
    assert from_file.http.port == 9000
    assert from_file.nats.urls == ("nats://a:4222", "nats://b:4222")
    assert from_file.nats.unsubscribe_delay == 2.0
    assert isinstance(from_file.nats.unsubscribe_delay, float)
    assert from_file.history.inbox is False

    both = load({"HERALD_HTTP_PORT": "9100", "HERALD_HISTORY_INBOX": "true"}, path)
    assert both.http.port == 9100  # env wins
    assert both.history.inbox is True  # env wins
    assert both.http.host == "0.0.0.0"  # file value kept where env is silent
    assert both.nats.urls == ("nats://a:4222", "nats://b:4222")


def test_herald_config_env_names_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[http]\nport = 9001\n")
    assert load({"HERALD_CONFIG": str(path)}).http.port == 9001


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    config_error(str(tmp_path / "nope.toml"), path=tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("env", "check"),
    [
        (
            {"HERALD_NATS_URLS": "nats://a:4222,nats://b:4222"},
            lambda s: s.nats.urls == ("nats://a:4222", "nats://b:4222"),
        ),
        ({"HERALD_NATS_URLS": " nats://a:1 , tls://b:2 ,"}, lambda s: s.nats.urls == ("nats://a:1", "tls://b:2")),
        ({"HERALD_NATS_URLS": "nats://only:4222"}, lambda s: s.nats.urls == ("nats://only:4222",)),
        ({"HERALD_HTTP_HOST": "0.0.0.0"}, lambda s: s.http.host == "0.0.0.0"),
        ({"HERALD_HTTP_PORT": "9999"}, lambda s: s.http.port == 9999),
        ({"HERALD_HTTP_PORT": "0"}, lambda s: s.http.port == 0),
        ({"HERALD_HTTP_WORKER_TIMEOUT": "0"}, lambda s: s.http.worker_timeout == 0),
        ({"HERALD_NODE_ID": "node-7.eu_west"}, lambda s: s.node.id == "node-7.eu_west"),
        ({"HERALD_NODE_HEAP_TRIM_INTERVAL": "0"}, lambda s: s.node.heap_trim_interval == 0),
        ({"HERALD_JWT_SECRET": "s3cret"}, lambda s: s.jwt.secret == "s3cret"),
        ({"HERALD_PUBLISH_KEY": "pk"}, lambda s: s.publish.key == "pk"),
        ({"HERALD_ADMIN_KEY": "ak"}, lambda s: s.admin.key == "ak"),
        ({"HERALD_SUBJECT_PREFIX": "myapp"}, lambda s: s.subject.prefix == "myapp" and s.live_prefix == "myapp_live"),
        ({"HERALD_SUBJECT_PREFIX": "a.b"}, lambda s: s.subject.prefix == "a.b" and s.live_prefix == "a.b_live"),
        ({"HERALD_STREAM_NAME": "MY_STREAM-1"}, lambda s: s.stream.name == "MY_STREAM-1"),
        ({"HERALD_NATS_UNSUBSCRIBE_DELAY": "0.25"}, lambda s: s.nats.unsubscribe_delay == 0.25),
        ({"HERALD_BACKPRESSURE_POLICY": "drop-oldest"}, lambda s: s.backpressure.policy == "drop-oldest"),
        (
            {"HERALD_BACKPRESSURE_DROP_OLDEST_ROOMS": "typing-*,cursor-*"},
            lambda s: s.backpressure.drop_oldest_rooms == ("typing-*", "cursor-*"),
        ),
    ],
)
def test_contract_env_vars_work_without_a_file(env: dict[str, str], check: Any) -> None:
    assert check(load(env))


def test_jwt_public_key_from_env(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = tmp_path / "pub.pem"
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    key.write_bytes(public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    s = load({"HERALD_JWT_PUBLIC_KEY": str(key)})
    assert s.jwt.public_key == str(key)
    assert s.jwt.secret == ""


@pytest.mark.parametrize(
    "content",
    ["-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n", "not a key at all", ""],
)
def test_jwt_public_key_that_is_not_a_key_names_the_key(tmp_path: Path, content: str) -> None:
    key = tmp_path / "pub.pem"
    key.write_text(content)
    with pytest.raises(ConfigError) as err:
        load({"HERALD_JWT_PUBLIC_KEY": str(key)})
    assert "jwt.public_key" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("Off", False),
    ],
)
def test_bools_from_env(raw: str, expected: bool) -> None:
    s = load({"HERALD_HISTORY_INBOX": raw, "HERALD_JWT_REQUIRE_EXP": raw})
    assert s.history.inbox is expected
    assert s.jwt.require_exp is expected


def test_every_key_has_an_env_name() -> None:
    """Each field of each section is reachable as HERALD_<SECTION>_<KEY> (no unknown-variable error)."""
    defaults = Settings()
    for section in dataclasses.fields(Settings):
        for f in dataclasses.fields(getattr(defaults, section.name)):
            default = getattr(getattr(defaults, section.name), f.name)
            if isinstance(default, bool):
                raw = "true" if default else "false"
            elif isinstance(default, tuple):
                raw = ",".join(default)
            else:
                raw = str(default)
            env_name = f"HERALD_{section.name.upper()}_{f.name.upper()}"
            s = load({env_name: raw})
            assert getattr(getattr(s, section.name), f.name) == default, env_name


# --- errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"HERALD_HTTP_PORT": "eighty"}, ("http.port", "HERALD_HTTP_PORT")),
        ({"HERALD_HTTP_PORT": "80.5"}, ("http.port",)),
        ({"HERALD_HTTP_PORT": ""}, ("http.port",)),
        ({"HERALD_HTTP_PORT": "--5"}, ("http.port",)),
        ({"HERALD_HTTP_PORT": "70000"}, ("http.port",)),
        ({"HERALD_HTTP_PORT": "-1"}, ("http.port",)),
        ({"HERALD_NATS_CONNECT_TIMEOUT": "soon"}, ("nats.connect_timeout", "HERALD_NATS_CONNECT_TIMEOUT")),
        ({"HERALD_NATS_CONNECT_TIMEOUT": "0"}, ("nats.connect_timeout",)),
        ({"HERALD_HTTP_WORKER_TIMEOUT": "1"}, ("http.worker_timeout",)),
        ({"HERALD_HTTP_TCP_USER_TIMEOUT": "-1"}, ("http.tcp_user_timeout",)),
        ({"HERALD_HTTP_TCP_USER_TIMEOUT": "86400"}, ("http.tcp_user_timeout",)),
        ({"HERALD_HISTORY_INBOX": "maybe"}, ("history.inbox", "HERALD_HISTORY_INBOX")),
        ({"HERALD_HTTP_PROT": "80"}, ("HERALD_HTTP_PROT",)),
        ({"HERALD_NOPE": "1"}, ("HERALD_NOPE",)),
        ({"HERALD_BACKPRESSURE_POLICY": "drop-newest"}, ("backpressure.policy",)),
        ({"HERALD_LOG_LEVEL": "verbose"}, ("log.level",)),
        ({"HERALD_STREAM_REPLICAS": "2"}, ("stream.replicas",)),
        ({"HERALD_STREAM_STORAGE": "disk"}, ("stream.storage",)),
        ({"HERALD_STREAM_NAME": "A.B"}, ("stream.name",)),
        ({"HERALD_NODE_ID": "a b"}, ("node.id",)),
        ({"HERALD_NODE_HEAP_TRIM_INTERVAL": "-1"}, ("node.heap_trim_interval",)),
        ({"HERALD_NATS_URLS": ""}, ("nats.urls",)),
        ({"HERALD_NATS_URLS": "http://x:4222"}, ("nats.urls",)),
        ({"HERALD_JWT_SECRET": "s", "HERALD_JWT_PUBLIC_KEY": __file__}, ("jwt.secret",)),
        ({"HERALD_JWT_PUBLIC_KEY": "/nonexistent/key.pem"}, ("jwt.public_key",)),
        ({"HERALD_SUBJECT_LIVE_PREFIX": "herald.live"}, ("live_prefix",)),
        ({"HERALD_SUBJECT_LIVE_PREFIX": "herald"}, ("live_prefix",)),
        ({"HERALD_SUBJECT_PREFIX": "herald.in", "HERALD_SUBJECT_LIVE_PREFIX": "herald"}, ("live_prefix",)),
        ({"HERALD_SUBJECT_PREFIX": "her ald"}, ("subject.prefix",)),
        ({"HERALD_BACKPRESSURE_MAX_BYTES": "10"}, ("backpressure.max_bytes",)),
        ({"HERALD_HISTORY_USER_MAX": "0"}, ("history.user_max",)),
        ({"HERALD_BACKPRESSURE_WRITE_BUFFER": "2000000"}, ("backpressure.write_buffer",)),
        ({"HERALD_HOOKS_MAX_BACKOFF": "0"}, ("hooks.max_backoff",)),
        ({"HERALD_HOOKS_HORIZON": "-1"}, ("hooks.horizon",)),
        ({"HERALD_HOOKS_UNREAD_AFTER": "-1"}, ("hooks.unread_after",)),
        ({"HERALD_HOOKS_METRICS_PORT": "99999"}, ("hooks.metrics_port",)),
        ({"HERALD_HOOKS_MAX_ACK_PENDING": "0"}, ("hooks.max_ack_pending",)),
        ({"HERALD_HOOKS_URL": "http://"}, ("hooks.url",)),
        ({"HERALD_HOOKS_URL": "http://[::1/hook"}, ("hooks.url",)),
        ({"HERALD_HOOKS_URL": "http://h:99999/hook"}, ("hooks.url",)),
        # No number is negative (but stream.max_bytes = -1), nor beyond 2**53.
        ({"HERALD_NATS_RECONNECT_WAIT": "-5"}, ("nats.reconnect_wait",)),
        ({"HERALD_JWT_LEEWAY": "-100"}, ("jwt.leeway",)),
        ({"HERALD_NATS_PENDING_MSGS_LIMIT": "-1"}, ("nats.pending_msgs_limit",)),
        ({"HERALD_NATS_PENDING_BYTES_LIMIT": "-1"}, ("nats.pending_bytes_limit",)),
        ({"HERALD_STREAM_MAX_BYTES": "-7"}, ("stream.max_bytes",)),
        ({"HERALD_HISTORY_USER_MAX": "100000000000000000000"}, ("history.user_max",)),
        ({"HERALD_WS_HEARTBEAT": "1e300"}, ("ws.heartbeat",)),
        ({"HERALD_HTTP_BACKLOG": "99999999999"}, ("http.backlog",)),
        ({"HERALD_HTTP_BACKLOG": "65536"}, ("http.backlog",)),
        ({"HERALD_STREAM_NAME": "\u00c9V\u00c9NEMENTS"}, ("stream.name",)),
        ({"HERALD_NODE_ID": "n\u00f6de"}, ("node.id",)),
        ({"HERALD_HTTP_HOST": ""}, ("http.host",)),
        ({"HERALD_ADMIN_HOST": ""}, ("admin.host",)),
        ({"HERALD_ADMIN_PORT": "8080", "HERALD_HTTP_PORT": "8080"}, ("admin.port",)),
        # The stream keeps an Idempotency-Key no longer than its oldest messages.
        (
            {"HERALD_HISTORY_USER_MAX_AGE": "60", "HERALD_HISTORY_ROOM_MAX_AGE": "60"},
            ("publish.dedup_window", "history.user_max_age"),
        ),
    ],
)
def test_bad_env_values_raise_one_line_naming_the_key(env: dict[str, str], names: tuple[str, ...]) -> None:
    config_error(*names, env=env)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[http]\nport = 'eighty'\n", ("http.port",)),
        ("[http]\nport = 80.0\n", ("http.port",)),
        ("[http]\nport = true\n", ("http.port",)),
        ("[http]\nport = 123456\n", ("http.port",)),
        ("[nats]\nconnect_timeout = 'x'\n", ("nats.connect_timeout",)),
        ("[nats]\nconnect_timeout = false\n", ("nats.connect_timeout",)),
        ("[history]\ninbox = 'true'\n", ("history.inbox",)),
        ("[history]\ninbox = 1\n", ("history.inbox",)),
        ("[nats]\nurls = 'nats://a:4222'\n", ("nats.urls",)),
        ("[nats]\nurls = [1, 2]\n", ("nats.urls",)),
        ("[http]\nhost = 5\n", ("http.host",)),
        ("[bogus]\nx = 1\n", ("bogus",)),
        ("http = 5\n", ("http",)),
        ("[http]\nprot = 80\n", ("http.prot",)),
        ("[backpressure]\npolicy = 'sometimes'\n", ("backpressure.policy",)),
        ("[jwt]\nsecret = 's'\npublic_key = '/etc/hostname'\n", ("jwt.secret",)),
        ("[jwt]\npublic_key = '/nonexistent/key.pem'\n", ("jwt.public_key",)),
        ("[subject]\nprefix = 'app'\nlive_prefix = 'app.live'\n", ("live_prefix",)),
    ],
)
def test_bad_file_values_raise_one_line_naming_the_key(tmp_path: Path, text: str, names: tuple[str, ...]) -> None:
    config_error(*names, path=write_toml(tmp_path, text))


@pytest.mark.parametrize("text", ["[http\nport = 1\n", "[http]\nport = \n", "[http]\nport = 1\nport = 2\n", "= 1\n"])
def test_toml_syntax_error_is_one_line_naming_the_file(tmp_path: Path, text: str) -> None:
    path = write_toml(tmp_path, text)
    config_error(str(path), path=path)


def test_env_error_wins_even_if_file_is_fine(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[http]\nport = 9000\n")
    config_error("http.port", env={"HERALD_HTTP_PORT": "x"}, path=path)


def test_with_overrides_validates() -> None:
    s = load()
    assert with_overrides(s, http={"port": 0}).http.port == 0
    with pytest.raises(ConfigError, match=r"http\.port"):
        with_overrides(s, http={"port": 70000})


# --- the shipped file ----------------------------------------------------------------------------------------


def _shipped() -> dict[str, Any]:
    if not SHIPPED.exists():
        pytest.skip("config/herald.toml is not in the repository yet")
    with open(SHIPPED, "rb") as fh:
        return tomllib.load(fh)


def test_shipped_config_loads_and_documents_the_defaults() -> None:
    data = _shipped()
    s = load(path=SHIPPED)
    defaults = Settings()
    mismatches = []
    for section, values in data.items():
        for key in values:
            if (section, key) == ("node", "id"):
                continue  # the default is computed (hostname-pid); any literal differs
            got = getattr(getattr(s, section), key)
            want = getattr(getattr(defaults, section), key)
            if got != want:
                mismatches.append(f"{section}.{key} = {got!r}, default {want!r}")
    assert not mismatches, mismatches


def test_shipped_config_mentions_every_key() -> None:
    """README: Configuration: herald.toml with every key documented (set or commented out)."""
    _shipped()
    text = SHIPPED.read_text()
    missing = []
    for section in dataclasses.fields(Settings):
        if not re.search(rf"^\s*#?\s*\[{section.name}\]", text, re.M):
            missing.append(f"[{section.name}]")
        for f in dataclasses.fields(getattr(Settings(), section.name)):
            if not re.search(rf"^\s*#?\s*{f.name}\s*=", text, re.M):
                missing.append(f"{section.name}.{f.name}")
    assert not missing, missing


def test_a_dedup_window_within_any_history_age_is_fine() -> None:
    ages = {"HERALD_HISTORY_USER_MAX_AGE": "60", "HERALD_HISTORY_ROOM_MAX_AGE": "60"}
    assert load({**ages, "HERALD_PUBLISH_DEDUP_WINDOW": "60"}).publish.dedup_window == 60
    assert load({**ages, "HERALD_ROOMS_HISTORY": "chat-*=10/3600"}).publish.dedup_window == 120
