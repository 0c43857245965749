"""The WebSocket transport: ``GET /ws``."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import WSMsgType, web
from aiohttp.http_websocket import WebSocketError

from broker import BrokerUnavailable
from broker.channels import client_name

from .admission import Refusal, admit, count_in, screen
from .disconnect import CLIENT_CLOSED, GOING_AWAY, HEARTBEAT_TIMEOUT, INTERNAL, TOO_BIG, UNAVAILABLE, Disconnect
from .frames import WS
from .http import SocketWire, drain_or_abort, json_error
from .keys import COMMANDS, NODE
from .resume import attach

log = logging.getLogger("herald.ws")


class WsConnection(SocketWire):
    """Wire and closer of one WebSocket: raw frame writes, and a close that
    never waits on a stalled peer longer than ``close_timeout``."""

    __slots__ = ("_close_timeout", "_ws", "close_task")

    def __init__(
        self,
        ws: web.WebSocketResponse,
        request: web.Request,
        write_buffer: int,
        socket_buffer: int,
        close_timeout: float,
    ) -> None:
        super().__init__(request, write_buffer, socket_buffer)
        self._ws = ws
        self._close_timeout = close_timeout
        self.close_task: asyncio.Task[None] | None = None

    def close(self, reason: Disconnect) -> None:
        if self.close_task is None:
            self.close_task = asyncio.get_running_loop().create_task(self._close(reason))

    async def _close(self, reason: Disconnect) -> None:
        await close_ws(self._ws, self._transport, reason, self._close_timeout)


async def close_ws(ws: web.WebSocketResponse, transport: asyncio.Transport, reason: Disconnect, timeout: float) -> None:
    """Send the close frame; give the peer ``timeout`` to read it, then free the socket."""
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        async with asyncio.timeout_at(deadline):
            await ws.close(code=reason.code, message=reason.message.encode(), drain=False)
    except Exception:  # noqa: BLE001 - timeouts and broken pipes end the same way
        pass
    await drain_or_abort(transport, deadline)


def _classify(ws: web.WebSocketResponse) -> Disconnect:
    """Why the peer's side ended, as far as aiohttp can tell."""
    exc = ws.exception()
    if isinstance(exc, TimeoutError):  # no pong within the heartbeat
        return HEARTBEAT_TIMEOUT
    if isinstance(exc, WebSocketError) and exc.code == TOO_BIG.code:  # aiohttp then reports 1006
        return TOO_BIG
    close_code = ws.close_code
    if close_code == TOO_BIG.code:
        return TOO_BIG
    if close_code == 1001:
        return GOING_AWAY
    if close_code == 1006:
        return HEARTBEAT_TIMEOUT
    return CLIENT_CLOSED


async def ws_handler(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    s = node.settings.ws
    ws = web.WebSocketResponse(
        compress=s.compress,
        max_msg_size=s.max_frame + 1,  # aiohttp refuses sizes >= its limit; ws.max_frame itself is allowed
        heartbeat=s.heartbeat or None,
        autoping=False,  # client pings count against the frame budget (ping floods)
        timeout=s.close_timeout,
    )
    if not ws.can_prepare(request).ok:
        return json_error(400, "bad_request", "expected a WebSocket upgrade")
    try:
        screen(node, request)  # before the upgrade: a cross-site page learns nothing
    except Refusal as refusal:
        return json_error(refusal.status, refusal.error, refusal.message)
    try:
        await ws.prepare(request)
    except ConnectionResetError:  # the client gave up before its upgrade was answered
        return ws
    # Refusals are close codes after the upgrade: a browser cannot see an HTTP status.
    try:
        admission = admit(node, request)
        conn_id = await count_in(node, admission.identity)
    except Refusal as refusal:
        if request.transport is not None:
            await close_ws(ws, request.transport, refusal.disconnect, s.close_timeout)
        return ws
    if request.transport is None:  # the client left while it was being admitted
        node.broker.close_connection(admission.identity.user, conn_id)
        return ws

    bp = node.settings.backpressure
    conn = WsConnection(ws, request, bp.write_buffer, bp.socket_buffer, s.close_timeout)
    session = node.open_session(conn_id, admission.identity, WS, conn, conn.close)
    reason: Disconnect = CLIENT_CLOSED
    try:
        welcome = {
            "type": "welcome",
            "conn": session.id,
            "user": session.user,
            "node": node.id,
            "channels": [client_name(c) for c in admission.channels],
        }
        await attach(node, session, admission.channels, admission.since, welcome)
        # The receive loop is inlined: one coroutine frame less per idle connection.
        commands = request.app[COMMANDS]
        while session.active:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                await commands.handle(session, msg.data)
            elif msg.type is WSMsgType.BINARY:
                commands.refuse_binary(session)
            elif msg.type is WSMsgType.PING:
                if commands.within_rate(session):
                    await ws.pong(msg.data)
            elif msg.type is WSMsgType.PONG:
                continue  # answers to the heartbeat (aiohttp resets it on any data)
            else:  # close, closing, closed or error
                break
        reason = _classify(ws)
        if reason is TOO_BIG:
            node.metrics.limit_rejections.labels("frame_size").inc()
    except BrokerUnavailable as exc:
        reason = UNAVAILABLE
        log.warning("connection %s: %s", session.id, exc)
        session.close(UNAVAILABLE)
    except asyncio.CancelledError:
        # The connection dropped (handler cancellation): a missed heartbeat or the peer left.
        reason = _classify(ws)
        raise
    except Exception:
        log.exception("connection %s failed", session.id)
        reason = INTERNAL
        session.close(INTERNAL)
    finally:
        await node.finish_session(session, reason)
        if conn.close_task is not None:
            await asyncio.shield(conn.close_task)
    return ws
