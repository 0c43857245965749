"""NATS URLs as logs and error messages show them: the password or token a
URL may carry (``nats://user:pass@host``, ``nats://token@host``) is replaced
by ``***``, so a log line or a supervisor's mail gives no credential away."""

from __future__ import annotations

from collections.abc import Iterable


def redacted(url: str) -> str:
    """``url`` with its password (``user:***@``) or token (``***@``) hidden."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    # Up to the last @: a password with an @ or / not percent-encoded is hidden
    # whole (a NATS URL has no path or query an @ could be in).
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}{sep}{user + ':***' if colon else '***'}@{host}"


def redacted_urls(urls: Iterable[str]) -> str:
    """The URLs for one line: redacted, comma-separated (as HERALD_NATS_URLS takes them)."""
    return ",".join(redacted(url) for url in urls)
