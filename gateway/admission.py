"""Who may open a stream, and on which channels, and counting streams in and
out of the cluster: shared by WebSocket and SSE. Who a client is — its token,
or the connect hook's answer (``auth.mode``) — is decided here for streams and
for ``POST /api/command`` alike.

A refusal carries both forms of the answer — the HTTP status with a JSON
reason (SSE, and anything before an upgrade) and the close code (WebSocket).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from broker import BROADCAST, Channel, Connections, TooManyConnections
from broker.channels import InvalidChannel, parse_seq, room_channel, user_channel
from broker.throttle import Throttle

from .auth import Authenticator, AuthError, Identity
from .connect_hook import ConnectHook, Credentials, HookCall, HookRefused, HookUnavailable
from .disconnect import BAD_REQUEST, BAD_TOKEN, FORBIDDEN, SHUTDOWN, TOO_MANY_CONNECTIONS, UNAVAILABLE, Disconnect
from .head import Head
from .http import ConflictingTokens, TrustedProxies, client_token, peer
from .limits import normal_origin, origin_allowed
from .metrics import Metrics
from .session import Session
from .sessions import Sessions
from .settings import LimitsSettings
from .subscriptions import Subscriptions

# The longest conn a client may name (as in POST /api/command): a longer one is none.
MAX_CONN = 256


class Refusal(Exception):
    """A stream refused: its HTTP status, close code, error code and message."""

    def __init__(self, status: int, disconnect: Disconnect, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.disconnect = disconnect.with_message(message)
        self.error = error
        self.message = message


@dataclass(frozen=True, slots=True)
class Admission:
    """Who a new stream is, the channels it opens on, its resume position, and
    the stream its client gave up (``replaces=``), if it names one."""

    identity: Identity
    channels: tuple[Channel, ...]
    since: int | None
    replaces: str | None = None


def parse_replaces(value: str | None) -> str | None:
    """The ``conn`` a stream's ``?replaces=`` names; None for none. A value no
    conn can be is ignored too, never an error: it replaces nothing."""
    return value if value and len(value) <= MAX_CONN else None


def parse_since(value: str | None) -> int | None:
    """A resume position from ``?since=`` or ``Last-Event-ID``."""
    if value is None or value == "":
        return None
    try:
        return parse_seq(value)
    except InvalidChannel:
        raise Refusal(400, BAD_REQUEST, "bad_request", "since / Last-Event-ID must be a stream id (digits)") from None


class Gate:
    """Owns the admission of streams and their count: checks a request, counts
    the connection in cluster-wide, and counts a finished session out."""

    def __init__(
        self,
        limits: LimitsSettings,
        sessions: Sessions,
        subscriptions: Subscriptions,
        connections: Connections,
        authenticator: Authenticator,
        metrics: Metrics,
        warn: Throttle,
        mode: str = "jwt",
        hook: ConnectHook | None = None,
        proxies: TrustedProxies | None = None,
    ) -> None:
        if mode != "jwt" and hook is None:
            raise ValueError(f"auth.mode {mode!r} needs the connect hook")
        self._mode = mode  # auth.mode
        self._hook = hook
        self._proxies = proxies
        self._limits = limits
        self._sessions = sessions
        self._subscriptions = subscriptions
        self._connections = connections
        self._authenticator = authenticator
        self._metrics = metrics
        self._warn = warn
        # Compared with a request's Origin once both are normalised.
        self._origins = tuple("*" if o == "*" else (normal_origin(o) or o) for o in limits.origins)

    def screen(self, request: Head) -> None:
        """What is checked before a stream is accepted (before a WS upgrade, so a
        refused browser sees the HTTP status): a draining node, the node's
        capacity and the origin."""
        # An HTTP status, not a close code after the upgrade: a load balancer
        # can only pass a request on to another node before the 101.
        self._check_not_draining()
        self._check_capacity()
        self.check_origin(request)

    def refused(self, transport: str, refusal: Refusal) -> Refusal:
        """Count ``refusal`` of a ``transport`` stream (herald_connections_refused_total)."""
        self._metrics.refused.labels(transport, refusal.error).inc()
        return refusal

    def _check_not_draining(self) -> None:
        if self._sessions.draining:
            raise Refusal(503, SHUTDOWN, "draining", "node is draining: connect to another node")

    def _check_capacity(self) -> None:
        """A node at ``limits.max_connections`` refuses more streams (503: try another node)."""
        limit = self._limits.max_connections
        if limit and len(self._sessions) >= limit:
            self._metrics.limit_rejections.labels("node_connections").inc()
            self._warn("capacity", "refused a stream: %d open (limits.max_connections)", limit)
            raise Refusal(
                503, UNAVAILABLE, "node_full", f"node is at its limit of {limit} connections: try another node"
            )

    def check_origin(self, request: Head) -> None:
        """A browser page from an origin not allowed may not open a stream (the
        token may be a cookie the browser sends on its own)."""
        origin = request.headers.get("Origin")
        fetch_site = request.headers.get("Sec-Fetch-Site")
        scheme = None  # the scheme the client used, when a trusted proxy says it: the own origin's
        if origin is not None and not self._origins and self._proxies is not None:
            scheme = self._proxies.scheme(request)
        if not origin_allowed(origin, request.host, self._origins, fetch_site, scheme):
            self._metrics.limit_rejections.labels("origin").inc()
            # Quoted as sent, whatever bytes it holds.
            shown = ascii(origin) if origin is not None else f"none (Sec-Fetch-Site: {fetch_site!a})"
            self._warn("origin", "refused a stream from origin %s (limits.origins)", shown)
            raise Refusal(403, FORBIDDEN, "forbidden_origin", f"origin {shown} is not allowed (limits.origins)")

    def cross_origin(self, request: Head) -> str | None:
        """The ``Origin`` of a browser page of another site that
        ``limits.origins`` allows: what CORS headers must name for the page to
        read the answer (an event stream, a command's). None otherwise."""
        origin = request.headers.get("Origin")
        if origin is None or not self._origins or normal_origin(origin) is None:
            return None  # not a browser, or only the node's own pages are allowed (no CORS needed)
        return origin if origin_allowed(origin, request.host, self._origins) else None

    def credentials(self, request: Head, transport: str) -> Credentials:
        """What ``request`` says about who it is, by ``auth.mode``: its token
        ("jwt"; "either" when it has one), or the connect hook call that
        decides ("hook", which ignores tokens; "either" without one). Two
        different tokens are refused."""
        client = peer(request, self._proxies)
        if self._mode == "hook":
            return Credentials(client, hook=HookCall.of(request, transport, client))
        try:
            token = client_token(request)
        except ConflictingTokens as exc:
            self._metrics.auth_failures.labels("conflicting").inc()
            raise Refusal(401, BAD_TOKEN, "bad_token", str(exc)) from None
        if token is None and self._mode == "either":
            return Credentials(client, hook=HookCall.of(request, transport, client))
        return Credentials(client, token)

    async def identify(self, credentials: Credentials) -> Identity:
        """Who ``credentials`` say the client is. Refused (401 / close 4001)
        for a bad token or the app's refusal; 503 (close 1013) when the app
        gives no usable answer."""
        call = credentials.hook
        if call is None:
            try:
                return self._authenticator.authenticate(credentials.token, credentials.peer)
            except AuthError as exc:
                raise Refusal(401, BAD_TOKEN, "bad_token", str(exc)) from None
        if self._hook is None:  # a call forwarded by a node with other settings
            raise Refusal(401, BAD_TOKEN, "bad_token", "this node has no connect hook (auth.mode)")
        try:
            return await self._hook.ask(call)
        except HookRefused as exc:
            raise Refusal(401, BAD_TOKEN, "bad_token", str(exc)) from None
        except HookUnavailable as exc:
            raise Refusal(503, UNAVAILABLE, "unavailable", str(exc)) from None

    async def admit(self, request: Head, transport: str, last_event_id: str | None = None) -> Admission:
        identity = await self.identify(self.credentials(request, transport))
        rooms = list(dict.fromkeys(request.query.getall("room", [])))  # a room named twice is one room
        limit = self._limits.max_subscriptions
        if len(rooms) > limit:
            self._metrics.limit_rejections.labels("subscriptions").inc()
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
        return Admission(identity, tuple(channels), since, parse_replaces(request.query.get("replaces")))

    async def count_in(self, identity: Identity, replaces: str | None = None) -> str:
        """Count a new connection of the user cluster-wide; its id, or a refusal.
        ``replaces``: a connection its client gave up, closed and counted out
        in the same write if it is the user's (so it never costs the new one
        its place); anything else is ignored."""
        conn_id = self._sessions.new_id()
        limits = self._limits
        try:
            await self._connections.open(
                identity.user,
                conn_id,
                limits.max_connections_per_user,
                limits.connections_policy == "close-oldest",
                replaces,
            )
        except TooManyConnections as exc:
            self._metrics.limit_rejections.labels("connections_per_user").inc()
            raise Refusal(429, TOO_MANY_CONNECTIONS, "too_many_connections", str(exc)) from None
        try:
            # Admitting took a while (a connect hook, NATS): the node may have
            # begun draining since (its sessions were told to go already), or
            # filled up with the streams admitted meanwhile. The session opens
            # right after this, with no wait between: checked here, it holds.
            self._check_not_draining()
            self._check_capacity()
        except Refusal:
            self.count_out(identity.user, conn_id)
            raise
        return conn_id

    async def count_out_first(self, sessions: Iterable[Session], timeout: float) -> None:
        """Count ``sessions`` out now, before they are told to reconnect (a
        drain, a disconnect by the server API, a 4008 or 4001), and wait for
        their writes — theirs only: many slow consumers at once wait each
        for its own — at most ``timeout`` seconds, and not once NATS is away.
        Counted out only once their close finished, a user at their limit
        who came back to another node at once was refused there (4029 / 429)
        for the connection being closed here."""
        counting = [self._connections.close(s.user, s.id) for s in sessions]
        await self._connections.settle(timeout, [c for c in counting if c is not None])

    def count_out(self, user: str, conn_id: str) -> None:
        """A connection counted in never became a session (its client left)."""
        self._connections.close(user, conn_id)

    async def finish(self, session: Session, reason: Disconnect) -> None:
        """The transport is done with ``session``: count it out, release its channels."""
        if not self._sessions.remove(session, reason):
            return
        self._connections.close(session.user, session.id)
        # Not shielded: the link's finishing task is never cancelled (a cancel
        # halfway would leave the rest of the session's channels held).
        try:
            await self._subscriptions.leave_all(session)
        except Exception as exc:  # noqa: BLE001 - logged; the node goes on
            self._warn("leave", "releasing the channels of %s failed: %r", session.id, exc)
