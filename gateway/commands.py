"""Client → server commands, from a WebSocket or ``POST /api/command``. Each
answers with one frame (``ack``, ``presence``, ``pong`` or ``error``),
echoing the command's ``ref``; the caller sends it where it belongs."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from broker import BROADCAST, BrokerUnavailable, Channel, History, MessageTooLarge, Presence, PubSub, ReadPositions
from broker.channels import (
    InvalidChannel,
    channel_id,
    check_event,
    client_name,
    glob_match,
    is_room,
    parse_channel,
    parse_seq,
    room_channel,
    user_channel,
)
from broker.throttle import Throttle

from .auth import Authenticator, AuthError, Identity
from .disconnect import RATE_LIMITED
from .frames import TooDeep, dumps_exact, history_messages, loads_exact
from .limits import CommandLimiter, retry_after
from .metrics import Metrics
from .resume import Resumer
from .session import Session
from .settings import LimitsSettings
from .subscriptions import Subscriptions

Ref = str | int | None
Frame = dict[str, Any]
# A command whose body is not JSON at all (it still counts against the budget).
NOT_JSON = object()
# The session was closed for refusals in a row: nothing is answered.
_CLOSED: Frame = {}


class CommandError(Exception):
    """A command refused: its ``error`` frame's code and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _room(cmd: dict[str, Any]) -> Channel:
    """The command's room channel, validated."""
    try:
        return room_channel(cmd.get("room"))
    except InvalidChannel as exc:
        raise CommandError("bad_request", str(exc)) from None


def valid_ref(ref: Any) -> bool:
    """Whether ``ref`` is one an answer echoes: a string of at most 64
    characters, or an integer a double holds exactly."""
    return (isinstance(ref, str) and len(ref) <= 64) or (type(ref) is int and abs(ref) < 2**53)


class Commands:
    """The command handlers of one node (no state of their own: one instance
    serves every connection)."""

    def __init__(
        self,
        limits: LimitsSettings,
        client_publish: tuple[str, ...],
        subscriptions: Subscriptions,
        resumer: Resumer,
        pubsub: PubSub,
        history: History,
        page_max: int,
        reads: ReadPositions,
        presence: Presence,
        authenticator: Authenticator,
        metrics: Metrics,
        warn: Throttle,
    ) -> None:
        self._limits = limits
        self._client_publish = client_publish  # rooms.client_publish
        self._subscriptions = subscriptions
        self._resumer = resumer
        self._pubsub = pubsub
        self._history = history
        self._page_max = page_max  # history.page_max
        self._reads = reads
        self._presence = presence
        self._authenticator = authenticator
        self._metrics = metrics
        self._warn = warn

    def limiter(self, session: Session) -> CommandLimiter:
        """The session's command budget (made on its first command)."""
        limiter = session.limiter
        if limiter is None:
            limiter = session.limiter = self.new_limiter()
        return limiter

    def new_limiter(self) -> CommandLimiter:
        limits = self._limits
        return CommandLimiter(limits.publish_rate, limits.command_rate, limits.rate_window)

    async def handle(self, session: Session, text: str) -> None:
        """A command frame from a client's own connection: the answer is queued to it."""
        try:
            cmd = loads_exact(text)
        except orjson.JSONDecodeError:
            cmd = NOT_JSON
        frame = await self.run(session.identity, session, self.limiter(session), cmd)
        if frame is not None:
            session.send(frame)

    async def run(self, identity: Identity, session: Session | None, limiter: CommandLimiter, cmd: Any) -> Frame | None:
        """Run one command (its decoded JSON, or NOT_JSON) for ``identity``, on
        ``session`` if it names one; returns the answer frame (``ack``,
        ``presence``, ``pong``… or ``error``), echoing the command's ``ref``.
        None: the session was closed for abusing the rate limit."""
        kind = cmd.get("type") if isinstance(cmd, dict) else None
        ref = cmd.get("ref") if isinstance(cmd, dict) else None
        good_ref = ref is None or valid_ref(ref)
        # Every frame counts against the budget, garbage included.
        refused = self._rate(session, identity, limiter, kind if isinstance(kind, str) else "")
        if refused is not None:
            return None if refused is _CLOSED else _reply(refused, ref if good_ref else None)
        if cmd is NOT_JSON:
            return _error(None, "bad_frame", "frame is not valid JSON")
        if not isinstance(cmd, dict):
            return _error(None, "bad_frame", "frame must be a JSON object")
        if not good_ref:
            return _error(None, "bad_request", "ref must be a string (<= 64 chars) or an integer")
        handler = _HANDLERS.get(kind) if isinstance(kind, str) else None
        if handler is None:
            return _error(ref, "unknown_command", "unknown command type")
        try:
            return _reply(await handler(self, identity, session, cmd), ref)
        except CommandError as exc:
            return _error(ref, exc.code, str(exc))
        except MessageTooLarge as exc:  # over NATS max_payload: a retry would not help
            return _error(ref, "too_large", str(exc))
        except BrokerUnavailable as exc:
            return _error(ref, "unavailable", str(exc))

    def refuse_binary(self, session: Session) -> None:
        if self.within_rate(session):
            session.send(_error(None, "bad_frame", "binary frames are not supported: send JSON text"))

    def within_rate(self, session: Session) -> bool:
        """A frame that is no command (a ping) takes its share of the budget too."""
        refused = self._rate(session, session.identity, self.limiter(session), "")
        if refused is not None and refused is not _CLOSED:
            session.send(refused)
        return refused is None

    def _rate(self, session: Session | None, identity: Identity, limiter: CommandLimiter, kind: str) -> Frame | None:
        """None if the command may run; else the ``rate_limited`` error, or
        _CLOSED once the session was closed for refusals in a row."""
        limits = self._limits
        wait = limiter.check(kind)
        if not wait:
            return None
        name = "publish_rate" if kind == "publish" else "command_rate"
        self._metrics.limit_rejections.labels(name).inc()
        if session is not None and limiter.strikes >= limits.abuse_strikes:
            self._warn(
                "abuse", "closing %s (user %s): %d commands refused in a row", session.id, session.user, limiter.strikes
            )
            session.close(RATE_LIMITED)
            return _CLOSED
        what = "publishes" if kind == "publish" else "commands"
        message = f"too many {what}: retry later"
        return _frame("error", code="rate_limited", message=message, retry_after=retry_after(wait))

    async def subscribe(self, identity: Identity, session: Session | None, cmd: dict[str, Any]) -> Frame:
        session = _on_connection(session, "subscribe")
        channel = _room(cmd)
        if not identity.may_join(channel_id(channel)):
            raise CommandError("forbidden", f"token does not allow room {channel_id(channel)}")
        since = cmd.get("since")
        try:
            position = None if since is None else parse_seq(since)
        except InvalidChannel as exc:
            raise CommandError("bad_request", str(exc)) from None
        joining = session.joining if session.joining is not None else set()
        new = channel not in session.channels and channel not in joining
        if new:
            # The user channel and broadcast are always there and do not count;
            # rooms that subscribes under way will join do.
            limit = self._limits.max_subscriptions
            if len(session.channels) - 2 + len(joining - session.channels) >= limit:
                self._metrics.limit_rejections.labels("subscriptions").inc()
                raise CommandError("too_many_subscriptions", f"at most {limit} rooms per connection")
            joining.add(channel)
            session.joining = joining
        try:
            if position is not None:
                await self._resumer.resume(session, (channel,), position)  # joins, then replays
            else:
                await self._subscriptions.join(session, channel)
        finally:
            if new:
                joining.discard(channel)
        return _frame("ack", channel=channel)

    async def unsubscribe(self, identity: Identity, session: Session | None, cmd: dict[str, Any]) -> Frame:
        session = _on_connection(session, "unsubscribe")
        channel = _room(cmd)
        if session.granted is not None:
            session.granted.discard(channel)
        await self._subscriptions.leave(session, channel)
        return _frame("ack", channel=channel)

    async def publish(self, identity: Identity, session: Session | None, cmd: dict[str, Any]) -> Frame:
        channel = _room(cmd)
        room = channel_id(channel)
        if not identity.may_publish(room):
            raise CommandError("forbidden", f"token does not allow publishing to room {room}")
        if not glob_match(self._client_publish, room):
            raise CommandError("forbidden", f"clients may not publish to room {room} (rooms.client_publish)")
        if "data" not in cmd:
            raise CommandError("bad_request", "publish needs data")
        if "from" in cmd:  # the node names the publisher: a client's own claim would be unchecked
            raise CommandError("bad_request", "publish takes no from: the node names the publishing user")
        event = cmd.get("event")
        if event is not None:
            try:
                check_event(event)
            except InvalidChannel as exc:
                raise CommandError("bad_request", str(exc)) from None
        try:
            payload = dumps_exact(cmd["data"])
        except TooDeep as exc:
            raise CommandError("bad_request", f"data: {exc}") from None
        if cmd.get("ephemeral") is True:
            await self._pubsub.publish_ephemeral(channel, payload, event, identity.user)
            return _frame("ack", channel=channel)
        seq = await self._pubsub.publish(channel, payload, event, identity.user)
        return _frame("ack", channel=channel, id=str(seq))

    async def refresh(self, identity: Identity, session: Session | None, cmd: dict[str, Any]) -> Frame:
        session = _on_connection(session, "refresh")
        token = cmd.get("token")
        if not isinstance(token, str):
            raise CommandError("bad_request", "refresh needs a token")
        try:
            fresh = self._authenticator.authenticate(token, session.id)
        except AuthError as exc:
            raise CommandError("bad_token", str(exc)) from None
        if fresh.user != session.user:
            self._metrics.auth_failures.labels("other_user").inc()
            raise CommandError("forbidden", "refresh token is for another user")
        session.identity = fresh
        session.set_expiry(fresh.expires)
        # Rooms the new token does not allow are left (also one joined over
        # HTTP with another token than the stream's), but those the backend
        # joined it to (POST /api/subscribe): whatever the token says, they stay.
        granted = session.granted or ()
        for channel in list(session.channels):
            room = channel_id(channel) if is_room(channel) else None
            if room is not None and channel not in granted and not fresh.may_join(room):
                await self._subscriptions.leave(session, channel)
        return _frame("ack", channels=sorted(client_name(c) for c in session.channels))

    async def read(self, identity: Identity, session: Session | None, cmd: dict[str, Any]) -> Frame:
        """Move the user's read position (cluster-wide, forward only) to ``id``."""
        try:
            seq = parse_seq(cmd.get("id"))
        except InvalidChannel as exc:
            raise CommandError("bad_request", str(exc)) from None
        last = await self._history.position()
        if seq > last:  # it would mark everything published until then as read, unseen
            raise CommandError("bad_request", f"id {seq} is past the stream's last message ({last})")
        position = await self._reads.advance(identity.user, seq)
        self._metrics.read_marks.inc()
        return _frame("ack", id=str(position))

    async def presence(self, identity: Identity, session: Session | None, cmd: dict[str, Any]) -> Frame:
        """The users connected to a room on any node (each once)."""
        channel = _room(cmd)
        if not identity.may_join(channel_id(channel)):
            raise CommandError("forbidden", f"token does not allow room {channel_id(channel)}")
        return _frame("presence", room=channel_id(channel), users=await self._presence.members(channel))

    async def ping(self, identity: Identity, session: Session | None, cmd: dict[str, Any]) -> Frame:
        return _frame("pong")

    async def history(self, identity: Identity, session: Session | None, cmd: dict[str, Any]) -> Frame:
        """A page of a channel's stored messages: the newest ``limit`` older
        than ``before``, oldest first (each the frame a live client gets)."""
        channel = self._history_channel(identity, cmd)
        try:
            limit, before = page_request(cmd.get("limit"), cmd.get("before"), self._page_max)
        except InvalidChannel as exc:
            raise CommandError("bad_request", str(exc)) from None
        page = await self._history.page(channel, before, limit)
        return _frame("history", channel=client_name(channel), messages=history_messages(page))

    def _history_channel(self, identity: Identity, cmd: dict[str, Any]) -> Channel:
        """``room``, or ``channel``: "user" (the caller's own), "broadcast" or "room:<id>"."""
        name = cmd.get("channel")
        if name == "user":
            return user_channel(identity.user)
        if name == BROADCAST:
            return BROADCAST
        try:
            channel = room_channel(cmd.get("room")) if name is None else parse_channel(name)
        except InvalidChannel as exc:
            raise CommandError("bad_request", str(exc)) from None
        if channel == user_channel(identity.user):
            return channel
        if not is_room(channel):
            raise CommandError("forbidden", 'only your own user channel\'s history: "channel": "user"')
        if not identity.may_join(channel_id(channel)):
            raise CommandError("forbidden", f"token does not allow room {channel_id(channel)}")
        return channel


# A page limit written as text: ASCII digits, few enough for int() (str.isdigit
# takes "²", which int() refuses).
_LIMIT_TEXT = re.compile(r"[0-9]{1,9}")


def page_request(limit: Any, before: Any, page_max: int) -> tuple[int, int | None]:
    """A history page's ``limit`` (default 50) and ``before`` (an id, or
    None: the newest), checked; InvalidChannel says what is wrong."""
    if limit is None:
        limit = min(50, page_max)
    elif type(limit) is str and _LIMIT_TEXT.fullmatch(limit):  # from a query string
        limit = int(limit)
    if type(limit) is not int or not 1 <= limit <= page_max:
        raise InvalidChannel(f"limit must be an integer from 1 to {page_max} (history.page_max)")
    return limit, None if before is None else parse_seq(before)


def _frame(kind: str, **fields: Any) -> Frame:
    return {"type": kind, **fields}


def _reply(frame: Frame, ref: Ref) -> Frame:
    """``frame`` answering a command: its ``ref`` echoed."""
    if ref is not None:
        frame["ref"] = ref
    return frame


def _error(ref: Ref, code: str, message: str) -> Frame:
    return _reply(_frame("error", code=code, message=message), ref)


def _on_connection(session: Session | None, kind: str) -> Session:
    """The connection a command acts on; over HTTP it must name one."""
    if session is None:
        raise CommandError("bad_request", f'{kind} acts on one stream: give its "conn" (from its welcome)')
    return session


Handler = Callable[[Commands, Identity, Session | None, dict[str, Any]], Awaitable[Frame]]
_HANDLERS: dict[str, Handler] = {
    "subscribe": Commands.subscribe,
    "unsubscribe": Commands.unsubscribe,
    "publish": Commands.publish,
    "refresh": Commands.refresh,
    "read": Commands.read,
    "presence": Commands.presence,
    "ping": Commands.ping,
    "history": Commands.history,
}
