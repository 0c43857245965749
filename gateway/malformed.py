"""Requests no parser reads (a line too long, too many headers, a bare LF,
no ``Host``): refused in JSON like every other refusal of the node, and
logged as one throttled line without the token a stream's request line
carries.

aiohttp answers what its parser refuses itself, in plain text quoting the
start of the offending line (``?token=…`` and all), and logs it at ERROR
with a traceback; the front door answers a request line too long itself.
"""

from __future__ import annotations

import logging
import re

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from broker.throttle import Throttle

from .http import ALWAYS_HEADERS, Reply, error_reply

log = logging.getLogger("herald")

MAX_LINE = 8190  # aiohttp's limit for a request line and for a header line
MAX_HEADERS = 128  # aiohttp's limit: it refuses more
_TOKEN_IN_QUERY = re.compile(r"([?&]token=)[^&\s'\"]*")
_warn = Throttle(log, interval=60.0)


def log_refused(status: int, excerpt: str) -> None:
    """One warning a minute at most: anyone can send malformed requests."""
    # A refused request line is quoted: a stream's carries its token (?token=).
    _warn("malformed", "refused malformed requests (HTTP %d), e.g.: %s", status, _TOKEN_IN_QUERY.sub(r"\1…", excerpt))


def line_too_long() -> Reply:
    """RFC 9112 3: a request line longer than the server parses is 414."""
    return error_reply(414, "bad_request", f"request line over {MAX_LINE} bytes")


def unparsed(exc: HttpProcessingError) -> Reply:
    """The refusal of a head aiohttp's parser refused. The request line was
    the front door's to judge: a line too long here is a header's."""
    if isinstance(exc, LineTooLong):
        return error_reply(431, "bad_request", f"header line over {MAX_LINE} bytes")
    if exc.message == "Too many headers received":
        return error_reply(431, "bad_request", f"more than {MAX_HEADERS} header lines")
    said = " ".join(str(exc.message).split())  # aiohttp's own, on one line
    said = _TOKEN_IN_QUERY.sub(r"\1…", said)
    return error_reply(exc.code or 400, "bad_request", f"malformed request: {said[:160]}")


class MalformedRequests(logging.Filter):
    """aiohttp logs every request its parser refuses (a header line too
    long, a repeated Content-Type, a body that does not decode) at ERROR with
    a traceback, after answering it: anyone could fill the log with them. One
    throttled warning line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            log_refused(unparsed(exc).status, str(exc.message))
            return False
        return True


def quiet_malformed_requests() -> None:
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequests) for f in server_log.filters):
        server_log.addFilter(MalformedRequests())


class JsonRefusals(RequestHandler):
    """aiohttp's connection handler, whose answer to a head its parser
    refuses is the node's JSON refusal instead of plain text."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        answer = super().handle_error(request, status, exc, message)  # logs it; closes the connection
        if not isinstance(exc, HttpProcessingError) or not 400 <= status < 500:
            return answer
        response = unparsed(exc).response(close=True)
        response.headers.update(ALWAYS_HEADERS)  # no application hook runs for a head without a route
        return response
