"""Rate limits and the browser Origin check.

Buckets are per connection (client commands) and per publish key (the HTTP
API); nothing here is shared across nodes — cluster-wide limits live in NATS.
"""

from __future__ import annotations

import math
import time
from urllib.parse import urlsplit


def retry_after(wait: float) -> float:
    """A wait as an answer's ``retry_after``: in ms, rounded up, so a client
    that waits this long finds the token back."""
    return math.ceil(wait * 1000) / 1000


class TokenBucket:
    """``capacity`` tokens, refilled evenly over ``window`` seconds."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, capacity: float, window: float) -> None:
        self.capacity = capacity
        self.rate = capacity / window
        self.tokens = capacity
        self.stamp = time.monotonic()

    def take(self, now: float | None = None) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there is."""
        wait = self.wait(now)
        if not wait:
            self.tokens -= 1.0
        return wait

    def wait(self, now: float | None = None) -> float:
        """0.0 if a token is there, else the seconds until there is one (none is taken)."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate


class CommandLimiter:
    """One connection's command budget: publishes have their own (smaller)
    bucket; ``strikes`` counts refusals in a row (sustained abuse)."""

    __slots__ = ("commands", "publishes", "strikes")

    def __init__(self, publish_rate: int, command_rate: int, window: float) -> None:
        self.publishes = TokenBucket(publish_rate, window)
        self.commands = TokenBucket(command_rate, window)
        self.strikes = 0

    def check(self, kind: str) -> float:
        """0.0 if the command may run, else seconds to wait (and a strike)."""
        wait = (self.publishes if kind == "publish" else self.commands).take()
        self.strikes = self.strikes + 1 if wait else 0
        return wait


_DEFAULT_PORTS = {"http": 80, "https": 443}


def normal_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` lower-cased, without a default port; None if
    ``origin`` is not such an origin (a path, userinfo, a wildcard, a bad port…)."""
    if origin != origin.strip() or any(c in origin for c in "*?#@ \t"):
        return None
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path or parts.query or parts.fragment:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}" + ("" if port in (None, _DEFAULT_PORTS[scheme]) else f":{port}")


# Sec-Fetch-Site of a request a page of another site made.
_OTHER_SITE = frozenset(("cross-site", "same-site"))


def origin_allowed(
    origin: str | None,
    host: str | None,
    allowed: tuple[str, ...],
    fetch_site: str | None = None,
    scheme: str | None = None,
) -> bool:
    """Browsers send ``Origin``; other clients do not and are not checked.
    ``allowed`` (normalised origins) empty: the node's own origin only, which
    is ``scheme://host`` when the scheme the client used is known (a trusted
    proxy said it), else the ``Origin``'s host[:port] must equal ``host`` (the
    node speaks no TLS itself, so without a proxy's word it cannot tell a page
    of http://host from one of https://host behind a proxy); ``*``: any. A
    browser's request without ``Origin`` that ``Sec-Fetch-Site`` says another
    site's page made (an <img>, a <script>, a followed link: no CORS, but the
    user's cookies) is no origin's."""
    if "*" in allowed:
        return True
    if origin is None:
        return fetch_site is None or fetch_site.lower() not in _OTHER_SITE
    normal = normal_origin(origin)
    if normal is None:
        return False
    if allowed:
        return normal in allowed
    if host is None:
        return False
    if scheme is not None:
        return normal == normal_origin(f"{scheme}://{host}")
    return urlsplit(origin).netloc.lower() == host.lower()
