"""Bounded per-connection outbound queues and the node's flusher.

The fan-out path only appends prebuilt bytes to a queue; it never awaits a
socket. The flusher runs once per event-loop pass over the connections that got
something, joins each one's queue into a single transport write, and leaves a
connection alone while its transport still holds more than ``write_buffer``
bytes. A queue that exceeds its limits sheds droppable (drop-oldest) entries or
calls the overflow handler (the connection is closed as a slow consumer).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .metrics import TransportMetrics


class Wire(Protocol):
    """The raw side of a transport: write framed bytes, tell what is buffered."""

    def write(self, data: bytes) -> None: ...

    def buffered(self) -> int: ...


@dataclass(frozen=True, slots=True)
class QueueLimits:
    max_bytes: int
    max_messages: int
    write_buffer: int
    stall_timeout: float


class Outbound:
    __slots__ = (
        "_entries",
        "_flusher",
        "_limits",
        "_metrics",
        "_scheduled",
        "_wire",
        "blocked_since",
        "bytes",
        "closed",
        "on_overflow",
    )

    def __init__(
        self,
        wire: Wire,
        flusher: Flusher,
        limits: QueueLimits,
        metrics: TransportMetrics,
        on_overflow: Callable[[bool], None],
    ) -> None:
        self._wire = wire
        self._flusher = flusher
        self._limits = limits
        self._metrics = metrics
        # (frame, stream timestamp or 0 for control frames, droppable)
        self._entries: deque[tuple[bytes, float, bool]] = deque()
        self.bytes = 0
        self._scheduled = False
        self.blocked_since = 0.0
        self.closed = False
        self.on_overflow = on_overflow  # called with stalled=False (full) / True (timed out)

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, frame: bytes, ts: float = 0.0, droppable: bool = False) -> None:
        if self.closed:
            return
        self._entries.append((frame, ts, droppable))
        self.bytes += len(frame)
        limits = self._limits
        if (self.bytes > limits.max_bytes or len(self._entries) > limits.max_messages) and not self._shed():
            self.on_overflow(False)
            return
        if not self._scheduled:
            self._scheduled = True
            self._flusher.schedule(self)

    def _shed(self) -> bool:
        """Drop the oldest droppable entries until within limits; True if that sufficed."""
        limits = self._limits
        kept: deque[tuple[bytes, float, bool]] = deque()
        dropped = 0
        entries = self._entries
        while entries and (self.bytes > limits.max_bytes or len(entries) + len(kept) > limits.max_messages):
            entry = entries.popleft()
            if entry[2]:
                self.bytes -= len(entry[0])
                dropped += 1
            else:
                kept.append(entry)
        kept.extend(entries)
        self._entries = kept
        if dropped:
            self._flusher.count_dropped(dropped)
        return self.bytes <= limits.max_bytes and len(kept) <= limits.max_messages

    def flush(self, now: float) -> bool:
        """Write what is queued in one write. Returns True if the wire is backed up."""
        self._scheduled = False
        entries = self._entries
        if self.closed or not entries:
            return False
        if self._wire.buffered() > self._limits.write_buffer:
            if not self.blocked_since:
                self.blocked_since = now
            return True
        self.blocked_since = 0.0
        if len(entries) == 1:
            frame, ts, _ = entries[0]
            data = frame
            delivered = 1 if ts else 0
            if ts:
                self._metrics.latency.observe(now - ts)
        else:
            data = b"".join([e[0] for e in entries])
            delivered = 0
            observe = self._metrics.latency.observe
            for _, ts, _ in entries:
                if ts:
                    delivered += 1
                    observe(now - ts)
        entries.clear()
        self.bytes = 0
        self._wire.write(data)
        if delivered:
            self._metrics.delivered.inc(delivered)
        return False

    def stalled(self, now: float) -> bool:
        return bool(self.blocked_since) and now - self.blocked_since > self._limits.stall_timeout

    def close(self) -> None:
        self.closed = True
        self._entries.clear()
        self.bytes = 0

    def pending_bytes(self) -> int:
        return self.bytes + (0 if self.closed else self._wire.buffered())


class Flusher:
    """Flushes queues once per loop pass; retries backed-up ones on a timer and
    reports those stalled past ``stall_timeout``."""

    def __init__(self, count_dropped: Callable[[int], None], retry_interval: float = 0.05) -> None:
        self._dirty: list[Outbound] = []
        self._blocked: set[Outbound] = set()
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._retry_interval = retry_interval
        self.count_dropped = count_dropped

    def schedule(self, queue: Outbound) -> None:
        self._dirty.append(queue)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        now = time.time()
        for queue in dirty:
            if queue.flush(now):
                self._block(queue)

    def _block(self, queue: Outbound) -> None:
        self._blocked.add(queue)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._retry_interval, self._retry)

    def _retry(self) -> None:
        self._timer = None
        blocked, self._blocked = self._blocked, set()
        now = time.time()
        for queue in blocked:
            if queue.closed:
                continue
            if queue.flush(now):
                if queue.stalled(now):
                    queue.on_overflow(True)
                else:
                    self._block(queue)

    @property
    def blocked(self) -> int:
        return len(self._blocked)
