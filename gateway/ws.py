"""The WebSocket transport: ``GET /ws``.

aiohttp routes the request; the handshake is answered here and the socket
handed to a WsLink (wslink.py), which owns it from then on. The handler only
admits the client and attaches its session, then lets aiohttp forget the
connection.
"""

from __future__ import annotations

import base64
import hashlib

from aiohttp import web

from broker.channels import client_name

from .admission import Gate, Refusal
from .frames import WS
from .http import json_error
from .resume import Resumer
from .sessions import Sessions
from .wslink import WsLink, WsLinks, ends_on_failure

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(request: web.BaseRequest) -> str | None:
    """``Sec-WebSocket-Accept`` for a valid upgrade request; None if it is not one."""
    headers = request.headers
    if request.method != "GET" or headers.get("Upgrade", "").strip().lower() != "websocket":
        return None
    if "upgrade" not in headers.get("Connection", "").lower() or headers.get("Sec-WebSocket-Version") != "13":
        return None
    key = headers.get("Sec-WebSocket-Key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except ValueError:
        return None
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def switching_protocols(accept: str) -> bytes:
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: %s\r\n\r\n" % accept.encode()
    )


def detach(request: web.BaseRequest) -> None:
    """Make aiohttp forget an upgraded connection whose socket a WsLink now
    owns: no write, close or timer of aiohttp's touches it afterwards. The
    handler must return right after (aiohttp may cancel its task)."""
    handler = request.protocol
    handler.transport = None
    handler.connection_lost(None)


class WsEndpoint:
    """``GET /ws``: upgrades, admits and attaches; the link does the rest."""

    def __init__(self, node_id: str, gate: Gate, sessions: Sessions, resumer: Resumer, links: WsLinks) -> None:
        self._node_id = node_id
        self._gate = gate
        self._sessions = sessions
        self._resumer = resumer
        self.links = links

    async def handle(self, request: web.Request) -> web.StreamResponse:
        accept = accept_key(request)
        if accept is None:
            return json_error(400, "bad_request", "expected a WebSocket upgrade")
        try:
            self._gate.screen(request)  # before the upgrade: a cross-site page learns nothing
        except Refusal as refusal:
            return json_error(refusal.status, refusal.error, refusal.message)
        transport = request.transport
        if transport is None or transport.is_closing():  # the client already left
            return web.Response(status=499)
        transport.write(switching_protocols(accept))
        link = WsLink(transport, self.links)
        try:
            await self._open(request, link)
        finally:
            link.start()
            detach(request)  # last: aiohttp may cancel this task from here on
        return web.Response(status=101)  # never sent: aiohttp no longer has the socket

    async def _open(self, request: web.Request, link: WsLink) -> None:
        """Admit the client and attach its session. Refusals are close codes after
        the upgrade: a browser cannot see an HTTP status."""
        gate = self._gate
        try:
            admission = gate.admit(request)
            conn_id = await gate.count_in(admission.identity)
        except Refusal as refusal:
            link.close(refusal.disconnect)
            return
        if link.gone:  # the client left while it was being admitted
            gate.count_out(admission.identity.user, conn_id)
            return
        session = link.session = self._sessions.open(conn_id, admission.identity, WS, link, link.close)
        welcome = {
            "type": "welcome",
            "conn": session.id,
            "user": session.user,
            "node": self._node_id,
            "channels": [client_name(c) for c in admission.channels],
        }
        with ends_on_failure(session):
            await self._resumer.attach(session, admission.channels, admission.since, welcome)
