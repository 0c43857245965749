"""The connect hook (``auth.mode = "hook" | "either"``): the app says who a
client is, from what its browser sends anyway (the app's session cookie).

For a stream (or a ``POST /api/command``) that is to be identified this way
the node POSTs, signed like webhooks (``Herald-Signature``)::

    {"transport": "ws" | "sse" | "command",
     "headers": {"cookie": …, "origin": …, "user-agent": …},   (null when absent)
     "query": "<the query string>", "remote": "<the client's address>"}

and the app answers 200 ``{"user", "rooms", "publish", "expires"}`` (the
claims a token would carry: checked as strictly), or 401 / 403 to refuse the
client. Anything else — a timeout, a refused connection, another status, an
answer that does not pass — is no answer: the client is refused for now
(503), never admitted.

A 200 answer is reused for requests with the same ``Cookie`` header (kept by
its hash, ``auth.connect_cache_ttl`` at most and never past ``expires``), and
requests with the same cookie that arrive while the app is being asked wait
for that one answer: a reconnect storm asks the app once per cookie.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from yarl import URL

from broker.channels import ID_RE
from broker.throttle import Throttle

from .auth import GLOB_RE, Identity
from .head import Head
from .hooks import signature
from .metrics import CONNECT_HOOK_RESULTS, Metrics
from .settings import AuthSettings

log = logging.getLogger("herald.connect_hook")

# Answers kept at once; the oldest go first.
CACHE_SIZE = 10_000
# The largest answer read from the app.
MAX_ANSWER = 64 * 1024
# ``expires`` further away than this is taken for a mistake (milliseconds, most likely).
MAX_EXPIRES_AHEAD = 10 * 366 * 86400.0
_FIELDS = frozenset({"user", "rooms", "publish", "expires"})
# What a client refused for want of an answer is told (the log says why).
UNAVAILABLE = "connect hook unavailable: try again"


class HookRefused(Exception):
    """The app refused the client (401 / 403): like a bad token."""


class HookUnavailable(Exception):
    """No usable answer from the app: the client is refused for now (503)."""


@dataclass(frozen=True, slots=True)
class HookCall:
    """What the connect hook is asked about one request."""

    transport: str  # "ws", "sse" or "command"
    cookie: str | None
    origin: str | None
    user_agent: str | None
    query: str
    remote: str  # the client's address (behind trusted proxies: the forwarded one)

    @classmethod
    def of(cls, request: Head, transport: str, remote: str) -> HookCall:
        headers = request.headers
        cookies = headers.getall("Cookie", [])  # HTTP/2 proxies may split it in several
        return cls(
            transport=transport,
            cookie=_json_text("; ".join(cookies)) if cookies else None,
            origin=_json_text(headers.get("Origin")),
            user_agent=_json_text(headers.get("User-Agent")),
            query=request.rel_url.raw_query_string,
            remote=remote,
        )

    def document(self) -> dict[str, Any]:
        """The request body (and the form a forwarded command carries it in)."""
        return {
            "transport": self.transport,
            "headers": {"cookie": self.cookie, "origin": self.origin, "user-agent": self.user_agent},
            "query": self.query,
            "remote": self.remote,
        }

    @classmethod
    def from_document(cls, doc: Any) -> HookCall:
        """Back from ``document`` (a command another node forwarded); ValueError if it is not one."""
        try:
            headers = doc["headers"]
            call = cls(
                doc["transport"],
                headers["cookie"],
                headers["origin"],
                headers["user-agent"],
                doc["query"],
                doc["remote"],
            )
        except (KeyError, TypeError):
            raise ValueError("not a connect hook call") from None
        texts = (call.transport, call.query, call.remote)
        optional = (call.cookie, call.origin, call.user_agent)
        if not all(isinstance(v, str) for v in texts) or not all(v is None or isinstance(v, str) for v in optional):
            raise ValueError("not a connect hook call")
        return call

    @property
    def cache_key(self) -> bytes | None:
        """The hash of the cookie its answer is kept under (None: not kept)."""
        return hashlib.sha256(self.cookie.encode()).digest() if self.cookie else None


def _json_text(value: str | None) -> str | None:
    """A header as JSON can carry it: bytes that are not UTF-8 (kept as
    surrogates when the head was read) become U+FFFD."""
    if value is None or value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a request says about who it is: a token, or the connect hook call
    that decides (``auth.mode``); and the client's address, for logs."""

    peer: str
    token: str | None = None
    hook: HookCall | None = None

    def wire(self) -> dict[str, Any]:
        """The fields a forwarded command carries them in."""
        doc: dict[str, Any] = {"token": self.token}
        if self.hook is not None:
            doc["hook"] = self.hook.document()
        return doc

    @classmethod
    def from_wire(cls, doc: dict[str, Any], peer: str) -> Credentials:
        """Back from ``wire`` (ValueError if the hook call is not one)."""
        token = doc.get("token")
        hook = doc.get("hook")
        return cls(
            peer,
            token if isinstance(token, str) else None,
            HookCall.from_document(hook) if hook is not None else None,
        )


def parse_answer(body: bytes, now: float) -> Identity:
    """The identity in a 200 answer; ValueError says what is wrong with it."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValueError("not JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (expected user, rooms, publish, expires)")
    user = doc.get("user")
    if not isinstance(user, str) or ID_RE.fullmatch(user) is None:
        raise ValueError("user must match [A-Za-z0-9_:@=+-]{1,128}")
    globs = {}
    for name in ("rooms", "publish"):
        value = doc.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and GLOB_RE.fullmatch(v) for v in value):
            raise ValueError(f"{name} must be a list of room ids or globs")
        globs[name] = tuple(value)
    expires = doc.get("expires")
    if isinstance(expires, bool) or not isinstance(expires, (int, float)) or not math.isfinite(expires):
        raise ValueError("expires must be a unix time in seconds")
    if not now < expires <= now + MAX_EXPIRES_AHEAD:
        raise ValueError(f"expires must be a unix time in seconds in the future, got {expires!r}")
    return Identity(user, globs["rooms"], globs["publish"], float(expires))


class ConnectHook:
    """Asks the app who a client is (``auth.connect_url``); keeps its answers
    per cookie; counts and times what happens; warns, throttled, when the app
    gives no usable answer."""

    def __init__(self, settings: AuthSettings, metrics: Metrics) -> None:
        self._url = settings.connect_url
        self._shown = str(URL(settings.connect_url).with_user(None))  # for logs: no credentials
        self._secrets = [s for s in (settings.connect_secret, settings.connect_secret_previous) if s]
        self._timeout = settings.connect_timeout
        self._ttl = settings.connect_cache_ttl
        self._metrics = metrics
        self._results = {result: metrics.connect_hook.labels(result) for result in CONNECT_HOOK_RESULTS}
        self._warn = Throttle(log)
        self._http: aiohttp.ClientSession | None = None
        # cookie hash -> (identity, monotonic time it may be reused until, at
        # most: the ttl is a duration, which a wall clock stepped back would
        # stretch; its expires, a wall-clock time, is checked as well)
        self._cache: dict[bytes, tuple[Identity, float]] = {}
        self._asking: dict[bytes, asyncio.Task[Identity]] = {}
        # user -> when ``forget`` dropped its answers (kept while an ask may still be under way)
        self._forgotten: dict[str, float] = {}

    async def ask(self, call: HookCall) -> Identity:
        """Who ``call``'s client is; HookRefused or HookUnavailable."""
        key = call.cache_key if self._ttl else None
        if key is None:
            return await self._ask(call)
        kept = self._cache.get(key)
        if kept is not None:
            identity, until = kept
            if until > time.monotonic() and (identity.expires or 0.0) > time.time():
                self._results["cached"].inc()
                return identity
            del self._cache[key]
        task = self._asking.get(key)
        if task is None:
            task = self._asking[key] = asyncio.create_task(self._ask_and_keep(key, call))
            task.add_done_callback(functools.partial(self._asked, key))
        else:
            self._results["cached"].inc()  # one answer for every request with this cookie meanwhile
        # Shielded: the request that started it may leave; the others still wait for it.
        return await asyncio.shield(task)

    def forget(self, user: str) -> None:
        """Drop the answers kept for ``user``: the backend closed the user's
        connections (a logout, a permission change), so their reconnects ask
        the app again instead of being admitted on what it said before."""
        for key in [key for key, (identity, _) in self._cache.items() if identity.user == user]:
            del self._cache[key]
        # An ask under way now may bring an answer from before: used by those
        # waiting for it, not kept, and not waited for by requests from now on
        # (whose cookie it is, only its answer says: every ask is let go).
        self._asking.clear()
        now = time.monotonic()
        self._forgotten = {u: t for u, t in self._forgotten.items() if now - t <= self._timeout + 1.0}
        self._forgotten[user] = now

    def _asked(self, key: bytes, task: asyncio.Task[Identity]) -> None:
        if self._asking.get(key) is task:
            del self._asking[key]
        if not task.cancelled():
            task.exception()  # retrieved: nobody may be waiting any more

    async def _ask_and_keep(self, key: bytes, call: HookCall) -> Identity:
        asked = time.monotonic()
        identity = await self._ask(call)
        assert identity.expires is not None
        if self._forgotten.get(identity.user, -math.inf) >= asked:
            return identity
        if len(self._cache) >= CACHE_SIZE:
            del self._cache[next(iter(self._cache))]  # the oldest
        self._cache[key] = identity, time.monotonic() + self._ttl
        return identity

    async def _ask(self, call: HookCall) -> Identity:
        body = orjson.dumps(call.document())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "herald-connect",
            "Herald-Signature": signature(self._secrets, int(time.time()), body),
        }
        http = self._session()
        began = time.monotonic()
        try:
            async with asyncio.timeout(self._timeout):
                async with http.post(self._url, data=body, headers=headers, allow_redirects=False) as resp:
                    status = resp.status
                    answer = await _read_bounded(resp) if status == 200 else b""
        except TimeoutError:
            raise self._unavailable("timeout", f"no answer within {self._timeout:g}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise self._unavailable("unreachable", f"{type(exc).__name__}: {exc}") from None
        finally:
            self._metrics.connect_hook_seconds.observe(time.monotonic() - began)
        if status in (401, 403):
            self._results["refused"].inc()
            raise HookRefused(f"refused by the app (connect hook: HTTP {status})")
        if status != 200:
            raise self._unavailable("error_status", f"HTTP {status}")
        if answer is None:
            problem = f"larger than {MAX_ANSWER} bytes"
        else:
            try:
                identity = parse_answer(answer, time.time())
            except ValueError as exc:
                problem = str(exc)
            else:
                self._results["admitted"].inc()
                return identity
        self._results["bad_answer"].inc()
        self._warn("answer", "connect hook %s answered 200 with a bad answer: %s", self._shown, problem)
        raise HookUnavailable(UNAVAILABLE)

    def _unavailable(self, result: str, why: str) -> HookUnavailable:
        self._results[result].inc()
        self._warn("down", "connect hook %s failed (%s): clients it would identify are refused (503)", self._shown, why)
        return HookUnavailable(UNAVAILABLE)

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                cookie_jar=aiohttp.DummyCookieJar(),  # what the app sets is not ours to send back
            )
        return self._http

    async def close(self) -> None:
        for task in list(self._asking.values()):
            task.cancel()
        if self._http is not None:
            await self._http.close()
            self._http = None


async def _read_bounded(resp: aiohttp.ClientResponse) -> bytes | None:
    """The answer's body, or None past MAX_ANSWER bytes."""
    if resp.content_length is not None and resp.content_length > MAX_ANSWER:
        return None
    body = bytearray()
    async for chunk in resp.content.iter_chunked(16384):
        body += chunk
        if len(body) > MAX_ANSWER:
            return None
    return bytes(body)
