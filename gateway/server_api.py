"""The server API for backends (admin key): close a user's connections, and
join or leave them to a room — on every node of the cluster.

The node that takes the POST asks every live node (``Relay.ask_all``); each
acts on its own connections of the user (``UserActions``) and says how many
it touched, and the sum is the answer — once every live node answered, or
after ``TIMEOUT`` with the answers that came (``"complete": false``).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from broker import BrokerUnavailable, Relay
from broker.channels import InvalidChannel, channel_id, check_id, room_channel

from .command_route import CommandRouter
from .disconnect import DISCONNECTED, DISCONNECTED_FOR_GOOD
from .frames import loads_exact
from .http import AdminKeys, TrustedProxies, body_timeout, error_reply, json_error, json_response, read_body
from .limits import TokenBucket
from .metrics import Metrics
from .session import Session
from .sessions import Sessions
from .subscriptions import Subscriptions

# Seconds the asking node waits for every live node's answer.
TIMEOUT = 1.0
# Of which a node waits at most this long for its connections of a user to be
# counted out before it closes them.
COUNT_OUT_WAIT = 0.5
# Gate.count_out_first: count sessions out, waiting at most so many seconds.
CountOut = Callable[[list[Session], float], Awaitable[None]]


class UserActions:
    """What a node does to its own connections of one user."""

    def __init__(
        self,
        sessions: Sessions,
        subscriptions: Subscriptions,
        count_out: CountOut | None = None,
        forget_user: Callable[[str], None] | None = None,
    ) -> None:
        self._sessions = sessions
        self._subscriptions = subscriptions
        self._count_out = count_out  # Gate.count_out_first
        self._forget_user = forget_user  # the connect hook's kept answers for the user

    async def act(self, request: dict[str, Any]) -> int:
        """Carry out one action; the number of connections it touched."""
        user, action = request["user"], request["op"]
        sessions = self._sessions.of_user(user)
        if action == "disconnect":
            if self._forget_user is not None:  # every node, whether it holds a connection of the user or not
                self._forget_user(user)
            reconnect = request.get("reconnect", True)
            if reconnect and sessions and self._count_out is not None:
                # Before the 4009: a user back at once on another node is not refused for these.
                await self._count_out(sessions, COUNT_OUT_WAIT)
            reason = DISCONNECTED if reconnect else DISCONNECTED_FOR_GOOD
            for session in sessions:
                session.close(reason)
            return len(sessions)
        channel = room_channel(request["room"])
        touched = 0
        for session in sessions:
            joining = action == "subscribe"
            if joining:
                session.granted = (session.granted or set()) | {channel}  # a refresh keeps it
            elif session.granted is not None:
                session.granted.discard(channel)
            if (channel in session.channels) == joining:
                continue  # already so: no frame for what did not change
            if joining:
                await self._subscriptions.join(session, channel)
            else:
                await self._subscriptions.leave(session, channel)
            if session.active:
                session.send({"type": "subscribed" if joining else "unsubscribed", "room": channel_id(channel)})
                touched += 1
        return touched


class NodeRequests:
    """What other nodes ask this one (``BrokerEvents.request``): to run a
    command for one of its streams, or an action on a user's connections."""

    def __init__(self, router: CommandRouter, actions: UserActions) -> None:
        self._router = router
        self._actions = actions

    async def answer(self, body: bytes) -> bytes:
        request = loads_exact(body)  # a forwarded command's numbers stay as the client wrote them
        if request.get("op") == "command":
            return await self._router.answer(request)
        return orjson.dumps({"touched": await self._actions.act(request)})


class ServerApi:
    """``POST /api/disconnect``, ``/api/subscribe``, ``/api/unsubscribe``
    (admin key), rate-limited like the publish API."""

    def __init__(
        self,
        admin_keys: tuple[str, ...],
        rate: float,
        relay: Relay,
        body_timeout: float,
        metrics: Metrics,
        proxies: TrustedProxies,
    ) -> None:
        self._admin = AdminKeys(admin_keys, proxies)
        self._body_timeout = body_timeout  # http.handshake_timeout
        burst = max(1.0, rate)
        self._bucket = TokenBucket(burst, burst / rate)  # limits.api_rate
        self._relay = relay
        self._rate_rejections = metrics.limit_rejections.labels("api_rate")

    async def disconnect(self, request: web.Request) -> web.Response:
        return await self._act(request, "disconnect", "disconnected")

    async def subscribe(self, request: web.Request) -> web.Response:
        return await self._act(request, "subscribe", "subscribed")

    async def unsubscribe(self, request: web.Request) -> web.Response:
        return await self._act(request, "unsubscribe", "unsubscribed")

    async def _act(self, request: web.Request, op: str, counted: str) -> web.Response:
        refused = self._admin.refusal(request)
        if refused is not None:
            return refused
        wait = self._bucket.take()
        if wait:
            self._rate_rejections.inc()
            retry = (("Retry-After", str(max(1, math.ceil(wait)))),)
            return error_reply(429, "rate_limited", "too many server API requests: retry later", retry).response()
        try:
            action = _action(op, await read_body(request, self._body_timeout))
        except TimeoutError:
            return body_timeout(self._body_timeout).response(close=True)
        except (ValueError, InvalidChannel) as exc:
            return json_error(400, "bad_request", str(exc))
        except (web.HTTPRequestEntityTooLarge, RequestPayloadError):
            return json_error(413, "too_large", "body too large")
        try:
            answers, complete = await self._relay.ask_all(orjson.dumps(action), TIMEOUT)
        except BrokerUnavailable as exc:
            return json_error(503, "unavailable", str(exc))
        total = sum(int(orjson.loads(a).get("touched", 0)) for a in answers)
        return json_response({counted: total, "nodes": len(answers), "complete": complete})


def _action(op: str, body: bytes) -> dict[str, Any]:
    """The action a body asks for, checked (ValueError says what is wrong)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValueError("body is not valid JSON") from None
    fields = {"user", "reconnect"} if op == "disconnect" else {"user", "room"}
    if not isinstance(doc, dict) or not doc.keys() <= fields or "user" not in doc:
        raise ValueError(f"body must be {{{', '.join(sorted(fields))}}} with user")
    action: dict[str, Any] = {"op": op, "user": check_id("user", doc["user"])}
    if op == "disconnect":
        reconnect = doc.get("reconnect", True)
        if type(reconnect) is not bool:
            raise ValueError("reconnect must be true or false")
        action["reconnect"] = reconnect
    else:
        action["room"] = channel_id(room_channel(doc.get("room")))
    return action
