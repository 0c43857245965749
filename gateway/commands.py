"""Client → server commands on a WebSocket. Each answers with ``ack`` or
``error``, echoing the command's ``ref``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from broker import BrokerUnavailable, Channel, Presence, PubSub, ReadPositions
from broker.channels import InvalidChannel, channel_id, check_event, glob_match, is_room, parse_seq, room_channel
from broker.throttle import Throttle

from .auth import Authenticator, AuthError
from .disconnect import RATE_LIMITED
from .frames import dumps_exact, loads_exact
from .limits import CommandLimiter
from .metrics import Metrics
from .resume import Resumer
from .session import Session
from .settings import LimitsSettings
from .subscriptions import Subscriptions

Ref = str | int | None


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
        self._reads = reads
        self._presence = presence
        self._authenticator = authenticator
        self._metrics = metrics
        self._warn = warn

    def reply(self, session: Session, ref: Ref, kind: str, **fields: Any) -> None:
        """Send a ``kind`` frame answering a command, echoing its ``ref``."""
        frame: dict[str, Any] = {"type": kind, **fields}
        if ref is not None:
            frame["ref"] = ref
        session.send(frame)

    def error(self, session: Session, ref: Ref, code: str, message: str, **extra: Any) -> None:
        self.reply(session, ref, "error", code=code, message=message, **extra)

    def ack(self, session: Session, ref: Ref, **fields: Any) -> None:
        self.reply(session, ref, "ack", **fields)

    async def handle(self, session: Session, text: str) -> None:
        cmd: Any
        try:
            cmd, parsed = loads_exact(text), True
        except orjson.JSONDecodeError:
            cmd, parsed = None, False
        kind = cmd.get("type") if isinstance(cmd, dict) else None
        ref = cmd.get("ref") if isinstance(cmd, dict) else None
        good_ref = ref is None or (isinstance(ref, str) and len(ref) <= 64) or (type(ref) is int and abs(ref) < 2**53)
        # Every frame counts against the budget, garbage included.
        if not self._within_rate(session, kind if isinstance(kind, str) else "", ref if good_ref else None):
            return
        if not parsed:
            self.error(session, None, "bad_frame", "frame is not valid JSON")
            return
        if not isinstance(cmd, dict):
            self.error(session, None, "bad_frame", "frame must be a JSON object")
            return
        if not good_ref:
            self.error(session, None, "bad_request", "ref must be a string (<= 64 chars) or an integer")
            return
        handler = _HANDLERS.get(kind) if isinstance(kind, str) else None
        if handler is None:
            self.error(session, ref, "unknown_command", "unknown command type")
            return
        try:
            await handler(self, session, cmd, ref)
        except CommandError as exc:
            self.error(session, ref, exc.code, str(exc))
        except BrokerUnavailable as exc:
            self.error(session, ref, "unavailable", str(exc))

    def refuse_binary(self, session: Session) -> None:
        if self.within_rate(session):
            self.error(session, None, "bad_frame", "binary frames are not supported: send JSON text")

    def within_rate(self, session: Session) -> bool:
        """A frame that is no command (a ping) takes its share of the budget too."""
        return self._within_rate(session, "", None)

    def _within_rate(self, session: Session, kind: str, ref: Ref) -> bool:
        limits = self._limits
        limiter = session.limiter
        if limiter is None:
            limiter = session.limiter = CommandLimiter(limits.publish_rate, limits.command_rate, limits.rate_window)
        wait = limiter.check(kind)
        if not wait:
            return True
        name = "publish_rate" if kind == "publish" else "command_rate"
        self._metrics.limit_rejections.labels(name).inc()
        if limiter.strikes >= limits.abuse_strikes:
            self._warn(
                "abuse", "closing %s (user %s): %d commands refused in a row", session.id, session.user, limiter.strikes
            )
            session.close(RATE_LIMITED)
            return False
        what = "publishes" if kind == "publish" else "commands"
        self.error(session, ref, "rate_limited", f"too many {what}: retry later", retry_after=round(wait, 3))
        return False

    async def subscribe(self, session: Session, cmd: dict[str, Any], ref: Ref) -> None:
        channel = _room(cmd)
        if not session.identity.may_join(channel_id(channel)):
            raise CommandError("forbidden", f"token does not allow room {channel_id(channel)}")
        since = cmd.get("since")
        try:
            position = None if since is None else parse_seq(since)
        except InvalidChannel as exc:
            raise CommandError("bad_request", str(exc)) from None
        if channel not in session.channels:
            # The user channel and broadcast are always there and do not count.
            limit = self._limits.max_subscriptions
            if len(session.channels) - 2 >= limit:
                self._metrics.limit_rejections.labels("subscriptions").inc()
                raise CommandError("too_many_subscriptions", f"at most {limit} rooms per connection")
        if position is not None:
            await self._resumer.resume(session, (channel,), position)  # joins, then replays
        else:
            await self._subscriptions.join(session, channel)
        self.ack(session, ref, channel=channel)

    async def unsubscribe(self, session: Session, cmd: dict[str, Any], ref: Ref) -> None:
        channel = _room(cmd)
        await self._subscriptions.leave(session, channel)
        self.ack(session, ref, channel=channel)

    async def publish(self, session: Session, cmd: dict[str, Any], ref: Ref) -> None:
        channel = _room(cmd)
        room = channel_id(channel)
        if not session.identity.may_publish(room):
            raise CommandError("forbidden", f"token does not allow publishing to room {room}")
        if not glob_match(self._client_publish, room):
            raise CommandError("forbidden", f"clients may not publish to room {room} (rooms.client_publish)")
        if "data" not in cmd:
            raise CommandError("bad_request", "publish needs data")
        event = cmd.get("event")
        if event is not None:
            try:
                check_event(event)
            except InvalidChannel as exc:
                raise CommandError("bad_request", str(exc)) from None
        payload = dumps_exact(cmd["data"])
        if cmd.get("ephemeral") is True:
            await self._pubsub.publish_ephemeral(channel, payload, event)
            self.ack(session, ref, channel=channel)
        else:
            seq = await self._pubsub.publish(channel, payload, event)
            self.ack(session, ref, channel=channel, id=str(seq))

    async def refresh(self, session: Session, cmd: dict[str, Any], ref: Ref) -> None:
        token = cmd.get("token")
        if not isinstance(token, str):
            raise CommandError("bad_request", "refresh needs a token")
        try:
            identity = self._authenticator.authenticate(token, session.id)
        except AuthError as exc:
            raise CommandError("bad_token", str(exc)) from None
        if identity.user != session.user:
            self._metrics.auth_failures.labels("other_user").inc()
            raise CommandError("forbidden", "refresh token is for another user")
        session.identity = identity
        session.set_expiry(identity.expires)
        # Rooms the new token no longer allows are left.
        for channel in list(session.channels):
            if is_room(channel) and not identity.may_join(channel_id(channel)):
                await self._subscriptions.leave(session, channel)
        self.ack(session, ref, channels=sorted(session.channels))

    async def read(self, session: Session, cmd: dict[str, Any], ref: Ref) -> None:
        """Move the user's read position (cluster-wide, forward only) to ``id``."""
        try:
            seq = parse_seq(cmd.get("id"))
        except InvalidChannel as exc:
            raise CommandError("bad_request", str(exc)) from None
        position = await self._reads.advance(session.user, seq)
        self._metrics.read_marks.inc()
        self.ack(session, ref, id=str(position))

    async def presence(self, session: Session, cmd: dict[str, Any], ref: Ref) -> None:
        """The users connected to a room on any node (each once)."""
        channel = _room(cmd)
        if not session.identity.may_join(channel_id(channel)):
            raise CommandError("forbidden", f"token does not allow room {channel_id(channel)}")
        self.reply(session, ref, "presence", room=channel_id(channel), users=await self._presence.members(channel))

    async def ping(self, session: Session, cmd: dict[str, Any], ref: Ref) -> None:
        self.reply(session, ref, "pong")


Handler = Callable[[Commands, Session, dict[str, Any], Ref], Awaitable[None]]
_HANDLERS: dict[str, Handler] = {
    "subscribe": Commands.subscribe,
    "unsubscribe": Commands.unsubscribe,
    "publish": Commands.publish,
    "refresh": Commands.refresh,
    "read": Commands.read,
    "presence": Commands.presence,
    "ping": Commands.ping,
}
