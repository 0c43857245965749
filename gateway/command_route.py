"""Commands sent over HTTP (``POST /api/command``), run where they belong.

A command that names a connection (``conn``, from its welcome) runs on the
node holding it: behind a load balancer the POST rarely lands there, so it is
forwarded over the broker (``Relay``) with the caller's credentials (its
token, or what the connect hook is asked), and that node answers as if it had
been posted to it. Commands that name no connection run here, against a
per-user budget.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson

from broker import BrokerUnavailable, NodeGone, Relay

from .admission import Refusal
from .auth import Identity
from .commands import Commands, Frame, valid_ref
from .connect_hook import Credentials
from .frames import dumps_exact
from .limits import CommandLimiter, TokenBucket, retry_after
from .metrics import Metrics
from .sessions import Sessions

# The HTTP status of an answer, by error code (200 when it is no error).
STATUS = {
    "bad_frame": 400,
    "bad_request": 400,
    "unknown_command": 400,
    "too_many_subscriptions": 400,
    "bad_token": 401,
    "forbidden": 403,
    "forbidden_origin": 403,
    "not_found": 404,
    "timeout": 408,
    "too_large": 413,
    "rate_limited": 429,
    "unavailable": 503,
}
# Per-user budgets kept for commands without a connection; the oldest go first.
MAX_USER_BUDGETS = 10_000
T = TypeVar("T")


# Who credentials say a client is (Gate.identify); raises Refusal.
Identify = Callable[[Credentials], Awaitable[Identity]]


def error(code: str, message: str, ref: Any = None) -> Frame:
    frame: Frame = {"type": "error", "code": code, "message": message}
    if ref is not None:
        frame["ref"] = ref
    return frame


def _kept(kept: dict[str, T], user: str, make: Callable[[], T]) -> T:
    """``kept[user]``, made if missing; past MAX_USER_BUDGETS the oldest goes."""
    value = kept.get(user)
    if value is None:
        if len(kept) >= MAX_USER_BUDGETS:
            del kept[next(iter(kept))]
        value = kept[user] = make()
    return value


def _ref_of(cmd: Any) -> Any:
    """The command's ``ref``, echoed in its answer (an invalid one is not)."""
    ref = cmd.get("ref") if isinstance(cmd, dict) else None
    return ref if valid_ref(ref) else None


def _head_of(answer: bytes) -> Frame:
    """What the HTTP answer needs of a forwarded answer (its type, code, retry_after)."""
    try:
        frame = orjson.loads(answer)
    except orjson.JSONDecodeError:  # deeper than orjson reads: no error frame is
        return {}
    return frame if isinstance(frame, dict) else {}


def status_of(frame: Frame) -> int:
    return STATUS.get(frame["code"], 400) if frame.get("type") == "error" else 200


class CommandRouter:
    """Owns where an HTTP command runs and the per-user budgets of those
    that name no connection."""

    def __init__(
        self,
        node_id: str,
        identify: Identify,
        sessions: Sessions,
        commands: Commands,
        relay: Relay,
        timeout: float,
        metrics: Metrics,
    ) -> None:
        self._node_id = node_id
        self._identify = identify
        self._sessions = sessions
        self._commands = commands
        self._relay = relay
        self._timeout = timeout  # http.command_timeout
        self._budgets: dict[str, CommandLimiter] = {}
        self._misses: dict[str, TokenBucket] = {}  # per user: commands that named no open connection
        # A misses budget is limits.command_rate's size: its refusals count under that limit.
        self._misses_refused = metrics.limit_rejections.labels("command_rate")

    async def run(self, credentials: Credentials, cmd: Any, raw: bytes = b"") -> tuple[Frame, bytes | None]:
        """The answer to ``cmd`` (``raw``, decoded) posted with ``credentials``;
        and when another node gave it, that answer's bytes, to be sent as they
        came (decoded and encoded again, numbers and depths would not survive)."""
        conn = cmd.get("conn") if isinstance(cmd, dict) else None
        ref = _ref_of(cmd)
        if conn is not None and (not isinstance(conn, str) or not 0 < len(conn) <= 256):
            return error("bad_request", "conn must be the connection id from its welcome", ref), None
        try:
            # Checked here even when forwarded: a bad token costs no other node anything.
            identity = await self._identify(credentials)
        except Refusal as refusal:
            return error(refusal.error, refusal.message, ref), None
        node = None if conn is None else conn.rpartition(":")[0]
        if node is None or node == self._node_id:
            return await self._run_here(identity, cmd, conn), None
        # A forwarded command naming no open connection takes from no
        # connection's budget: each user has one for such misses, and once it
        # is spent nothing more is forwarded for a while.
        misses = self._misses_of(identity.user)
        wait = misses.wait()
        if wait:
            self._misses_refused.inc()
            frame = error("rate_limited", "too many commands for connections that are not open: retry later", ref)
            frame["retry_after"] = retry_after(wait)
            return frame, None
        frame, answer = await self._forward(node, credentials, cmd, raw)
        if frame.get("code") == "not_found":
            misses.take()
        return frame, answer

    async def _run_here(self, identity: Identity, cmd: Any, conn: str | None) -> Frame:
        if conn is None:
            frame = await self._commands.run(identity, None, self._budget(identity.user), cmd)
            assert frame is not None  # only a session is closed for abuse
            return frame
        ref = _ref_of(cmd)
        session = self._sessions.get(conn)
        if session is None or not session.active:
            return error("not_found", f"no open connection {conn}", ref)
        if session.user != identity.user:
            return error("forbidden", "the connection is another user's", ref)
        frame = await self._commands.run(identity, session, self._commands.limiter(session), cmd)
        if frame is None:
            return error("rate_limited", "the connection was closed: too many commands refused in a row", ref)
        return frame

    def _budget(self, user: str) -> CommandLimiter:
        return _kept(self._budgets, user, self._commands.new_limiter)

    def _misses_of(self, user: str) -> TokenBucket:
        return _kept(self._misses, user, lambda: self._commands.new_limiter().commands)

    async def _forward(self, node: str, credentials: Credentials, cmd: Any, raw: bytes) -> tuple[Frame, bytes | None]:
        # The command as the client wrote it: encoding it again could fail where reading it did not.
        command = raw or dumps_exact(cmd)
        body = orjson.dumps({"op": "command", **credentials.wire(), "command": orjson.Fragment(command)})
        ref = _ref_of(cmd)
        try:
            answer = await self._relay.ask(node, body, self._timeout)
        except NodeGone:
            return error("not_found", f"no open connection {cmd['conn']}: its node is gone", ref), None
        except BrokerUnavailable as exc:
            return error("unavailable", str(exc), ref), None
        return _head_of(answer), answer

    async def answer(self, request: dict[str, Any]) -> bytes:
        """A command another node forwarded here (decoded by ``NodeRequests``)."""
        cmd = request["command"]
        conn = cmd.get("conn") if isinstance(cmd, dict) else None
        if not isinstance(conn, str) or conn.rpartition(":")[0] != self._node_id:
            return orjson.dumps(error("not_found", "the connection is not on this node"))
        try:
            # The conn as the client wrote it, quoted: its CR / LF must not start log lines of their own.
            identity = await self._identify(Credentials.from_wire(request, f"a node relaying for {conn!a}"))
        except Refusal as refusal:
            return dumps_exact(error(refusal.error, refusal.message))
        except ValueError as exc:
            return dumps_exact(error("bad_request", str(exc)))
        answer = dumps_exact(await self._run_here(identity, cmd, conn))
        limit = self._relay.max_answer
        if len(answer) > limit:
            message = (
                f"the answer ({len(answer)} bytes) is more than nodes can pass each other"
                f" (NATS max_payload: {limit} bytes): ask for less (a smaller history limit),"
                " or ask the node that holds the connection"
            )
            return orjson.dumps(error("too_large", message, _ref_of(cmd)))
        return answer
