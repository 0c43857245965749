"""Clients and a publisher for failure tests: subscribers that stay subscribed
through node and NATS failures the way herald.js does (resume from the last id,
honour reconnect hints) or drop their connection on demand (a network blip),
and a steady publisher that records every acked id.
After the run, each subscriber must hold exactly the ids published to its
room, once and in order."""

from __future__ import annotations

import asyncio
import random
import re
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiohttp

from .helpers import SseClient, token

HINT = re.compile(r"(\d+)\s*ms")


@dataclass
class Subscriber:
    """One client in ``room`` over ``transport`` at ``base`` (a load balancer)."""

    base: str
    transport: str  # "ws" | "sse"
    user: str
    room: str
    ids: list[int] = field(default_factory=list)
    # (receive time, publish → receive latency) of each message: both wall clock, one machine.
    latencies: list[tuple[float, float]] = field(default_factory=list)
    last: str | None = None
    opened: list[float] = field(default_factory=list)  # monotonic time of every (re)open
    ends: list[str] = field(default_factory=list)  # how each connection ended
    resumed: list[str | None] = field(default_factory=list)  # the position each (re)open resumed from
    # Opens refused before a welcome / stream: "ws <close code> <reason>", "sse <status>", "ws <status>".
    refused: list[str] = field(default_factory=list)
    resets: int = 0
    dropped: list[float] = field(default_factory=list)  # monotonic time of every drop()
    _stop: bool = False
    _hang_up: Callable[[], None] | None = None  # ends the open connection from this side
    _away_until: float = 0.0  # monotonic time before which a dropped client does not reconnect

    @property
    def connected(self) -> bool:
        return len(self.opened) > len(self.ends)

    async def run(self, http: aiohttp.ClientSession) -> None:
        attempt = 0
        while not self._stop:
            wait = None
            try:
                if self.transport == "ws":
                    wait = await self._ws(http)
                else:
                    wait = await self._sse(http)
                attempt = 0
            except (aiohttp.ClientError, OSError, TimeoutError, EOFError) as exc:
                if self.connected:
                    self.ends.append(f"error {type(exc).__name__}")
                elif isinstance(exc, aiohttp.WSServerHandshakeError):
                    self.refused.append(f"ws {exc.status}")
                attempt += 1
            self._hang_up = None
            if self._stop:
                return
            # Like herald.js: the server's hint, else full-jitter backoff (short here).
            backoff = wait / 1000 if wait is not None else random.uniform(0, min(1.0, 0.05 * 2**attempt))
            await asyncio.sleep(max(backoff, self._away_until - time.monotonic()))

    def stop(self) -> None:
        self._stop = True

    def drop(self, offline: float) -> bool:
        """Lose the open connection as on a network blip (the socket shut on
        this side, no close frame) and stay away ``offline`` seconds; then
        reconnect as always, from the last id. False if none was open."""
        if not self.connected or self._hang_up is None:
            return False
        self.dropped.append(time.monotonic())
        self._away_until = time.monotonic() + offline
        self._hang_up()
        return True

    def _record(self, frame_id: str | None, data: Any) -> None:
        if frame_id is not None:
            self.ids.append(int(frame_id))
            self.last = frame_id
            if isinstance(data, dict) and isinstance(data.get("t"), float):
                now = time.time()
                self.latencies.append((now, now - data["t"]))

    async def _ws(self, http: aiohttp.ClientSession) -> int | None:
        params = {"token": token(self.user, rooms=["*"]), "room": self.room}
        since = self.last
        if since:
            params["since"] = since
        code, reason, welcomed = None, "", False
        async with http.ws_connect(self.base.replace("http", "ws", 1) + "/ws", params=params, heartbeat=5) as ws:
            while True:
                msg = await ws.receive()
                if msg.type is aiohttp.WSMsgType.CLOSE:
                    code, reason = int(msg.data), str(msg.extra or "")
                    break
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    code = ws.close_code
                    break
                frame = msg.json()
                kind = frame.get("type")
                if kind == "welcome":
                    welcomed = True
                    self._hang_up = partial(_shut, ws.get_extra_info("socket"))
                    self.opened.append(time.monotonic())
                    self.resumed.append(since)
                elif kind == "message" and frame.get("channel") == f"room:{self.room}":
                    self._record(frame.get("id"), frame.get("data"))
                elif kind == "reset":
                    self.resets += 1
        if self.connected:
            self.ends.append(f"ws {code} {reason}".strip())
        elif not welcomed:
            self.refused.append(f"ws {code} {reason}".strip())
        hint = HINT.search(reason)
        return int(hint[1]) if code == 1012 and hint else None

    async def _sse(self, http: aiohttp.ClientSession) -> int | None:
        since = self.last
        headers = {"Last-Event-ID": since} if since else {}
        params = {"token": token(self.user, rooms=["*"]), "room": self.room}
        async with http.get(self.base + "/sse", params=params, headers=headers, timeout=_NO_TIMEOUT) as resp:
            if resp.status != 200:
                self.refused.append(f"sse {resp.status} {await _error_code(resp)}".strip())
                raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
            self._hang_up = resp.close
            self.opened.append(time.monotonic())
            self.resumed.append(since)
            sse = SseClient(resp)
            while True:
                try:
                    ev = await sse.next(timeout=3600)
                except EOFError:
                    break
                if ev.event == "reset":
                    self.resets += 1
                elif ev.id is not None:
                    self._record(ev.id, ev.json())
        self.ends.append("sse end")
        return sse.retry  # the stream's last hint (a drain's, or the opening one)


_NO_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_read=None)


def _shut(sock: socket.socket | None) -> None:
    """A WebSocket's socket shut under aiohttp: its reader sees the end at once."""
    if sock is not None:
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


async def _error_code(resp: aiohttp.ClientResponse) -> str:
    """The ``error`` of a refusal's JSON body; empty if it has none (a proxy's page)."""
    with suppress(aiohttp.ClientError, ValueError):
        body = await resp.json(content_type=None)
        if isinstance(body, dict):
            return str(body.get("error", ""))
    return ""


@dataclass
class SteadyPublisher:
    """Publishes to ``rooms`` in turn at ``rate`` per second through ``publish``
    (returns the acked id), recording per room every id it was given."""

    publish: Callable[[str, Any], Awaitable[str]]
    rooms: list[str]
    rate: float
    sent: dict[str, list[int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    _stop: bool = False

    async def run(self) -> None:
        n = 0
        while not self._stop:
            room = self.rooms[n % len(self.rooms)]
            try:
                sid = await self.publish(f"room:{room}", {"n": n, "t": time.time()})
                self.sent.setdefault(room, []).append(int(sid))
            except Exception as exc:  # noqa: BLE001 - counted; the test decides what is allowed
                self.failures.append(f"{type(exc).__name__}: {exc}")
            n += 1
            await asyncio.sleep(1 / self.rate)

    def stop(self) -> None:
        self._stop = True


def check_delivery(subscribers: list[Subscriber], sent: dict[str, list[int]]) -> dict[str, Any]:
    """Every subscriber holds exactly its room's ids, once, in order; returns
    totals of lost and duplicated messages (both must be 0), and who lost what
    (the first few subscribers: enough to tell a pattern from a log)."""
    lost = duplicated = 0
    losers: list[dict[str, Any]] = []
    for sub in subscribers:
        want = sent.get(sub.room, [])
        got = sub.ids
        duplicated += len(got) - len(set(got))
        missing = sorted(set(want) - set(got))
        lost += len(missing)
        if missing and len(losers) < 8:
            losers.append(
                {
                    "user": sub.user,
                    "transport": sub.transport,
                    "missing": missing[:6],
                    "missing_count": len(missing),
                    "held_around": [i for i in got if missing[0] - 20 <= i <= missing[-1] + 20][:12],
                    "resumed_from": sub.resumed,
                    "ends": sub.ends,
                    "connected_at_end": sub.connected,
                }
            )
        assert sub.resets == 0, f"{sub.user}: reset"
        assert got == sorted(got), f"{sub.user}: out of order"
    return {"lost": lost, "duplicated": duplicated, "losers": losers}


def p99_latency(subscribers: list[Subscriber], start: float, end: float) -> float | None:
    """p99 of the latencies of messages received in [start, end) (wall clock), in ms."""
    window = sorted(lat for sub in subscribers for t, lat in sub.latencies if start <= t < end)
    return round(window[int(len(window) * 0.99)] * 1000, 1) if window else None
