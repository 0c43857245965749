"""Small HTTP helpers shared by the handlers."""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from aiohttp import web


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def json_error(status: int, error: str, message: str) -> web.Response:
    return json_response({"error": error, "message": message}, status)


def bearer(request: web.BaseRequest) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


class ConflictingTokens(ValueError):
    pass


def client_token(request: web.BaseRequest) -> str | None:
    """The token from ``?token=``, ``Authorization: Bearer`` or the cookie
    ``herald_token``. Two different tokens in one request are refused."""
    found = {t for t in (request.query.get("token"), bearer(request), request.cookies.get("herald_token")) if t}
    if len(found) > 1:
        raise ConflictingTokens("conflicting tokens in query, header and cookie")
    return found.pop() if found else None


def key_matches(request: web.BaseRequest, expected: str) -> bool:
    given = bearer(request)
    return bool(expected) and given is not None and hmac.compare_digest(given.encode(), expected.encode())


def peer(request: web.BaseRequest) -> str:
    return request.remote or "?"
