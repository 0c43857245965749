"""What the stream endpoints and admission read of a request: aiohttp's
request, or the head the front door parsed itself (``FrontHead``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping
from yarl import URL


class Head(Protocol):
    """A request head (``web.Request`` is one)."""

    @property
    def method(self) -> str: ...

    @property
    def version(self) -> tuple[int, int]: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def rel_url(self) -> URL: ...

    @property
    def query(self) -> MultiMapping[str]: ...

    @property
    def host(self) -> str: ...

    @property
    def remote(self) -> str | None: ...

    @property
    def transport(self) -> asyncio.Transport | None: ...


class FrontHead:
    """A request head read by the front door, answered without aiohttp.
    Its URL and peer are made when first read: a publish reads neither (a
    yarl URL and a getpeername() less per request)."""

    __slots__ = ("_peer_read", "_rel_url", "_remote", "_rest", "_target", "headers", "method", "transport")

    def __init__(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        transport: asyncio.Transport,
        rest: Callable[[], bytes] = bytes,
    ) -> None:
        self.method = method
        self._rest = rest
        self.headers = CIMultiDictProxy(headers)
        self.transport: asyncio.Transport | None = transport
        self._target = target
        self._rel_url: URL | None = None
        self._remote: str | None = None
        self._peer_read = False

    @property
    def rel_url(self) -> URL:
        if self._rel_url is None:
            path, _, query = self._target.partition("?")
            # As aiohttp makes it: the query parsed the same way, to the same values.
            self._rel_url = URL.build(path=path, query_string=query, encoded=True)
        return self._rel_url

    def take_rest(self) -> bytes:
        """The bytes that came after this request (a route that takes the socket reads them first)."""
        return self._rest()

    @property
    def version(self) -> tuple[int, int]:
        return (1, 1)  # the front door serves HTTP/1.1 only

    @property
    def remote(self) -> str | None:
        if not self._peer_read:
            self._peer_read = True
            peer = self.transport.get_extra_info("peername") if self.transport is not None else None
            self._remote = str(peer[0]) if isinstance(peer, (list, tuple)) and peer else None
        return self._remote

    @property
    def query(self) -> MultiMapping[str]:
        return self.rel_url.query

    @property
    def host(self) -> str:
        return self.headers.get("Host", "")  # the front door serves only heads that have one
