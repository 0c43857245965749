"""Where and when the client reconnects: the node URLs in turn, and the
close-code rules of herald.js (README, "Browser client"; docs/protocol.md §8).

- 4000, 4003, 4403 (the backend disconnected the user for good), 4029
  whose reason names the user's "oldest" connection or says it was
  "replaced" (a newer connection named it), and 1002, 1007, 1009 (the node
  read a frame of ours it cannot take): stop (reconnecting cannot help, is
  not wanted, or would evict another of the user's tabs).
- An upgrade refused with an HTTP status is read as the close code of that
  status (``refused_code``, docs/protocol.md §8): 400 and 426 as 4000, 401
  as 4001, 403 as 4003, 429 as 4029, 500 as 1011, 503 as 1013; any other
  4xx (a proxy's 414 or 431, a wrong URL's 404) as 4000, but 408 and 421
  (retried on a new connection) as a dropped connection; any other 5xx (a
  proxy's 502 or 504) as 1013.
- 4001: ask ``get_token`` for a new token and reconnect at once, once; a
  second 4001 before a connection succeeds (or no ``get_token``) stops.
- 4008 (slow consumer): reconnect at once.
- 1012 (node draining): after the delay the reason names (``reconnect in
  <ms> ms``), else within a second.
- anything else (a dropped connection, 1006, 1011, 1013, 4009 from
  ``POST /api/disconnect``, a refused upgrade):
  exponential backoff with full jitter, a random wait in
  ``[0, min(max_delay, min_delay * 2**attempt))``; ``attempt`` starts again at
  0 after every ``welcome``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

_HINT = re.compile(r"(\d+)\s*ms")
# A 4029 that says a newer connection of the user took this one's place (close-oldest, or replaces=).
_REPLACED = re.compile(r"oldest|replaced")
_SCHEMES = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
_MAX_ATTEMPT = 30  # 2**30 * min_delay is past any max_delay: no need to grow further
# An upgrade refused before the 101: the close code a refusal after it gets
# (docs/protocol.md §8; herald.js reads an SSE refusal the same way). 426 is
# the node's answer to another WebSocket version: a client to fix, as 400.
_REFUSED = {400: 4000, 401: 4001, 403: 4003, 426: 4000, 429: 4029, 500: 1011, 503: 1013}
# Frames of ours the node could not take (RFC 6455 broken, not UTF-8, over
# ws.max_frame): the same frames would be refused again.
_FIX_THE_CLIENT = (1002, 1007, 1009)


# 4xx that a new connection may not get again: a request that timed out on its way, one sent to the wrong server.
_RETRIED_4XX = (408, 421)


def refused_code(status: int) -> int | None:
    """The close code of an upgrade refused with HTTP ``status`` (None: retried
    like a dropped connection). Beyond the node's own refusals, as herald.js
    reads an SSE refusal: a 4xx the same request would get again stops the
    client, as 4000 does; a 5xx is retried with backoff, as 1013."""
    code = _REFUSED.get(status)
    if code is not None or status < 400 or status in _RETRIED_4XX:
        return code
    return 4000 if status < 500 else 1013


def ws_url(url: str) -> str:
    """A node's WebSocket endpoint from its base URL: ``http(s)://host[:port][/prefix]``
    or ``ws(s)://…``, with ``/ws`` added unless the path already ends with it."""
    parts = urlsplit(url.strip())
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(f"not a node URL (http, https, ws or wss): {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/ws"):
        path += "/ws"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


class Endpoints:
    """The node URLs, tried in turn: each new connection goes to the next one."""

    def __init__(self, urls: str | Sequence[str]) -> None:
        listed = [urls] if isinstance(urls, str) else list(urls)
        if not listed:
            raise ValueError("no node URL given")
        self._urls = [ws_url(u) for u in listed]
        self._next = 0

    def __len__(self) -> int:
        return len(self._urls)

    def next(self) -> str:
        url = self._urls[self._next]
        self._next = (self._next + 1) % len(self._urls)
        return url


@dataclass(frozen=True, slots=True)
class Step:
    """What to do after a connection ended: wait ``delay`` seconds and connect
    again (after asking for a new token if ``new_token``), or stop."""

    delay: float = 0.0
    stop: bool = False
    new_token: bool = False


class Reconnect:
    """The close-code rules and the backoff of one client."""

    def __init__(
        self, min_delay: float = 0.5, max_delay: float = 30.0, rand: Callable[[], float] = random.random
    ) -> None:
        if not 0 < min_delay <= max_delay:
            raise ValueError("need 0 < min_delay <= max_delay")
        self.min_delay = min_delay
        self.max_delay = max_delay
        self._rand = rand
        self._attempt = 0
        self._refreshed = False  # get_token (or the hook) was asked again since the last welcome

    def opened(self) -> None:
        """A ``welcome`` arrived: the next trouble starts from the smallest delays."""
        self._attempt = 0
        self._refreshed = False

    def backoff(self) -> float:
        """The next full-jitter wait; each call doubles the bound (up to ``max_delay``)."""
        delay = self.jitter(self._attempt)
        self._attempt = min(self._attempt + 1, _MAX_ATTEMPT)
        return delay

    def jitter(self, attempt: int) -> float:
        """A full-jitter wait for the ``attempt``-th try (from 0) of anything:
        random in ``[0, min(max_delay, min_delay * 2**attempt))``."""
        return self._rand() * min(self.max_delay, self.min_delay * (1 << min(attempt, _MAX_ATTEMPT)))

    def after(self, code: int | None, reason: str, can_refresh: bool, by_hook: bool = False) -> Step:
        """The step after a connection ended with close ``code`` (None: it
        dropped, or never opened) and ``reason``. ``can_refresh``: there is a
        ``get_token`` to ask; ``by_hook``: no token at all (the connect hook
        decides from the app's cookie: after a 4001 it is asked again once)."""
        if code in (4000, 4003, 4403, *_FIX_THE_CLIENT) or (code == 4029 and _REPLACED.search(reason)):
            return Step(stop=True)
        if code == 4001:
            if not (can_refresh or by_hook) or self._refreshed:
                return Step(stop=True)
            self._refreshed = True
            return Step(self.backoff()) if by_hook else Step(new_token=True)
        if code == 4008:
            return Step()
        if code == 1012:
            hint = _HINT.search(reason)
            return Step(min(int(hint[1]) / 1000, self.max_delay) if hint else self._rand())
        return Step(self.backoff())
