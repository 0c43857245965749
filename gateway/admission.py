"""Who may open a stream, and on which channels: shared by WebSocket and SSE.

A refusal carries both forms of the answer — the HTTP status with a JSON
reason (SSE, and anything before an upgrade) and the close code (WebSocket).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from broker import TooManyConnections
from broker.channels import BROADCAST, InvalidChannel, parse_seq, room_channel, user_channel

from .auth import AuthError, Identity
from .disconnect import BAD_REQUEST, BAD_TOKEN, FORBIDDEN, SHUTDOWN, TOO_MANY_CONNECTIONS, UNAVAILABLE, Disconnect
from .http import ConflictingTokens, client_token, peer
from .limits import origin_allowed
from .node import Node


class Refusal(Exception):
    def __init__(self, status: int, disconnect: Disconnect, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.disconnect = disconnect.with_message(message)
        self.error = error
        self.message = message


@dataclass(frozen=True, slots=True)
class Admission:
    identity: Identity
    channels: tuple[str, ...]
    since: int | None


def parse_since(value: str | None) -> int | None:
    """A resume position from ``?since=`` or ``Last-Event-ID``."""
    if value is None or value == "":
        return None
    try:
        return parse_seq(value)
    except InvalidChannel:
        raise Refusal(400, BAD_REQUEST, "bad_request", "since / Last-Event-ID must be a stream id (digits)") from None


async def count_in(node: Node, identity: Identity) -> str:
    """Count a new connection of the user cluster-wide; its id, or a refusal."""
    conn_id = node.new_conn_id()
    limits = node.settings.limits
    try:
        await node.broker.open_connection(
            identity.user, conn_id, limits.max_connections_per_user, limits.connections_policy == "close-oldest"
        )
    except TooManyConnections as exc:
        node.metrics.limit_rejections.labels("connections_per_user").inc()
        raise Refusal(429, TOO_MANY_CONNECTIONS, "too_many_connections", str(exc)) from None
    return conn_id


def screen(node: Node, request: web.Request) -> None:
    """What is checked before a stream is accepted (before a WS upgrade, so a
    refused browser sees the HTTP status): a draining node, the node's
    capacity and the origin."""
    if node.draining:
        # An HTTP status, not a close code after the upgrade: a load balancer
        # can only pass a request on to another node before the 101.
        raise Refusal(503, SHUTDOWN, "draining", "node is draining: connect to another node")
    check_capacity(node)
    check_origin(node, request)


def check_capacity(node: Node) -> None:
    """A node at ``limits.max_connections`` refuses more streams (503: try another node)."""
    limit = node.settings.limits.max_connections
    if limit and len(node.sessions) >= limit:
        node.metrics.limit_rejections.labels("node_connections").inc()
        node.warn("capacity", "refused a stream: %d open (limits.max_connections)", limit)
        raise Refusal(503, UNAVAILABLE, "node_full", f"node is at its limit of {limit} connections: try another node")


def check_origin(node: Node, request: web.Request) -> None:
    """A browser page from an origin not allowed may not open a stream (the
    token may be a cookie the browser sends on its own)."""
    origin = request.headers.get("Origin")
    if not origin_allowed(origin, request.host, node.allowed_origins):
        node.metrics.limit_rejections.labels("origin").inc()
        shown = ascii(origin)  # quoted as sent, whatever bytes it holds
        node.warn("origin", "refused a stream from origin %s (limits.origins)", shown)
        raise Refusal(403, FORBIDDEN, "forbidden_origin", f"origin {shown} is not allowed (limits.origins)")


def admit(node: Node, request: web.Request, last_event_id: str | None = None) -> Admission:
    try:
        token = client_token(request)
    except ConflictingTokens as exc:
        node.metrics.auth_failures.labels("conflicting").inc()
        raise Refusal(401, BAD_TOKEN, "bad_token", str(exc)) from None
    try:
        identity = node.authenticate(token, peer(request))
    except AuthError as exc:
        raise Refusal(401, BAD_TOKEN, "bad_token", str(exc)) from None

    rooms = request.query.getall("room", [])
    limit = node.settings.limits.max_subscriptions
    if len(rooms) > limit:
        node.metrics.limit_rejections.labels("subscriptions").inc()
        raise Refusal(400, BAD_REQUEST, "too_many_subscriptions", f"at most {limit} rooms per connection")
    channels = [user_channel(identity.user), BROADCAST]
    for room in rooms:
        try:
            channel = room_channel(room)
        except InvalidChannel as exc:
            raise Refusal(400, BAD_REQUEST, "bad_request", str(exc)) from None
        if not identity.may_join(room):
            raise Refusal(403, FORBIDDEN, "forbidden", f"token does not allow room {room}")
        if channel not in channels:
            channels.append(channel)

    # EventSource reconnects to the same URL with a newer Last-Event-ID: it wins over ?since=.
    since = parse_since(last_event_id or request.query.get("since"))
    return Admission(identity, tuple(channels), since)
