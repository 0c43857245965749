"""What the stream endpoints and admission read of a request: aiohttp's
request, or the head the front door parsed itself (``FrontHead``)."""

from __future__ import annotations

import asyncio
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping
from yarl import URL


class Head(Protocol):
    """A request head (``web.Request`` is one)."""

    @property
    def method(self) -> str: ...

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
    """A request head read by the front door, answered without aiohttp."""

    __slots__ = ("headers", "method", "rel_url", "remote", "transport")

    def __init__(self, method: str, target: str, headers: CIMultiDict[str], transport: asyncio.Transport) -> None:
        self.method = method
        path, _, query = target.partition("?")
        # As aiohttp makes it: the query parsed the same way, to the same values.
        self.rel_url = URL.build(path=path, query_string=query, encoded=True)
        self.headers = CIMultiDictProxy(headers)
        self.transport: asyncio.Transport | None = transport
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, (list, tuple)) and peer else None

    @property
    def query(self) -> MultiMapping[str]:
        return self.rel_url.query

    @property
    def host(self) -> str:
        return self.headers.get("Host", "")  # the front door serves only heads that have one
