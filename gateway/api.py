"""The HTTP API: publish, health, readiness, stats, metrics."""

from __future__ import annotations

import asyncio
import math

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from broker import BrokerUnavailable
from broker.channels import InvalidChannel, check_event, check_id, parse_channel, room_channel

from .auth import mint_token
from .frames import dumps_exact, loads_exact
from .http import json_error, json_response, key_matches
from .keys import NODE


async def publish(request: web.Request) -> web.Response:
    node = request.app[NODE]
    result = node.metrics.published

    def refuse(status: int, error: str, message: str) -> web.Response:
        result.labels(error).inc()  # the metric label is the error code
        return json_error(status, error, message)

    key = node.settings.publish.key
    if not key:
        return refuse(403, "disabled", "the publish API is off: set publish.key (HERALD_PUBLISH_KEY)")
    if not key_matches(request, key):
        return refuse(401, "unauthorized", "missing or wrong publish key (Authorization: Bearer <key>)")
    wait = node.api_bucket(key).take()
    if wait:
        node.metrics.limit_rejections.labels("api_rate").inc()
        response = refuse(429, "rate_limited", f"more than {node.settings.limits.api_rate:g} publishes/s for this key")
        response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return response
    limit = node.settings.http.max_body
    too_large = f"body larger than {limit} bytes"
    if request.content_length is not None and request.content_length > limit:
        node.metrics.limit_rejections.labels("body_size").inc()
        return refuse(413, "too_large", too_large)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        node.metrics.limit_rejections.labels("body_size").inc()
        return refuse(413, "too_large", too_large)
    except RequestPayloadError as exc:  # e.g. not gzip although Content-Encoding says so
        return refuse(400, "bad_request", f"body does not decode: {exc}")
    try:
        doc = loads_exact(body)
    except orjson.JSONDecodeError:
        return refuse(400, "bad_request", "body is not valid JSON")
    if not isinstance(doc, dict) or "data" not in doc:
        return refuse(400, "bad_request", 'body must be {"channel": ..., "data": ..., "event"?: ...}')
    try:
        channel = parse_channel(doc.get("channel"))
        event = doc.get("event")
        if event is not None:
            check_event(event)
    except InvalidChannel as exc:
        return refuse(400, "bad_request", str(exc))
    try:
        seq = await node.broker.publish(channel, dumps_exact(doc["data"]), event)
    except BrokerUnavailable as exc:
        return refuse(503, "unavailable", str(exc))
    result.labels("ok").inc()
    return json_response({"id": str(seq)})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    node = request.app[NODE]
    if node.draining:
        return json_error(503, "draining", "node is draining")
    if not node.broker.ready:
        return json_error(503, "nats_unavailable", "not connected to NATS or the stream is not ready")
    return json_response({"status": "ready"})


async def stats(request: web.Request) -> web.Response:
    node = request.app[NODE]
    if not key_matches(request, node.settings.admin.key):
        return json_error(401, "unauthorized", "missing or wrong admin key (Authorization: Bearer <key>)")
    by_transport = {"ws": 0, "sse": 0}
    for session in node.sessions:
        by_transport[session.transport] += 1
    broker = node.broker.stats()
    return json_response(
        {
            "node": node.id,
            "connections": by_transport,
            "users": len({s.user for s in node.sessions}),
            "channels": node.hub.channel_count,
            "rooms": node.hub.local_rooms(),
            "nats": {"connected": broker.connected, "subscriptions": broker.subscriptions},
            "draining": node.draining,
            # For leak hunting (make soak): tasks that outlive their connections.
            "tasks": len(asyncio.all_tasks()),
        }
    )


async def presence(request: web.Request) -> web.Response:
    """``GET /api/presence/<room>`` (admin key): the room's users on any node."""
    node = request.app[NODE]
    if not key_matches(request, node.settings.admin.key):
        return json_error(401, "unauthorized", "missing or wrong admin key (Authorization: Bearer <key>)")
    try:
        channel = room_channel(request.match_info["room"])
    except InvalidChannel as exc:
        return json_error(400, "bad_request", str(exc))
    try:
        users = await node.broker.members(channel)
    except BrokerUnavailable as exc:
        return json_error(503, "unavailable", str(exc))
    return json_response({"room": channel[5:], "users": users})


async def dev_token(request: web.Request) -> web.Response:
    """``POST /api/dev/token {"user", "ttl"?}`` → a token for that user (all
    rooms, publish everywhere, ``ttl`` seconds: 1 to 86400, default 3600).
    Only with ``http.dev_tokens`` (``herald dev``)."""
    node = request.app[NODE]
    try:
        doc = orjson.loads(await request.read())
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        user = check_id("user", doc.get("user"))
        ttl = doc.get("ttl", 3600)
        if type(ttl) not in (int, float) or not 1 <= ttl <= 86400:
            raise ValueError("ttl must be a number of seconds from 1 to 86400")
    except (orjson.JSONDecodeError, InvalidChannel, ValueError) as exc:
        return json_error(400, "bad_request", f'body must be {{"user": "<id>", "ttl": <seconds>}}: {exc}')
    token = mint_token(node.settings.jwt.secret, user, rooms=["*"], publish=["*"], ttl=ttl)
    return json_response({"token": token, "user": user, "expires_in": ttl})


async def metrics(request: web.Request) -> web.Response:
    node = request.app[NODE]
    body = generate_latest(node.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
