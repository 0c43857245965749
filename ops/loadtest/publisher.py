"""Publishing test messages at a paced rate, round-robin over the rooms.

Message k of the run goes to room ``k % rooms``; each room's sequence starts at
1 and only advances when a publish succeeds, so receivers can count gaps and
duplicates per room. The pacer schedules sends against the clock (catching up
in bursts if it slips) and never sends more than ``rate x seconds`` per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

from . import payload
from .clients import describe
from .httpclient import HttpConnection, post_request
from .stats import Histogram
from .target import expand, loopback_url

MIN_SLEEP = 0.001  # the pacer's shortest sleep (s): uvloop's timer resolution


class Publisher:
    """The pacing and bookkeeping; subclasses say how one message is sent."""

    def __init__(self, rooms: list[str], payload_bytes: int) -> None:
        self.rooms = rooms
        self.payload_bytes = payload_bytes
        self.published = [0] * len(rooms)  # per room: last sequence published (= count so far)
        self.errors: Counter[str] = Counter()
        self._next = 0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def _emit(self, room: int) -> None:
        raise NotImplementedError

    async def drain(self, timeout: float) -> int:
        """Wait for what is still in flight; returns how many messages were abandoned."""
        return 0

    async def run(self, rate: float, seconds: float) -> int:
        """Publish at ``rate``/s for ``seconds``; returns how many sends were started.

        Fewer than ``rate x seconds`` means the publisher could not keep up.
        """
        loop = asyncio.get_running_loop()
        total = round(rate * seconds)
        start = loop.time()
        end = start + seconds + min(0.1, 0.02 * seconds)  # timer slack, not a chance to catch up
        rooms = len(self.rooms)
        sent = 0
        while sent < total:
            now = loop.time()
            if now > end:
                break
            due = min(total, int((now - start) * rate) + 1)
            while sent < due:
                room = self._next % rooms
                self._next += 1
                await self._emit(room)
                sent += 1
                if not sent % 256:  # a long catch-up burst must not starve the receivers
                    await asyncio.sleep(0)
            # uvloop's timers tick in whole milliseconds: a shorter sleep returns at once, and
            # the loop would spin (each pass sending one message) instead of sending a burst.
            delay = start + sent / rate - loop.time()
            await asyncio.sleep(max(delay, MIN_SLEEP))
        await asyncio.sleep(max(0.0, start + seconds - loop.time()))  # a step lasts its length
        return sent

    def payload(self, room: int) -> tuple[int, bytes]:
        seq = self.published[room] + 1
        return seq, payload.make(seq, time.time(), self.payload_bytes)


class NatsPublisher(Publisher):
    """Core NATS publish (at most once, no ack): what a backend does."""

    def __init__(self, rooms: list[str], payload_bytes: int, url: str, subject: str) -> None:
        super().__init__(rooms, payload_bytes)
        self.url = url
        self.subjects = [expand(subject, room=r) for r in rooms]
        self._nc: Any = None
        self._flusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        import nats  # imported here so a WS-only run with --publish-url never needs it

        async def on_error(exc: Exception) -> None:
            self.errors[f"nats {type(exc).__name__}"] += 1

        try:
            async with asyncio.timeout(10):
                self._nc = await nats.connect(
                    self.url,
                    name="herald-loadtest",
                    connect_timeout=5,
                    reconnect_time_wait=0.5,
                    max_reconnect_attempts=5,
                    error_cb=on_error,
                )
        except TimeoutError:
            raise ConnectionError(f"no NATS connection to {self.url} within 10 s") from None
        self._flusher = asyncio.get_running_loop().create_task(self._flush_every(1.0))

    async def _flush_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=5)

    async def _emit(self, room: int) -> None:
        seq, data = self.payload(room)
        try:
            await self._nc.publish(self.subjects[room], data)
        except Exception as exc:  # noqa: BLE001 - any failure is a counted publish error
            self.errors[f"nats {type(exc).__name__}"] += 1
            return
        self.published[room] = seq

    async def drain(self, timeout: float) -> int:
        try:
            await self._nc.flush(timeout=max(1, int(timeout)))
        except Exception as exc:  # noqa: BLE001
            self.errors[f"flush {type(exc).__name__}"] += 1
        return 0

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._nc.close()


class HttpPublisher(Publisher):
    """HTTP POST over one keep-alive connection per room (raw sockets, see
    ``httpclient``), one sequential sender per room so that a room's messages
    reach the server in sequence order: as many requests in flight as rooms.

    ``batch`` > 1 (Herald's body only): a request carries up to ``batch``
    messages of one room as a JSON array; a room's sender waits until that
    many are owed (``drain`` sends what is left). Each request's round trip is
    recorded in ``latency``; ``requests`` counts the requests answered."""

    def __init__(
        self,
        rooms: list[str],
        payload_bytes: int,
        url: str,
        headers: dict[str, str],
        herald_body: bool,
        batch: int = 1,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(rooms, payload_bytes)
        if batch > 1 and not herald_body:
            raise ValueError("batches need Herald's body (a JSON array of messages)")
        self.endpoints = [loopback_url(expand(url, room=r), ("http",)) for r in rooms]
        self.headers = {"Content-Type": "application/json", **headers}
        self.herald_body = herald_body
        self.batch = max(1, batch)
        self.timeout = timeout
        self.latency = Histogram()
        self.requests = 0
        self._channels = [b'{"channel":"room:%s","data":' % r.encode() for r in rooms]
        self._owed = [0] * len(rooms)
        self._busy = [False] * len(rooms)
        self._flush = False
        self._wake = [asyncio.Event() for _ in rooms]
        self._conns = [HttpConnection(ep) for ep in self.endpoints]
        self._workers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._worker(r)) for r in range(len(self.rooms))]

    async def _emit(self, room: int) -> None:
        self._owed[room] += 1
        if self._owed[room] >= self.batch:
            self._wake[room].set()

    async def _worker(self, room: int) -> None:
        wake = self._wake[room]
        while True:
            await wake.wait()
            wake.clear()
            while self._owed[room] >= self.batch or (self._flush and self._owed[room] > 0):
                n = min(self._owed[room], self.batch)
                self._owed[room] -= n
                self._busy[room] = True
                try:
                    await self._post(room, n)
                finally:
                    self._busy[room] = False

    def body(self, room: int, n: int) -> tuple[int, bytes]:
        """The next ``n`` messages of ``room`` as one request body; and the last sequence in it."""
        first = self.published[room] + 1
        now = time.time()
        if not self.herald_body:
            return first, payload.make(first, now, self.payload_bytes)
        head, size = self._channels[room], self.payload_bytes
        items = [head + payload.make(s, now, size) + b"}" for s in range(first, first + n)]
        if self.batch == 1:
            return first, items[0]
        return first + n - 1, b"[" + b",".join(items) + b"]"

    async def _post(self, room: int, n: int) -> None:
        last, data = self.body(room, n)
        request = post_request(self.endpoints[room], self.headers, data)
        sent = time.perf_counter()
        try:
            status, _ = await self._conns[room].request(request, self.timeout)
        except Exception as exc:  # noqa: BLE001 - timeouts, resets: a counted publish error
            self.errors[f"http {describe(exc)}"] += n
            return
        self.requests += 1
        self.latency.record(time.perf_counter() - sent)
        if 200 <= status < 300:
            self.published[room] = last
        else:
            self.errors[f"http {status}"] += n

    async def drain(self, timeout: float) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._flush = True  # a batch sender sends what it holds, however little
        for wake in self._wake:
            wake.set()
        try:
            while (any(self._owed) or any(self._busy)) and loop.time() < deadline:
                await asyncio.sleep(0.01)
        finally:
            self._flush = False
        abandoned = sum(self._owed)
        self._owed = [0] * len(self.rooms)
        return abandoned

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        for conn in self._conns:
            conn.close()
