"""Publishing from a backend through a node's HTTP API, with retry.

    async with HttpPublisher("http://herald.internal:8080", key=PUBLISH_KEY) as pub:
        msg_id = await pub.publish("room:lobby", {"text": "hi"})

Retries connection errors, 5xx and 429 (waiting as ``Retry-After`` says:
seconds, or an HTTP-date); any other refusal (400, 401, 403, 413) raises
``PublishRefused`` at once. Every publish carries an ``Idempotency-Key``
(the caller's, or one made for it), the same on each retry: one the node
stored but whose answer was lost is not stored again (docs/protocol.md §10.1).
``broker.publisher.NatsPublisher`` publishes through NATS instead.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any

import aiohttp

from broker.publisher import retry_delays


class PublishRefused(Exception):
    """The node refused the message: retrying the same one will not help
    (or the last retry failed). ``error`` is the node's error code."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(f"{status} {error}: {message}")
        self.status = status
        self.error = error


class HttpPublisher:
    """Publishes through a node's HTTP API (for backends without NATS access)."""

    def __init__(self, url: str, key: str, attempts: int = 5, backoff: float = 0.2, timeout: float = 10.0) -> None:
        self._url = url.rstrip("/") + "/api/publish"
        self._headers = {"Authorization": f"Bearer {key}"}
        self._attempts = attempts
        self._backoff = backoff
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def publish(
        self, channel: str, data: Any, event: str | None = None, idempotency_key: str | None = None
    ) -> str:
        """Store one message through the node; returns its id. Every try
        carries the same ``Idempotency-Key`` (``idempotency_key``, else one
        made for this call), so a retry of a publish the node stored but whose
        answer was lost (a 502 from a proxy) answers the first id instead of
        storing it again. Give your own key to make your retries safe too."""
        doc = await self._post(_item(channel, data, event), idempotency_key)
        return str(doc["id"])

    async def publish_batch(
        self, messages: Sequence[Mapping[str, Any]], idempotency_key: str | None = None
    ) -> list[str]:
        """Store ``messages`` (each ``{"channel", "data", "event"?}``) in order,
        as one request; returns their ids. Retried as ``publish`` is, with one
        key for the batch (the node keys item *i* ``<key> <i>``)."""
        items = [_item(m["channel"], m["data"], m.get("event")) for m in messages]
        doc = await self._post(items, idempotency_key)
        return [str(i) for i in doc["ids"]]

    async def _post(self, body: Any, idempotency_key: str | None) -> dict[str, Any]:
        """POST ``body`` until the node answers 200 (its JSON), retrying what may pass."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        # One key for every try: the node stores the publish once within publish.dedup_window.
        headers = {**self._headers, "Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        refused = PublishRefused(0, "unavailable", "no attempt made")
        for delay in [*retry_delays(self._attempts, self._backoff), None]:
            try:
                async with self._session.post(self._url, json=body, headers=headers) as resp:
                    if resp.status == 200:
                        return dict(await resp.json())
                    doc = await _json(resp)
                    refused = PublishRefused(resp.status, doc.get("error", "?"), doc.get("message", ""))
                    if resp.status != 429 and resp.status < 500:
                        raise refused
                    if resp.status == 429 and delay is not None:
                        delay = max(delay, retry_after(resp.headers.get("Retry-After")))
            except (aiohttp.ClientError, TimeoutError) as exc:
                refused = PublishRefused(0, "unavailable", f"{exc.__class__.__name__}: {exc}")
            if delay is None:
                raise refused
            await asyncio.sleep(delay)
        raise refused

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> HttpPublisher:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def retry_after(value: str | None, now: float | None = None) -> float:
    """Seconds to wait by a ``Retry-After`` header: a number of seconds (the
    node's), or an HTTP-date (RFC 9110 10.2.3: what a proxy in front may
    send; one past waits nothing). Missing or unreadable: 1."""
    if not value:
        return 1.0
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - (time.time() if now is None else now)
        except (TypeError, ValueError):
            return 1.0
    return max(seconds, 0.0) if math.isfinite(seconds) else 1.0  # a date past: at once


def _item(channel: str, data: Any, event: str | None) -> dict[str, Any]:
    """One message of a publish's body."""
    return {"channel": channel, "data": data} if event is None else {"channel": channel, "data": data, "event": event}


async def _json(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        doc = await resp.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        return {}
    return doc if isinstance(doc, dict) else {}
