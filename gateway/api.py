"""The HTTP API: publish (``PublishApi``), client commands (``CommandApi``),
and health, readiness, stats, presence and metrics of the node (``NodeApi``)."""

from __future__ import annotations

import asyncio
import logging
import math
import re

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from broker import Broker, BrokerUnavailable, History, MessageTooLarge, Presence, Publishable, PubSub
from broker.channels import InvalidChannel, channel_id, check_event, check_id, parse_channel, room_channel
from broker.throttle import Throttle

from .admission import Gate, Refusal
from .auth import mint_token
from .command_route import CommandRouter, error, status_of
from .commands import NOT_JSON, Frame, page_request
from .frames import TooDeep, dumps_exact, history_messages, loads_exact
from .head import FrontHead, Head
from .http import (
    AdminKeys,
    Reply,
    TrustedProxies,
    body_timeout,
    cors_pairs,
    error_reply,
    header_key,
    json_error,
    json_reply,
    json_response,
    late_body,
    peer,
    read_body,
)
from .hub import Hub
from .limits import TokenBucket
from .metrics import Metrics
from .readiness import not_ready
from .sessions import Sessions
from .settings import PublishSettings, Settings
from .subscriptions import Subscriptions

log = logging.getLogger("herald.http")

# What a publish's Idempotency-Key may be (it becomes the Nats-Msg-Id header).
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,128}")
# A publish whose head ``PublishApi.expect`` let through (judged once).
_HEAD_PASSED = web.RequestKey("herald_head_passed", bool)


class PublishApi:
    """``POST /api/publish``: one message, or a batch (a JSON array), with an
    optional ``Idempotency-Key``. Owns the rate bucket of each publish key."""

    def __init__(
        self,
        rate: float,
        max_body: int,
        body_timeout: float,
        settings: PublishSettings,
        pubsub: PubSub,
        metrics: Metrics,
        proxies: TrustedProxies,
    ) -> None:
        self._keys = settings.bearer_keys
        self._rate = rate  # limits.api_rate
        self._max_body = max_body  # http.max_body: one message
        self._body_timeout = body_timeout  # http.handshake_timeout (the front door's, for the body)
        self._max_batch = settings.max_batch
        self._max_batch_body = settings.max_batch_body
        self._pubsub = pubsub
        self._metrics = metrics
        self._buckets: dict[str, TokenBucket] = {}
        # A backend on a key no longer configured (a rotation's old key dropped
        # too soon) shows in the log too, with its address; no key is ever written there.
        self._warn = Throttle(log)
        self._proxies = proxies

    def _bucket(self, key: str) -> TokenBucket:
        """The rate bucket of one key (one per configured key: bounded)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            burst = max(1.0, self._rate)  # at least one whole token, or nothing would pass
            bucket = self._buckets[key] = TokenBucket(burst, burst / self._rate)
        return bucket

    @property
    def max_body(self) -> int:
        """The largest body (a batch's); larger ones are refused before they are read."""
        return self._max_batch_body

    async def expect(self, request: web.Request) -> web.Response | None:
        """``Expect: 100-continue`` (the aiohttp route's expect handler): the
        head is judged before the client is asked for its body, and a refused
        one is told so instead of "100 Continue"."""
        refusal = self.refusal(request, request.content_length)
        if refusal is not None:
            return refusal.response(close=True)  # the body was never asked for
        request[_HEAD_PASSED] = True  # judged once: one token of the rate limit, not two
        if request.version != (1, 1) or request.headers.get("Expect", "").lower() != "100-continue":
            return error_reply(417, "bad_request", "the only expectation served is 100-continue").response()
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None

    async def publish(self, request: web.Request) -> web.Response:
        """The aiohttp route (the front door serves the common shapes: ``answer``)."""
        refusal = None if request.get(_HEAD_PASSED) else self.refusal(request, request.content_length)
        if refusal is not None:
            # As the front door: a body not all in is not read, and the connection ends.
            return refusal.response(close=not request.content.is_eof())
        try:
            body = await read_body(request, self._body_timeout)
        except TimeoutError:
            return self.body_timed_out(self._body_timeout).response(close=True)
        except web.HTTPRequestEntityTooLarge:
            return self._too_large(f"body larger than {self._max_batch_body} bytes").response()
        except RequestPayloadError as exc:  # e.g. not gzip although Content-Encoding says so
            return self._refuse(400, "bad_request", f"body does not decode: {exc}").response()
        return (await self._publish(body, request.headers.get("Idempotency-Key"))).response()

    async def answer(self, head: FrontHead, body: bytes) -> Reply:
        """The front door's route, for a request ``refusal`` let through."""
        return await self._publish(body, head.headers.get("Idempotency-Key"))

    def body_timed_out(self, seconds: float) -> Reply:
        """A publish whose body did not arrive within ``seconds`` (the front door's
        too: front.py); its connection closes after the answer."""
        return self._refuse(408, "timeout", late_body(seconds))

    def _refuse(self, status: int, error: str, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
        self._metrics.published.labels(error).inc()  # the metric label is the error code
        return error_reply(status, error, message, headers)

    def _too_large(self, message: str) -> Reply:
        self._metrics.limit_rejections.labels("body_size").inc()
        return self._refuse(413, "too_large", message)

    def refusal(self, head: Head, content_length: int | None) -> Reply | None:
        """Why a request is refused before its body is read (the front door asks
        once the head is in: a client without the key cannot make the node hold
        a body), or None."""
        if not self._keys:
            return self._refuse(403, "disabled", "the publish API is off: set publish.key (HERALD_PUBLISH_KEY)")
        headers = head.headers
        key = header_key(headers.get("Authorization", ""), self._keys)
        if key is None:
            who = peer(head, self._proxies)
            self._warn("unauthorized", "refused POST /api/publish from %s: missing or wrong publish key", who)
            return self._refuse(401, "unauthorized", "missing or wrong publish key (Authorization: Bearer <key>)")
        wait = self._bucket(key).take()
        if wait:
            self._metrics.limit_rejections.labels("api_rate").inc()
            retry = (("Retry-After", str(max(1, math.ceil(wait)))),)
            return self._refuse(429, "rate_limited", f"more than {self._rate:g} publishes/s for this key", retry)
        idempotency_key = headers.get("Idempotency-Key")
        if idempotency_key is not None and IDEMPOTENCY_KEY.fullmatch(idempotency_key) is None:
            message = "Idempotency-Key must be 1 to 128 printable ASCII characters, no spaces"
            return self._refuse(400, "bad_request", message)
        if content_length is not None and content_length > self._max_batch_body:
            return self._too_large(f"body larger than {self._max_batch_body} bytes")
        return None

    async def _publish(self, body: bytes, idempotency_key: str | None) -> Reply:
        """Publish the body's messages; a bug met on the way is answered 500
        ``internal`` and counted as one (as every other answer is), on either
        path (a try costs nothing here: no coroutine of its own)."""
        try:
            if len(body) > self._max_body and not body.lstrip().startswith(b"["):  # only a batch may be larger
                return self._too_large(f"body larger than {self._max_body} bytes")
            try:
                doc = loads_exact(body)
            except orjson.JSONDecodeError:
                return self._refuse(400, "bad_request", "body is not valid JSON")
            try:
                items = self._items(doc, idempotency_key)
            except BadItem as exc:
                if exc.too_large:
                    return self._too_large(str(exc))
                return self._refuse(400, "bad_request", str(exc))
            try:
                published = await self._pubsub.publish_batch(items)
            except MessageTooLarge as exc:  # over NATS max_payload: a retry would not help
                return self._refuse(413, "too_large", str(exc))
            except BrokerUnavailable as exc:
                return self._refuse(503, "unavailable", str(exc))
            self._metrics.published_ok.inc()  # one request, whatever its size
            self._metrics.published_messages.inc(len(items))
            if isinstance(doc, list):
                return json_reply({"ids": [str(p.seq) for p in published]})
            answer: dict[str, object] = {"id": str(published[0].seq)}
            if published[0].duplicate:
                answer["duplicate"] = True
            return json_reply(answer)
        except Exception:
            log.exception("publish failed")
            return self._refuse(500, "internal", "internal error")

    def _items(self, doc: object, idempotency_key: str | None) -> list[Publishable]:
        """Every message of the body, checked before any is published."""
        if not isinstance(doc, list):
            return [self._item(doc, idempotency_key, "body")]
        if not 1 <= len(doc) <= self._max_batch:
            raise BadItem(f"a batch holds 1 to {self._max_batch} items (publish.max_batch)")
        key = idempotency_key
        # A space, which a key cannot hold: no single publish's key is an item's.
        return [self._item(item, None if key is None else f"{key} {i}", f"item {i}") for i, item in enumerate(doc)]

    def _item(self, doc: object, msg_id: str | None, where: str) -> Publishable:
        if not isinstance(doc, dict) or "data" not in doc:
            raise BadItem(f'{where} must be {{"channel": ..., "data": ..., "event"?: ...}}')
        unknown = doc.keys() - {"channel", "data", "event"}
        if unknown:
            raise BadItem(f"{where}: unknown field {sorted(unknown)[0]!r}")
        try:
            channel = parse_channel(doc.get("channel"))
            event = doc.get("event")
            if event is not None:
                check_event(event)
        except InvalidChannel as exc:
            raise BadItem(f"{where}: {exc}") from None
        try:
            payload = dumps_exact(doc["data"])
        except TooDeep as exc:
            raise BadItem(f"{where}: data: {exc}") from None
        if len(payload) > self._max_body:
            raise BadItem(f"{where}: data larger than {self._max_body} bytes", too_large=True)
        return Publishable(channel, payload, event, msg_id)


class BadItem(ValueError):
    """A message of a publish body that cannot be published (``too_large``: by size)."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


class CommandApi:
    """``POST /api/command``: a client command over HTTP (how SSE clients send
    them), with the user's token; the body is the WebSocket command frame,
    plus ``conn`` for the commands that act on one stream. The answer is the
    frame a WebSocket client would get, with the HTTP status of its code."""

    def __init__(self, router: CommandRouter, gate: Gate, max_body: int, timeout: float, metrics: Metrics) -> None:
        self._router = router
        self._gate = gate
        self._max_body = max_body  # ws.max_frame: a command is no bigger over HTTP
        self._timeout = timeout  # http.command_timeout
        self._metrics = metrics

    async def command(self, request: web.Request) -> web.Response:
        frame, forwarded = await self._answer(request)
        status = status_of(frame)
        label = frame["code"] if status != 200 else "ok"
        self._metrics.commands.labels(label, str(forwarded is not None).lower()).inc()
        response = json_response(frame, status) if forwarded is None else Reply(status, forwarded).response()
        if "retry_after" in frame:
            response.headers["Retry-After"] = str(max(1, math.ceil(frame["retry_after"])))
        self._allow_cross_origin(request, response)
        return response

    async def preflight(self, request: web.Request) -> web.Response:
        """``OPTIONS /api/command``: a page of another site that limits.origins
        allows may send commands (with its Authorization header)."""
        response = web.Response(status=204)
        if not self._allow_cross_origin(request, response):
            return json_error(403, "forbidden_origin", "origin is not allowed (limits.origins)")
        response.headers["Access-Control-Allow-Methods"] = "POST"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Access-Control-Max-Age"] = "600"
        return response

    def _allow_cross_origin(self, request: web.Request, response: web.Response) -> bool:
        origin = self._gate.cross_origin(request)
        response.headers.update(cors_pairs(origin))
        return origin is not None

    async def _answer(self, request: web.Request) -> tuple[Frame, bytes | None]:
        try:
            self._gate.check_origin(request)  # a cookie token must not work for another site's page
            credentials = self._gate.credentials(request, "command")  # a token, or the connect hook's call
        except Refusal as refusal:
            return error(refusal.error, refusal.message), None
        limit = self._max_body
        body: bytes | None = None
        if request.content_length is None or request.content_length <= limit:
            try:
                body = await read_body(request, self._timeout)
            except TimeoutError:
                return error("timeout", late_body(self._timeout)), None
            except web.HTTPRequestEntityTooLarge:
                body = None
            except RequestPayloadError as exc:
                return error("bad_request", f"body does not decode: {exc}"), None
        if body is None or len(body) > limit:
            self._metrics.limit_rejections.labels("body_size").inc()
            return error("too_large", f"a command is at most {limit} bytes"), None
        try:
            cmd = loads_exact(body)
        except orjson.JSONDecodeError:
            cmd = NOT_JSON
        return await self._router.run(credentials, cmd, body if cmd is not NOT_JSON else b"")


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


class NodeApi:
    """Readiness, stats, presence, metrics (admin key where it says) and dev tokens."""

    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        sessions: Sessions,
        subscriptions: Subscriptions,
        hub: Hub,
        presence: Presence,
        history: History,
        metrics: Metrics,
        proxies: TrustedProxies,
    ) -> None:
        self._node_id = settings.node.id
        self._page_max = settings.history.page_max
        self._admin = AdminKeys(settings.admin.bearer_keys, proxies)
        self._jwt = settings.jwt
        self._body_timeout = settings.http.handshake_timeout
        self._broker = broker
        self._sessions = sessions
        self._subscriptions = subscriptions
        self._hub = hub
        self._presence = presence
        self._history = history
        self._metrics = metrics

    async def readyz(self, request: web.Request) -> web.Response:
        reason = not_ready(self._sessions, self._broker)
        if reason is not None:
            return json_error(503, reason.error, reason.message)
        return json_response({"status": "ready"})

    async def stats(self, request: web.Request) -> web.Response:
        refused = self._admin.refusal(request)
        if refused is not None:
            return refused
        by_transport = dict.fromkeys(self._metrics.transport, 0)  # every transport the node serves
        for session in self._sessions:
            by_transport[session.transport.name] += 1
        broker = self._broker.stats()
        return json_response(
            {
                "node": self._node_id,
                "connections": by_transport,
                "users": len({s.user for s in self._sessions}),
                "channels": self._hub.channel_count,
                "rooms": self._subscriptions.local_rooms(),
                "nats": {"connected": broker.connected, "subscriptions": broker.subscriptions},
                "draining": self._sessions.draining,
                # For leak hunting (make soak): tasks that outlive their connections.
                "tasks": len(asyncio.all_tasks()),
            }
        )

    async def presence(self, request: web.Request) -> web.Response:
        """``GET /api/presence/<room>`` (admin key): the room's users on any node."""
        refused = self._admin.refusal(request)
        if refused is not None:
            return refused
        try:
            channel = room_channel(request.match_info["room"])
        except InvalidChannel as exc:
            return json_error(400, "bad_request", str(exc))
        try:
            users = await self._presence.members(channel)
        except BrokerUnavailable as exc:
            return json_error(503, "unavailable", str(exc))
        return json_response({"room": channel_id(channel), "users": users})

    async def history(self, request: web.Request) -> web.Response:
        """``GET /api/history?channel=room:<id>|user:<id>|broadcast&limit=&before=``
        (admin key): a page of the channel's history, as the ``history`` command gives it."""
        refused = self._admin.refusal(request)
        if refused is not None:
            return refused
        query = request.query
        try:
            channel = parse_channel(query.get("channel"))
            limit, before = page_request(query.get("limit"), query.get("before"), self._page_max)
        except InvalidChannel as exc:
            return json_error(400, "bad_request", str(exc))
        try:
            page = await self._history.page(channel, before, limit)
        except BrokerUnavailable as exc:
            return json_error(503, "unavailable", str(exc))
        return json_response({"channel": str(channel), "messages": history_messages(page)})

    async def dev_token(self, request: web.Request) -> web.Response:
        """``POST /api/dev/token {"user", "ttl"?}`` → a token for that user (all
        rooms, publish everywhere, ``ttl`` seconds: 1 to 86400, default 3600).
        Only with ``http.dev_tokens`` (``herald dev``)."""
        try:
            body = await read_body(request, self._body_timeout)
        except TimeoutError:
            return body_timeout(self._body_timeout).response(close=True)
        try:
            doc = orjson.loads(body)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            user = check_id("user", doc.get("user"))
            ttl = doc.get("ttl", 3600)
            if type(ttl) not in (int, float) or not 1 <= ttl <= 86400:
                raise ValueError("ttl must be a number of seconds from 1 to 86400")
        except (orjson.JSONDecodeError, InvalidChannel, ValueError) as exc:
            return json_error(400, "bad_request", f'body must be {{"user": "<id>", "ttl": <seconds>}}: {exc}')
        jwt = self._jwt
        token = mint_token(jwt.secret, user, ["*"], ["*"], ttl, audience=jwt.audience, issuer=jwt.issuer)
        return json_response({"token": token, "user": user, "expires_in": ttl})

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
