"""``http.trusted_proxies``: the client's address behind a load balancer (the
node: tests/nats/test_connect_hook.py, whose hook sees it as ``remote``)."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.http import TrustedProxies, peer
from gateway.settings import ConfigError, load_settings


def test_the_setting() -> None:
    assert load_settings(env={}, use_default_file=False).http.trusted_proxies == ()
    s = load_settings(env={"HERALD_HTTP_TRUSTED_PROXIES": "10.0.0.0/8, ::1/128"}, use_default_file=False)
    assert s.http.trusted_proxies == ("10.0.0.0/8", "::1/128")


@pytest.mark.parametrize("value", ["10.0.0.1/8", "proxy.internal", "10.0.0.0/33", "*"])
def test_bad_networks_name_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match=r"http\.trusted_proxies"):
        load_settings(env={"HERALD_HTTP_TRUSTED_PROXIES": value}, use_default_file=False)


def client(proxies: list[str], remote: str, *forwarded: str) -> str:
    headers = CIMultiDict(("X-Forwarded-For", value) for value in forwarded)
    request = make_mocked_request("GET", "/ws", headers=headers).clone(remote=remote)
    return peer(request, TrustedProxies(proxies))


@pytest.mark.parametrize(
    ("proxies", "remote", "forwarded", "seen"),
    [
        ([], "127.0.0.1", ("203.0.113.9",), "127.0.0.1"),
        (["127.0.0.1/32"], "127.0.0.1", ("203.0.113.9",), "203.0.113.9"),
        (["127.0.0.1/32"], "127.0.0.1", (), "127.0.0.1"),
        (["10.0.0.0/8"], "192.0.2.1", ("203.0.113.9",), "192.0.2.1"),  # not from a proxy: a spoof
        (["10.0.0.0/8"], "10.0.0.2", ("1.1.1.1, 203.0.113.9",), "203.0.113.9"),  # the client's own entry is left
        (["10.0.0.0/8"], "10.0.0.2", ("203.0.113.9, 10.0.0.7",), "203.0.113.9"),  # two proxies
        (["10.0.0.0/8"], "10.0.0.2", ("203.0.113.9", "10.0.0.7"), "203.0.113.9"),  # two headers
        (["10.0.0.0/8"], "10.0.0.2", ("10.0.0.9, 10.0.0.7",), "10.0.0.9"),  # all trusted: the first
        (["10.0.0.0/8"], "10.0.0.2", ("203.0.113.9, junk",), "10.0.0.2"),  # garbage: the proxy is all we know
        (["10.0.0.0/8"], "::ffff:10.0.0.2", ("203.0.113.9",), "203.0.113.9"),  # IPv4-mapped peer
        (["2001:db8::/32"], "2001:db8::1", ("2001:db8:ffff::1, 2a00:1450::1",), "2a00:1450::1"),
        (["127.0.0.1/32"], "127.0.0.1", (" 203.0.113.9 ",), "203.0.113.9"),
    ],
)
def test_forwarded_for_is_believed_only_from_trusted_proxies(
    proxies: list[str], remote: str, forwarded: tuple[str, ...], seen: str
) -> None:
    assert client(proxies, remote, *forwarded) == seen


def test_without_proxies_the_direct_peer() -> None:
    request = make_mocked_request("GET", "/ws", headers={"X-Forwarded-For": "203.0.113.9"}).clone(remote="192.0.2.1")
    assert peer(request) == "192.0.2.1"
