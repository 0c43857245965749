"""NATS URLs in logs and error messages: a password or token they carry is
never shown (broker/redact.py; the places that show them: the node's connect
error, herald hooks' warnings, the settings' bad-URL error, the reconnect line)."""

from __future__ import annotations

import pytest

from broker import BrokerUnavailable
from broker.embedded import free_port
from broker.redact import redacted, redacted_urls

from ..helpers import make_settings, start_node
from .test_settings import config_error


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("nats://alice:s3cret@10.0.0.5:4222", "nats://alice:***@10.0.0.5:4222"),
        ("tls://alice:s3cret@nats.example", "tls://alice:***@nats.example"),
        ("nats://s3cret@10.0.0.5:4222", "nats://***@10.0.0.5:4222"),
        ("nats://alice:@h:1", "nats://alice:***@h:1"),
        # An @ or / in the password itself (not percent-encoded): nothing of it shows.
        ("nats://alice:s3c@r/et@h:1", "nats://alice:***@h:1"),
        ("wss://alice:s3cret@h/path", "wss://alice:***@h/path"),
        ("alice:s3cret@h:1", "alice:***@h:1"),  # no scheme (a bad URL, said as such)
        ("", ""),
    ],
)
def test_a_password_or_token_is_replaced(url: str, shown: str) -> None:
    assert redacted(url) == shown


def test_urls_are_listed_comma_separated() -> None:
    assert redacted_urls(("nats://a:p@h1:1", "nats://h2:2")) == "nats://a:***@h1:1,nats://h2:2"


@pytest.mark.parametrize("userinfo", ["alice:s3cret@", "s3cret@"])
async def test_the_node_connect_error_hides_the_password_or_token(userinfo: str) -> None:
    port = free_port()
    settings = make_settings(f"nats://{userinfo}127.0.0.1:{port}", nats={"connect_timeout": 1.0})
    with pytest.raises(BrokerUnavailable) as info:
        await start_node(settings)
    message = str(info.value)
    assert "s3cret" not in message, message
    assert f"nats://{redacted(userinfo + 'h').removesuffix('h')}127.0.0.1:{port}" in message, message


def test_a_bad_nats_url_in_the_settings_is_named_without_its_password() -> None:
    message = config_error("nats.urls", env={"HERALD_NATS_URLS": "http://alice:s3cret@h:4222"})
    assert "s3cret" not in message and "http://alice:***@h:4222" in message, message
