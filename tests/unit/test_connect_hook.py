"""The connect hook's pieces without a node: its settings, the checks of the
app's answer and what a forwarded command carries (the node:
tests/nats/test_connect_hook.py)."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.auth import Identity
from gateway.connect_hook import Credentials, HookCall, parse_answer
from gateway.settings import ConfigError, Settings, load_settings

HOOK_ENV = {
    "HERALD_AUTH_MODE": "hook",
    "HERALD_AUTH_CONNECT_URL": "https://app.internal/herald/connect",
    "HERALD_AUTH_CONNECT_SECRET": "s3cret",
}


def load(env: dict[str, str]) -> Settings:
    return load_settings(env=env, use_default_file=False)


# --- settings ------------------------------------------------------------------------------------------------


def test_defaults_are_tokens_only() -> None:
    s = load({})
    assert (s.auth.mode, s.auth.connect_url, s.auth.connect_timeout) == ("jwt", "", 2.0)
    assert s.auth.connect_cache_ttl == 60.0


def test_hook_settings_from_env() -> None:
    s = load({**HOOK_ENV, "HERALD_AUTH_MODE": "either", "HERALD_AUTH_CONNECT_CACHE_TTL": "0"})
    assert s.auth.mode == "either" and s.auth.connect_secret == "s3cret"
    assert s.auth.connect_cache_ttl == 0.0


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"HERALD_AUTH_MODE": "cookie"}, "auth.mode"),
        ({**HOOK_ENV, "HERALD_AUTH_CONNECT_URL": ""}, "auth.connect_url"),
        ({"HERALD_AUTH_MODE": "either", "HERALD_AUTH_CONNECT_SECRET": "s"}, "auth.connect_url"),
        ({**HOOK_ENV, "HERALD_AUTH_CONNECT_URL": "ftp://app/x"}, "auth.connect_url"),
        ({"HERALD_AUTH_CONNECT_URL": "app.internal/connect"}, "auth.connect_url"),
        ({**HOOK_ENV, "HERALD_AUTH_CONNECT_SECRET": ""}, "auth.connect_secret"),
        ({**HOOK_ENV, "HERALD_AUTH_CONNECT_TIMEOUT": "0"}, "auth.connect_timeout"),
        ({**HOOK_ENV, "HERALD_AUTH_CONNECT_TIMEOUT": "60"}, "auth.connect_timeout"),
        ({**HOOK_ENV, "HERALD_AUTH_CONNECT_TIMEOUT": "soon"}, "auth.connect_timeout"),
        ({**HOOK_ENV, "HERALD_AUTH_CONNECT_CACHE_TTL": "-1"}, "auth.connect_cache_ttl"),
    ],
)
def test_bad_values_name_the_key(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(env)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_a_url_without_the_hook_mode_is_allowed() -> None:
    assert load({"HERALD_AUTH_CONNECT_URL": "http://app/connect"}).auth.mode == "jwt"


# --- the app's answer --------------------------------------------------------------------------------------------


def answer(**fields: Any) -> bytes:
    doc = {"user": "alice", "rooms": ["lobby", "chat-*"], "publish": ["chat-*"], "expires": time.time() + 60}
    doc.update(fields)
    return orjson.dumps({k: v for k, v in doc.items() if v is not ...})


def test_a_good_answer_is_an_identity() -> None:
    now = time.time()
    identity = parse_answer(answer(expires=now + 60), now)
    assert identity == Identity("alice", ("lobby", "chat-*"), ("chat-*",), now + 60)
    assert identity.may_join("chat-7") and not identity.may_join("secret")
    # rooms and publish may be left out (none), as in a token; expires may be an integer.
    assert parse_answer(answer(rooms=..., publish=..., expires=int(now) + 60), now).rooms == ()


BAD_ANSWERS = {
    "not_json": (b"nope", "not JSON"),
    "not_object": (b"[]", "not a JSON object"),
    "user_dot": (answer(user="a.b"), "user must match"),
    "user_star": (answer(user="*"), "user must match"),
    "user_empty": (answer(user=""), "user must match"),
    "user_129": (answer(user="u" * 129), "user must match"),
    "user_null": (answer(user=None), "user must match"),
    "user_missing": (answer(user=...), "user must match"),
    "rooms_string": (answer(rooms="lobby"), "rooms must be a list"),
    "rooms_numbers": (answer(rooms=[1]), "rooms must be a list"),
    "rooms_wildcard": (answer(rooms=["a.>"]), "rooms must be a list"),
    "publish_null": (answer(publish=None), "publish must be a list"),
    "expires_missing": (answer(expires=...), "expires must be a unix time"),
    "expires_bool": (answer(expires=True), "expires must be a unix time"),
    "expires_date": (answer(expires="2030-01-01"), "expires must be a unix time"),
    "expires_past": (answer(expires=1.0), "in the future"),
    "expires_ms": (answer(expires=time.time() * 1000), "in the future"),
    "unknown_field": (answer(role="admin"), "unknown field 'role'"),
}


@pytest.mark.parametrize("kind", list(BAD_ANSWERS))
def test_bad_answers_say_what_is_wrong(kind: str) -> None:
    body, problem = BAD_ANSWERS[kind]
    with pytest.raises(ValueError, match=problem):
        parse_answer(body, time.time())


# --- what a forwarded command carries ------------------------------------------------------------------------


def test_a_hook_call_goes_over_the_wire_and_back() -> None:
    request = make_mocked_request(
        "GET",
        "/sse?room=lobby&room=chat-1&since=7",
        headers=CIMultiDict([("Cookie", "a=1"), ("Cookie", "sid=x"), ("User-Agent", "ua/1")]),
    )
    call = HookCall.of(request, "sse", "203.0.113.9")
    assert call.document() == {
        "transport": "sse",
        "headers": {"cookie": "a=1; sid=x", "origin": None, "user-agent": "ua/1"},
        "query": "room=lobby&room=chat-1&since=7",
        "remote": "203.0.113.9",
    }
    credentials = Credentials("203.0.113.9", hook=call)
    back = Credentials.from_wire(orjson.loads(orjson.dumps(credentials.wire())), "relay")
    assert back.hook == call and back.token is None
    assert Credentials.from_wire({"token": "t"}, "relay") == Credentials("relay", "t")
    with pytest.raises(ValueError):
        Credentials.from_wire({"token": None, "hook": {"transport": "ws"}}, "relay")
    # Answers are kept by the cookie's hash; a request without one is never answered from memory.
    assert call.cache_key is not None and b"sid" not in call.cache_key
    assert HookCall.of(make_mocked_request("GET", "/ws"), "ws", "::1").cache_key is None


def test_every_result_the_hook_counts_is_pre_created() -> None:
    import re
    from pathlib import Path

    from gateway import connect_hook, metrics

    source = Path(connect_hook.__file__).read_text()
    used = set(re.findall(r'_results\["(\w+)"\]|_unavailable\("(\w+)"', source))
    results = {a or b for a, b in used}
    assert len(results) == len(metrics.CONNECT_HOOK_RESULTS)  # the patterns still match
    assert results == set(metrics.CONNECT_HOOK_RESULTS)
