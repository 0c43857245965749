"""The WebSocket transport: ``GET /ws``.

aiohttp routes the request; the handshake is answered here and the socket
handed to a WsLink (wslink.py), which owns it from then on. The handler only
admits the client and attaches its session, then lets aiohttp forget the
connection.
"""

from __future__ import annotations

from aiohttp import web

from broker.channels import client_name

from .admission import Refusal, admit, count_in, screen
from .frames import WS
from .http import json_error
from .keys import NODE, WS_LINKS
from .resume import attach
from .wslink import WsLink, accept_key, ends_on_failure, release, switching_protocols


async def ws_handler(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    accept = accept_key(request)
    if accept is None:
        return json_error(400, "bad_request", "expected a WebSocket upgrade")
    try:
        screen(node, request)  # before the upgrade: a cross-site page learns nothing
    except Refusal as refusal:
        return json_error(refusal.status, refusal.error, refusal.message)
    transport = request.transport
    if transport is None or transport.is_closing():  # the client already left
        return web.Response(status=499)
    transport.write(switching_protocols(accept))
    link = WsLink(transport, request.app[WS_LINKS])
    try:
        await _open(request, link)
    finally:
        link.start()
        release(request)  # last: aiohttp may cancel this task from here on
    return web.Response(status=101)  # never sent: aiohttp no longer has the socket


async def _open(request: web.Request, link: WsLink) -> None:
    """Admit the client and attach its session. Refusals are close codes after
    the upgrade: a browser cannot see an HTTP status."""
    node = request.app[NODE]
    try:
        admission = admit(node, request)
        conn_id = await count_in(node, admission.identity)
    except Refusal as refusal:
        link.close(refusal.disconnect)
        return
    if link.gone:  # the client left while it was being admitted
        node.broker.close_connection(admission.identity.user, conn_id)
        return
    session = link.session = node.open_session(conn_id, admission.identity, WS, link, link.close)
    welcome = {
        "type": "welcome",
        "conn": session.id,
        "user": session.user,
        "node": node.id,
        "channels": [client_name(c) for c in admission.channels],
    }
    with ends_on_failure(session):
        await attach(node, session, admission.channels, admission.since, welcome)
