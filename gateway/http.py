"""Small HTTP helpers shared by the handlers."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hmac
import ipaddress
import logging
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from broker.throttle import Throttle

from .head import Head

_log = logging.getLogger("herald.http")

# On every answer, whichever path writes it (aiohttp's, the front door's).
ALWAYS_HEADERS = (("X-Content-Type-Options", "nosniff"),)

# RFC 9110 7.2: uri-host [":" port] — an IP literal, or a reg-name of RFC
# 3986's characters (empty included) but "," (two Host lines joined). Anything
# else is answered 400.
HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+;=%]*)(?::[0-9]*)?")

_date = (0, "")


def cors_pairs(origin: str | None) -> tuple[tuple[str, str], ...]:
    """The headers that let a page of ``origin`` (one limits.origins allows)
    read an answer; none for None."""
    if origin is None:
        return ()
    return (("Access-Control-Allow-Origin", origin), ("Access-Control-Allow-Credentials", "true"), ("Vary", "Origin"))


def http_date() -> str:
    """The ``Date`` of an answer written now (RFC 9110 6.6.1), made once a second."""
    global _date
    now = int(time.time())
    if now != _date[0]:
        _date = (now, email.utils.formatdate(now, usegmt=True))
    return _date[1]


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer that either aiohttp or the front door writes (see front.py)."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "application/json"

    def response(self, close: bool = False) -> web.Response:
        """As aiohttp's response (``close``: the connection closes after it)."""
        response = web.Response(
            body=self.body, status=self.status, content_type=self.content_type, headers=dict(self.headers)
        )
        if close:
            response.force_close()
        return response


def json_reply(body: Any, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status, orjson.dumps(body), headers)


def error_reply(status: int, error: str, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return json_reply({"error": error, "message": message}, status, headers)


def late_body(seconds: float) -> str:
    """Why a request whose body was not all in within ``seconds`` is refused (408 ``timeout``)."""
    return f"the body did not arrive within {seconds:g}s"


def body_timeout(seconds: float) -> Reply:
    """The answer to a request whose body was not all in within ``seconds``
    (``http.handshake_timeout``); its connection closes after it."""
    return error_reply(408, "timeout", late_body(seconds))


async def read_body(request: web.Request, seconds: float) -> bytes:
    """``request``'s body, all of it within ``seconds`` (else TimeoutError):
    aiohttp waits for a body as long as its client takes, and one that never
    ends it would hold the connection and the handler for good."""
    async with asyncio.timeout(seconds):
        return await request.read()


def json_response(body: Any, status: int = 200) -> web.Response:
    return json_reply(body, status).response()


def json_error(status: int, error: str, message: str) -> web.Response:
    return error_reply(status, error, message).response()


def _bearer_value(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


class ConflictingTokens(ValueError):
    """Two different tokens in one request (query, header, cookie)."""

    pass


def _cookie_values(request: Head, name: str) -> list[str]:
    # request.cookies keeps one value per name; a repeated cookie must be seen whole.
    values = []
    for header in request.headers.getall("Cookie", []):
        for part in header.split(";"):
            key, sep, value = part.strip().partition("=")
            if sep and key == name and value:
                values.append(value.strip('"'))
    return values


def client_token(request: Head) -> str | None:
    """The token from ``?token=``, ``Authorization: Bearer`` or the cookie
    ``herald_token``. Two different tokens in one request — in different places
    or repeated in one — are refused rather than one picked by position."""
    found = set(request.query.getall("token", []))
    found.update(v for h in request.headers.getall("Authorization", []) if (v := _bearer_value(h)))
    found.update(_cookie_values(request, "herald_token"))
    found.discard("")
    if len(found) > 1:
        raise ConflictingTokens("conflicting tokens in query, header and cookie")
    return found.pop() if found else None


class AdminKeys:
    """The admin key's check, one for each API behind it (the node API, the
    server API): a request without one of ``keys`` is answered 401, and a
    line naming its sender is logged, throttled (never the key)."""

    def __init__(self, keys: tuple[str, ...], proxies: TrustedProxies) -> None:
        self._keys = keys
        self._proxies = proxies
        self._warn = Throttle(_log)

    def refusal(self, request: web.Request) -> web.Response | None:
        if header_key(request.headers.get("Authorization", ""), self._keys) is not None:
            return None
        who = peer(request, self._proxies)
        self._warn(
            "unauthorized", "refused %s %s from %s: missing or wrong admin key", request.method, request.path, who
        )
        return json_error(401, "unauthorized", "missing or wrong admin key (Authorization: Bearer <key>)")


def header_key(authorization: str, keys: tuple[str, ...]) -> str | None:
    """Which of ``keys`` (a key and, during a rotation, the one it replaces)
    an ``Authorization`` header carries as its bearer key, if any."""
    given = _bearer_value(authorization)
    if given is None:
        return None
    # Header bytes that are not UTF-8 reach us as surrogates: compare the bytes sent.
    sent = given.encode("utf-8", "surrogateescape")
    return next((key for key in keys if key and hmac.compare_digest(sent, key.encode())), None)


IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str) -> IpAddress | None:
    """An IP address (an IPv4-mapped IPv6 one as IPv4), or None if ``text`` is none."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedProxies:
    """``http.trusted_proxies``: whose ``X-Forwarded-For`` (and ``-Proto``) is believed. The
    client is the right-most forwarded address that is not itself a trusted
    proxy: what a client puts in the header itself is to the left of what its
    proxies append, so it can pretend to be anything but not skip them."""

    __slots__ = ("_networks",)

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        self._networks = tuple(ipaddress.ip_network(c) for c in cidrs)

    def trusts(self, address: IpAddress) -> bool:
        return any(address in network for network in self._networks)

    def client(self, request: Head) -> str:
        """The client's address: the direct peer's, or, when the direct peer is
        a trusted proxy, the one its ``X-Forwarded-For`` chain names."""
        direct = request.remote or "?"
        if not self._networks:
            return direct
        hop = _address(direct)
        if hop is None or not self.trusts(hop):
            return direct
        chain = [part for header in request.headers.getall("X-Forwarded-For", []) for part in header.split(",")]
        for entry in reversed(chain):
            address = _address(entry)
            if address is None:  # garbage: nothing to its left can be believed; the last proxy is all we know
                break
            hop = address
            if not self.trusts(address):
                break
        return str(hop)

    def scheme(self, request: Head) -> str | None:
        """``http`` or ``https``: the scheme the client used, as the trusted proxy
        that is the direct peer says in ``X-Forwarded-Proto`` (its left-most
        value: the first proxy's, the one the client spoke to). None when no
        trusted proxy says it (the node speaks no TLS itself, but a proxy it
        does not know of may)."""
        if not self._networks:
            return None
        proto = request.headers.get("X-Forwarded-Proto")
        hop = _address(request.remote or "?")
        if proto is None or hop is None or not self.trusts(hop):
            return None
        first = proto.partition(",")[0].strip().lower()
        return first if first in ("http", "https") else None


def peer(request: Head, proxies: TrustedProxies | None = None) -> str:
    """Who sent ``request``, for logs and the connect hook (behind ``proxies``: the forwarded client)."""
    return proxies.client(request) if proxies is not None else request.remote or "?"


def hard_abort(transport: asyncio.Transport) -> None:
    """Abort with a reset: the kernel drops what it still holds for the peer
    at once, instead of keeping it (and the socket) in FIN-WAIT."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def drain_or_abort(transport: asyncio.Transport, deadline: float) -> None:
    """Give a slow peer until ``deadline`` (loop time) to read what is buffered
    (which ends with the close frame or the last chunk), then free the socket."""
    loop = asyncio.get_running_loop()
    while transport.get_write_buffer_size() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    free_socket(transport)


def free_socket(transport: asyncio.Transport) -> None:
    """Done waiting for the peer: reset if it left bytes unread, else close now."""
    if transport.get_write_buffer_size():
        hard_abort(transport)
    elif not transport.is_closing():
        transport.abort()


# Linux only; elsewhere a half-open stream waits for the kernel's own retransmission limit.
_TCP_USER_TIMEOUT: int | None = getattr(socket, "TCP_USER_TIMEOUT", None)


class SocketWire:
    """Raw access to a socket for prebuilt frames (see outbound.Wire); the
    transport pauses above ``write_buffer``. Subclasses say how to wait for it
    to resume (``drained``)."""

    __slots__ = ("_transport", "buffered", "send")

    def __init__(
        self, transport: asyncio.Transport, write_buffer: int, socket_buffer: int = 0, user_timeout: float = 0.0
    ) -> None:
        transport.set_write_buffer_limits(high=write_buffer)
        sock = transport.get_extra_info("socket")
        if sock is not None and socket_buffer:
            # Bound what the kernel holds for a peer that stopped reading, so
            # backpressure (and its memory bound) starts within our limits.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, socket_buffer)
        if sock is not None and user_timeout and _TCP_USER_TIMEOUT is not None:
            # A peer whose network went without a FIN or RST acknowledges
            # nothing: our keep-alives and pings then end the connection after
            # ``user_timeout``, not after ~15 minutes of retransmissions.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, round(user_timeout * 1000))
        self._transport = transport
        self.send: Callable[[bytes], object] = transport.write
        self.buffered: Callable[[], int] = transport.get_write_buffer_size

    def write(self, data: bytes) -> None:
        if not self._transport.is_closing():
            self._transport.write(data)


@web.middleware
async def valid_host(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """An invalid ``Host`` value is a bad request (RFC 9112 3.2), on either path (front.py)."""
    if HOST.fullmatch(request.headers.get("Host", "")) is None:
        return json_error(400, "bad_request", "invalid Host header")
    return await handler(request)
