"""The webhook dispatcher (``herald hooks``): user-channel messages that their
user did not get live — offline for ``hooks.offline_after`` seconds, or not
read within ``hooks.unread_after`` — are POSTed, signed, to the backend that
sends pushes, mails or texts. At least once, never twice at the same time;
the stream id is the idempotency key (``Herald-Delivery-Id``).

A dispatcher takes no message before it is due: the one it was handed waits,
kept in progress (no slot of max_ack_pending but its own), until it is as old
as the shortest wait that can apply — offline_after, or unread_after if
shorter. The stream is in time order: nothing behind it falls due earlier
(a retry that falls due meanwhile is fetched after the wait).
Then, per message (each decision ends it, or hands it back to come again):
online and (no unread_after, or read) → skip; online and younger than
unread_after, or offline and younger than offline_after → later (a delayed
nak, which keeps its slot); read meanwhile → skip; else POST: 2xx → done; 429 →
after Retry-After (seconds or a date, at most the horizon) or the backoff if
longer; 3xx (redirects are not followed) and other 4xx → dead letter; 5xx /
timeout / refused → later with backoff (logged, throttled), dead letter past
the horizon.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import logging
import random
import re
import signal
import time
from datetime import UTC, datetime

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from yarl import URL

from broker.channels import Subjects, glob_match
from broker.hook_message import Backlog, HookMessage
from broker.hooks import HookSource
from broker.throttle import Throttle

from .frames import json_data
from .settings import HooksSettings, Settings, hook_routes

log = logging.getLogger("herald.hooks")
warn = Throttle(log, interval=60.0)

RESULTS = ("delivered", "retried", "rejected", "dead", "skipped_online", "skipped_read", "no_route")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def signature(secrets: list[str], timestamp: int, body: bytes) -> str:
    """``t=<unix>,v1=<hex>[,v1=<hex>]``: HMAC-SHA256 of ``b"<t>." + body`` per secret."""
    signed = b"%d." % timestamp + body
    macs = [hmac.new(s.encode(), signed, hashlib.sha256).hexdigest() for s in secrets if s]
    return ",".join([f"t={timestamp}", *(f"v1={m}" for m in macs)])


def verify(secret: str, header: str, body: bytes, tolerance: float = 300.0) -> bool:
    """What a receiver does (README has it standalone): one v1 matches, t is recent."""
    fields = [part.partition("=") for part in header.split(",")]
    stamps = [v for k, _, v in fields if k == "t"]
    if len(stamps) != 1 or not re.fullmatch(r"[0-9]{1,15}", stamps[0]) or abs(time.time() - int(stamps[0])) > tolerance:
        return False
    expected = hmac.new(secret.encode(), stamps[0].encode() + b"." + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, v) for k, _, v in fields if k == "v1")


def shown_url(url: str) -> str:
    """``url`` for the log: without the user and password a receiver behind basic auth needs."""
    return str(URL(url).with_user(None)) if url else url


# Help of the gauges read from the consumer all dispatchers share.
SHARED = "every dispatcher reports the same: max, not sum"


class HookMetrics:
    """The webhook dispatcher's metrics (its own registry)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.deliveries = Counter("herald_webhook_deliveries", "Webhook outcomes, by result", ["result"], registry=r)
        for result in RESULTS:
            self.deliveries.labels(result)
        self.latency = Histogram(
            "herald_webhook_latency_seconds", "Webhook request time", buckets=LATENCY_BUCKETS, registry=r
        )
        # The shared consumer's numbers: each dispatcher reports the same.
        self.queue = Gauge(
            "herald_webhook_queue_depth",
            f"User messages not yet decided on, all dispatchers ({SHARED})",
            registry=r,
        )
        self.ack_pending = Gauge(
            "herald_webhook_ack_pending",
            "User messages handed out and not yet answered, all dispatchers: being sent, fetched and not"
            " yet due, or handed back to wait (Retry-After, backoff, the longer of unread_after/offline_after);"
            f" {SHARED}",
            registry=r,
        )
        self.ack_pending_limit = Gauge(
            "herald_webhook_ack_pending_limit",
            f"The consumer's max_ack_pending (hooks.max_ack_pending): at it, no new message is handed out; {SHARED}",
            registry=r,
        )
        self.ready = Gauge(
            "herald_webhook_dispatcher_ready",
            "1 while consuming; 0 while waiting for NATS, the stream or its consumer",
            registry=r,
        )


class Dispatcher:
    """Sends each message the hook source yields to its webhook, with retries and signatures."""

    def __init__(self, settings: Settings, source: HookSource | None = None) -> None:
        self.hooks: HooksSettings = settings.hooks
        self.routes = hook_routes(self.hooks.routes)
        self.secrets = [s for s in (self.hooks.secret, self.hooks.secret_previous) if s]
        ack_wait = 2 * self.hooks.timeout + 1.0  # longer than any request (renewed before it): no two at once
        self.source = source or HookSource(
            settings.nats.urls,
            Subjects(settings.subject.prefix, settings.live_prefix),
            settings.stream.name,
            ack_wait=ack_wait,
            connect_timeout=settings.nats.connect_timeout,
            max_ack_pending=self.hooks.max_ack_pending,
        )
        h = self.hooks
        self.due_after = min(h.offline_after, h.unread_after) if h.unread_after else h.offline_after
        self._renew_every = ack_wait / 3  # a message waiting to fall due is kept this often
        self._held: list[HookMessage] = []  # fetched, not yet handled (the next first)
        self.metrics = HookMetrics()
        self.metrics.ready.set_function(lambda: 1.0 if self.source.ready else 0.0)
        self._http: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(self.hooks.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._finishing = False  # run is finishing what is in flight: no more cancels

    def url_for(self, event: str) -> str | None:
        for glob, url in self.routes:
            if glob_match((glob,), event):
                return url
        return self.hooks.url or None

    async def run(self) -> None:
        """Dispatch until cancelled; what is in flight then is finished (or left
        to JetStream, which hands it to another dispatcher after ack_wait),
        what waits to fall due is handed back at once."""
        await self.source.start()
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.hooks.timeout))
        depth = asyncio.create_task(self._watch_depth())
        try:
            async for batch in self.source.messages(self.hooks.concurrency):
                self._held = batch
                while self._held:
                    await self._until_due(self._held)
                    await self._slots.acquire()
                    task = asyncio.create_task(self._handle(self._held.pop(0)))
                    self._tasks.add(task)
                    task.add_done_callback(self._finished)
        finally:
            self._finishing = True
            depth.cancel()
            held, self._held = self._held, []
            await asyncio.gather(*(m.later(0.0) for m in held), return_exceptions=True)  # for another dispatcher
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=self.hooks.timeout + 1)
            await self._http.close()
            await self.source.close()

    def stop(self, task: asyncio.Task[None]) -> None:
        """SIGTERM/SIGINT: cancel ``task`` (running ``run``), and again every
        0.5 s until it finishes what is in flight: a cancel that arrives
        together with a fetch's messages is lost (see broker.tasks.cancel_and_wait)."""
        if task.done() or self._finishing:
            return
        task.cancel()
        asyncio.get_running_loop().call_later(0.5, self.stop, task)

    async def _until_due(self, held: list[HookMessage]) -> None:
        """Wait until ``held[0]`` is ``due_after`` seconds old, keeping all of
        ``held`` in progress meanwhile (JetStream would hand them out again
        after ack_wait). A stream clock ahead of ours (a negative age): at most
        ``due_after``."""
        until = time.monotonic() + self.due_after - max(held[0].age, 0.0)
        while (left := until - time.monotonic()) > 0:
            await asyncio.sleep(min(left, self._renew_every))
            answers = await asyncio.gather(*(m.working() for m in held), return_exceptions=True)
            failed = [a for a in answers if isinstance(a, Exception)]
            if failed:  # NATS closed or its buffer full: at least once still (the same Herald-Delivery-Id)
                warn("keep", "could not keep %d waiting webhooks (%r): they may be sent twice", len(failed), failed[0])

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook handling failed", exc_info=task.exception())

    async def _watch_depth(self) -> None:
        while True:
            backlog = await self.source.backlog()
            if backlog is not None:
                self._show(backlog)
            await asyncio.sleep(5.0)

    def _show(self, backlog: Backlog) -> None:
        self.metrics.queue.set(backlog.waiting + backlog.held)
        self.metrics.ack_pending.set(backlog.held)
        self.metrics.ack_pending_limit.set(backlog.limit)
        if backlog.full:
            # Retries hold their message's place: one route that keeps failing can stop them all.
            warn(
                "full",
                "webhooks stalled: %d messages are being sent or wait (Retry-After, backoff, the longer of"
                " unread_after/offline_after), hooks.max_ack_pending is %d: no new message is handed out, on any route,"
                " until some are answered. Fix the receiver that keeps failing (retries in the log) or raise"
                " hooks.max_ack_pending",
                backlog.held,
                backlog.limit,
            )

    async def _handle(self, m: HookMessage) -> None:
        url = self.url_for(m.event)
        if url is None:
            return await self._end(m, "no_route")
        h = self.hooks
        if await self.source.online(m.user):
            if not h.unread_after:
                return await self._end(m, "skipped_online")
            wait = h.unread_after - m.age
        else:
            wait = h.offline_after - m.age
        if wait > 0:
            return await m.later(wait)
        if await self.source.read_position(m.user) >= m.id:
            return await self._end(m, "skipped_read")
        # The wait for a slot and the lookups took part of ack_wait: a full
        # one again for the POST, or JetStream hands the message out twice.
        await m.working()
        await self._post(m, url)

    async def _end(self, m: HookMessage, result: str) -> None:
        self.metrics.deliveries.labels(result).inc()
        await m.done()

    async def _post(self, m: HookMessage, url: str) -> None:
        assert self._http is not None
        body = self.body(m)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "herald-hooks",
            "Herald-Delivery-Id": str(m.id),
            "Herald-Stream": m.stream,
            "Herald-Event": m.event,
            "Herald-Signature": signature(self.secrets, int(time.time()), body),
        }
        began = time.monotonic()
        try:
            # Not followed: a 301/302/303 would be fetched again as a GET without the body.
            async with self._http.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                status, retry_after = resp.status, resp.headers.get("Retry-After", "")
                failure = f"HTTP {status}"
                if 300 <= status < 400:  # the URL moved: hooks.url must say where (nothing is sent elsewhere)
                    failure += f": redirected to {resp.headers.get('Location', '?')} (set hooks.url to it)"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            status, retry_after, failure = 0, "", f"{type(exc).__name__}: {exc}"
        self.metrics.latency.observe(time.monotonic() - began)
        if 200 <= status < 300:
            return await self._end(m, "delivered")
        if 300 <= status < 500 and status != 429:
            return await self._dead_letter(m, "rejected", "refused", failure)
        if m.age > self.hooks.horizon:
            return await self._dead_letter(
                m, "dead", "failed past the horizon", f"{failure} after {m.attempt} attempts"
            )
        self.metrics.deliveries.labels("retried").inc()
        delay = self.retry_delay(m.attempt, _seconds(retry_after, self.hooks.horizon) if status == 429 else None)
        shown = shown_url(url)
        warn(
            f"retry {shown}",
            "webhook to %s failed (%s): retrying (%s for %s, in %.1f s)",
            shown,
            failure,
            m.id,
            m.user,
            delay,
        )
        await m.later(delay)

    def retry_delay(self, attempt: int, asked: float | None) -> float:
        """The backoff, or a 429's Retry-After (``asked``) if longer: one of 0
        again and again would otherwise be retried at once, forever."""
        return max(asked or 0.0, self.backoff(attempt))

    async def _dead_letter(self, m: HookMessage, result: str, how: str, reason: str) -> None:
        """Keep it in the dead-letter stream and let it go, counted as
        ``result``. If it cannot be kept, it is handed back with backoff and
        POSTed again then: better twice than lost, and not in a tight loop."""
        error = await self.source.dead_letter(m, reason)
        if error is not None:
            delay = self.backoff(m.attempt)
            log.error(
                "webhook %s for %s %s (%s) but could not be dead-lettered (%s): trying it again in %.1f s",
                m.id,
                m.user,
                how,
                reason,
                error,
                delay,
            )
            return await m.later(delay)
        log.warning("webhook %s for %s %s (%s): dead-lettered", m.id, m.user, how, reason)
        self.metrics.deliveries.labels(result).inc()
        await m.done()

    def backoff(self, attempt: int) -> float:
        """Full jitter: a random wait in [0, min(max_backoff, 2^attempt)) seconds."""
        return random.uniform(0, min(self.hooks.max_backoff, 2.0 ** min(attempt, 64)))

    @staticmethod
    def body(m: HookMessage) -> bytes:
        stamp = datetime.fromtimestamp(m.timestamp, UTC).isoformat().replace("+00:00", "Z")
        head = {"channel": f"user:{m.user}", "id": str(m.id), "event": m.event, "user": m.user, "timestamp": stamp}
        return orjson.dumps(head)[:-1] + b',"data":' + json_data(m.data) + b"}"


def _seconds(retry_after: str, most: float) -> float | None:
    """A ``Retry-After`` (delay seconds, or an HTTP date) as a wait of 0 to
    ``most`` seconds; None (the usual backoff) if it is neither."""
    value = retry_after.strip()
    if _DELAY.fullmatch(value):
        wait = float(value)
    else:
        try:
            wait = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    return min(max(0.0, wait), most)


# RFC 9110's delay-seconds (digits), a fraction allowed; "nan", "inf" or "1e400" are not waits.
_DELAY = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")


async def run_dispatcher(settings: Settings) -> None:
    """``herald hooks``: dispatch until SIGTERM/SIGINT, with /metrics if configured."""
    dispatcher = Dispatcher(settings)
    runner = None
    h = settings.hooks
    if h.metrics_port:
        app = web.Application()

        async def metrics(request: web.Request) -> web.Response:
            body = generate_latest(dispatcher.metrics.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def readyz(request: web.Request) -> web.Response:
            """200 while consuming; 503 while waiting for NATS or the stream (a supervisor can tell them apart)."""
            if dispatcher.source.ready:
                return web.json_response({"status": "ready"})
            return web.json_response({"status": "waiting", "message": "waiting for NATS or the stream"}, status=503)

        app.router.add_get("/metrics", metrics)
        app.router.add_get("/readyz", readyz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, h.metrics_host, h.metrics_port).start()
    task = asyncio.create_task(dispatcher.run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, dispatcher.stop, task)
    log.info(
        "webhook dispatcher running: %s", shown_url(h.url) or ", ".join(shown_url(u) for _, u in dispatcher.routes)
    )
    try:
        await task
    except asyncio.CancelledError:
        pass
    finally:
        if runner is not None:
            await runner.cleanup()
