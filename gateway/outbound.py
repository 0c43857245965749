"""Bounded per-connection outbound queues and the node's flusher.

The fan-out path never awaits a socket. A connection with nothing pending
gets a pass's first message as a write the flusher notes directly (no queue
entry); anything more goes to its queue. Once per event-loop pass (or after
``write_delay``) the flusher joins each connection's queued entries onto its
noted write — one transport write per connection per pass — filling the
transport's buffer up to ``write_buffer``, and issues the writes back to back. A queue with more than that
waits, in one task of its own and only while backed up, for the transport to
drain. ``max_bytes`` bounds what a connection holds in total (queued here plus
the transport's buffer): past it, droppable (drop-oldest) entries are shed, or
the overflow handler closes the connection as a slow consumer. A transport
that makes no progress for ``stall_timeout`` is treated the same way.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .metrics import LatencyHistogram, TransportMetrics

# A write the flusher issues at the end of its pass: the queue it is for
# (skipped if closed by then: nothing may follow a close frame), the
# transport's write, and the bytes.
Write = tuple["Outbound", Callable[[bytes], object], bytes]

# (frame bytes, stamp, droppable). The stamp is the stream timestamp of a live
# delivery (counted, latency observed), -1 for a replayed one (counted only),
# 0 for a control frame.
Entry = tuple[bytes, float, bool]


class Wire(Protocol):
    """The raw side of a transport."""

    # The transport's own write (a C method), and the framing a transport adds
    # around a batch (SSE: an HTTP chunk), None if none. Kept as attributes so
    # the flusher can issue all of a loop pass's writes back to back.
    send: Callable[[bytes], object]
    frame: Callable[[bytes], bytes] | None
    # Bytes the transport holds that the peer has not taken yet (the
    # transport's own method: asked once per write).
    buffered: Callable[[], int]

    def write(self, data: bytes) -> None:
        """Frame and write now; never blocks."""

    async def drained(self) -> None:
        """Return once the transport wants more (raises if the connection is gone)."""


@dataclass(frozen=True, slots=True)
class QueueLimits:
    max_bytes: int
    max_messages: int
    write_buffer: int
    stall_timeout: float
    # Live deliveries a session may hold aside while a replay runs. They are
    # references to deliveries every recipient shares, so this can be large.
    max_held: int = 10_000


class Outbound:
    __slots__ = (
        "_entries",
        "_limits",
        "_metrics",
        "_pass",
        "_room",
        "_scheduled",
        "_slot",
        "_waiter",
        "_wire",
        "_wire_bytes",
        "bytes",
        "closed",
        "flusher",
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
        self.flusher = flusher
        self._limits = limits
        self._metrics = metrics
        # A list, not a deque: an empty deque costs ~1.3 KiB per idle connection.
        self._entries: list[Entry] = []
        # The flusher pass that last noted a direct write for it, and where in
        # that pass's writes: what ``flush`` writes in the same pass joins it.
        self._pass = 0
        self._slot = 0
        self.bytes = 0
        # Transport buffer size as of the last write or check.
        self._wire_bytes = 0
        self._scheduled = False
        self._waiter: asyncio.Task[None] | None = None
        self._room: asyncio.Future[None] | None = None
        self.closed = False
        self.on_overflow = on_overflow  # called with stalled=False (full) / True (no progress)

    @property
    def limits(self) -> QueueLimits:
        return self._limits

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, frame: bytes, ts: float = 0.0, droppable: bool = False) -> None:
        if self.closed:
            return
        self._entries.append((frame, ts, droppable))
        self.bytes += len(frame)
        limits = self._limits
        if self.bytes + self._wire_bytes > limits.max_bytes or len(self._entries) > limits.max_messages:
            # The cached transport size may be stale (the peer read since): ask
            # again, counting a direct write of this pass not sent yet.
            self._wire_bytes = self._wire.buffered() + len(self.flusher.noted(self))
            if not self._within_limits() and not self._shed():
                self.on_overflow(False)
                return
        if not self._scheduled and self._waiter is None:
            self._scheduled = True
            self.flusher.schedule(self)

    def _within_limits(self) -> bool:
        limits = self._limits
        return self.bytes + self._wire_bytes <= limits.max_bytes and len(self._entries) <= limits.max_messages

    def _shed(self) -> bool:
        """Drop the oldest droppable entries until within limits; True if that sufficed."""
        limits = self._limits
        budget = limits.max_bytes - self._wire_bytes
        entries = self._entries
        kept: list[Entry] = []
        dropped = 0
        i = 0
        while i < len(entries) and (self.bytes > budget or len(entries) - i + len(kept) > limits.max_messages):
            entry = entries[i]
            i += 1
            if entry[2]:
                self.bytes -= len(entry[0])
                dropped += 1
            else:
                kept.append(entry)
        kept.extend(entries[i:])
        self._entries = kept
        if dropped:
            self.flusher.count_dropped(dropped)
        return self._within_limits()

    def flush(self, now: float, out: list[Write] | None = None) -> bool:
        """Write what fits below ``write_buffer`` in one write — or, with ``out``,
        append the write to it for the caller to issue. True if some is left."""
        self._scheduled = False
        entries = self._entries
        if self.closed or not entries:
            return False
        wire_bytes = self._wire.buffered()
        joining = out is not None and self._pass == self.flusher.flushing
        if joining:
            assert out is not None
            wire_bytes += len(out[self._slot][2])  # its direct write of this pass, not sent yet
        self._wire_bytes = wire_bytes
        allowance = self._limits.write_buffer - wire_bytes
        # One frame goes out even past the allowance, but only on its own.
        if allowance <= 0 or (joining and len(entries[0][0]) > allowance):
            self._backed_up()
            return True
        if len(entries) == 1:
            # The common case below saturation: one message for this connection
            # in this loop pass. Kept free of loops and copies.
            frame, ts, _ = entries[0]
            entries.clear()
            self.bytes = 0
            self._emit(frame, out)
            self._wire_bytes = wire_bytes + len(frame)
            if ts:
                metrics = self._metrics
                metrics.delivered += 1
                if ts > 0:
                    metrics.latency.observe(now - ts)
            return False
        if self.bytes <= allowance:
            batch = entries
            data = b"".join([e[0] for e in entries])
        else:
            # Only what fits: the rest stays here, where drop-oldest can shed it.
            size, k = len(entries[0][0]), 1
            while k < len(entries) and size + len(entries[k][0]) <= allowance:
                size += len(entries[k][0])
                k += 1
            batch = entries[:k]
            del entries[:k]
            data = b"".join([e[0] for e in batch])
        metrics = self._metrics
        latency = metrics.latency
        counts, bounds = latency.counts, latency.bounds
        delivered = 0
        for _, ts, _ in batch:
            if ts:
                delivered += 1
                if ts > 0:
                    lag = now - ts
                    counts[bisect_left(bounds, lag)] += 1
                    latency.sum += lag
        if batch is entries:
            entries.clear()
        self.bytes -= len(data)
        self._emit(data, out)
        self._wire_bytes += len(data)
        metrics.delivered += delivered
        if entries:
            self._backed_up()
            return True
        return False

    def _emit(self, data: bytes, out: list[Write] | None) -> None:
        wire = self._wire
        if out is None:
            wire.write(data)
        else:
            framing = wire.frame
            if framing is not None:
                data = framing(data)
            if self._pass == self.flusher.flushing:  # one write per connection per pass
                _, send, first = out[self._slot]
                out[self._slot] = (self, send, first + data)
            else:
                out.append((self, wire.send, data))

    def _backed_up(self) -> None:
        if self._waiter is None and not self.closed:
            self._waiter = asyncio.get_running_loop().create_task(self._wait_writable())

    async def _wait_writable(self) -> None:
        loop = asyncio.get_running_loop()
        stall = self._limits.stall_timeout
        deadline = loop.time() + stall
        try:
            while not self.closed:
                try:
                    async with asyncio.timeout_at(deadline):
                        await self._wire.drained()
                except TimeoutError:
                    self.on_overflow(True)
                    return
                before = self.bytes
                more = self.flush(time.time())
                self._wake_room()
                if not more:
                    return
                if self.bytes < before:
                    deadline = loop.time() + stall  # the peer is reading
                elif loop.time() >= deadline:
                    self.on_overflow(True)
                    return
                else:
                    # The transport is not paused yet takes nothing: wait without spinning.
                    await asyncio.sleep(0.005)
        except (ConnectionError, RuntimeError):
            pass  # the connection is gone; its handler ends the session
        finally:
            self._waiter = None
            self._wake_room()

    async def room(self, max_bytes: int, max_messages: int) -> None:
        """Wait until at most ``max_bytes`` and ``max_messages`` are queued here
        (or the queue is closed): how a replay paces itself to the client."""
        while not self.closed and (self.bytes > max_bytes or len(self._entries) > max_messages):
            if self._waiter is None:
                # The flusher writes first; what does not fit starts the waiter.
                await asyncio.sleep(0.001)
                continue
            self._room = room = asyncio.get_running_loop().create_future()
            await room

    def _wake_room(self) -> None:
        room, self._room = self._room, None
        if room is not None and not room.done():
            room.set_result(None)

    def write_out(self) -> None:
        """Write everything pending now, past ``write_buffer``: before a close
        frame, so the client still gets the acks and errors that explain it.
        The pass's direct write goes first: what queued behind it must not
        arrive without it (a resume from the last id would skip the hole)."""
        if self.closed:
            return
        noted = self.flusher.take_noted(self)
        if noted:
            try:
                self._wire.send(noted)  # framed already (the raw write, as the pass would)
            except RuntimeError:
                return  # the connection is gone (uvloop raises): nothing more to write
        if self._entries:
            data = b"".join([e[0] for e in self._entries])
            self._entries.clear()
            self.bytes = 0
            self._wire.write(data)

    def close(self) -> None:
        self.closed = True
        self._entries.clear()
        self.bytes = 0
        self._wake_room()
        waiter = self._waiter
        if waiter is not None and waiter is not asyncio.current_task():
            waiter.cancel()

    def pending_bytes(self) -> int:
        return self.bytes + (0 if self.closed else self._wire.buffered())


class Flusher:
    """Writes what queues got, once per event-loop pass.

    The common case — a connection with nothing pending that gets one message
    in a loop pass — never touches the queue: ``fan_out`` checks the
    connection's limits and notes the write itself, framed once per message
    (not per recipient). That is the cost of every delivery, so it is kept to
    a few attribute reads per recipient. Anything else (a second message in
    the same pass, a backed-up or closed connection) goes through ``push`` and
    ``flush``, after the direct writes so that order holds.
    """

    def __init__(self, count_dropped: Callable[[int], None], delay: float = 0.0) -> None:
        self._delay = delay  # backpressure.write_delay
        self._dirty: list[Outbound] = []
        self._writes: list[Write] = []
        # (stream timestamp, recipients, histogram) of this pass's direct writes.
        self._stamps: list[tuple[float, int, LatencyHistogram]] = []
        self._pass = 1  # queues written directly in this pass carry its number
        self.flushing = 0  # the pass whose writes _run is putting together
        self._scheduled = False
        self.count_dropped = count_dropped

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            if self._delay:
                asyncio.get_running_loop().call_later(self._delay, self._run)
            else:
                asyncio.get_running_loop().call_soon(self._run)

    def schedule(self, queue: Outbound) -> None:
        self._dirty.append(queue)
        self._schedule()

    def noted(self, queue: Outbound) -> bytes:
        """The direct write noted for ``queue`` in the pass being filled (b"" if none)."""
        return self._writes[queue._slot][2] if queue._pass == self._pass else b""

    def take_noted(self, queue: Outbound) -> bytes:
        """``noted``, which the caller writes itself: the pass will not."""
        data = self.noted(queue)
        if data:
            self._writes[queue._slot] = (queue, queue._wire.send, b"")
        return data

    def fan_out(self, queues: list[Outbound], frame: bytes, ts: float, droppable: bool) -> None:
        """``push(frame, ts, droppable)`` to every queue of ``queues`` (one
        transport's recipients of one message)."""
        size = len(frame)
        this_pass = self._pass
        writes = self._writes
        metrics = queues[0]._metrics
        direct = 0
        framing: Callable[[bytes], bytes] | None = None
        framed = frame
        for queue in queues:
            if (
                queue._pass == this_pass  # already written to in this pass: queue behind that write
                or queue._entries
                or queue._waiter is not None
                or queue.closed
                or queue.flusher is not self
                or queue._metrics is not metrics
            ):
                queue.push(frame, ts, droppable)
                continue
            wire = queue._wire
            wire_bytes = wire.buffered()
            limits = queue._limits
            if wire_bytes >= limits.write_buffer or size + wire_bytes > limits.max_bytes:
                queue.push(frame, ts, droppable)
                continue
            queue._pass = this_pass
            queue._slot = len(writes)
            queue._wire_bytes = wire_bytes + size
            if wire.frame is not framing:  # SSE: an HTTP chunk, made once per message
                framing = wire.frame
                framed = frame if framing is None else framing(frame)
            writes.append((queue, wire.send, framed))
            direct += 1
        if direct:
            if ts:
                metrics.delivered += direct
                if ts > 0:
                    self._stamps.append((ts, direct, metrics.latency))
            self._schedule()

    def _run(self) -> None:
        self._scheduled = False
        self.flushing = self._pass
        self._pass += 1
        now = time.time()
        out, self._writes = self._writes, []
        stamps, self._stamps = self._stamps, []
        for ts, count, histogram in stamps:
            histogram.observe_many(now - ts, count)
        dirty, self._dirty = self._dirty, []
        for queue in dirty:
            queue.flush(now, out)
        # All bookkeeping first, then the writes back to back: a reader woken by
        # the first finds the next ones already there, and the kernel does
        # less work per write than when each wakes a peer that went to sleep.
        for queue, send, data in out:
            if queue.closed or not data:  # closed since noted (its close frame is out), or taken
                continue
            try:  # noqa: SIM105 - suppress() costs a context manager per write here
                send(data)
            except RuntimeError:
                pass  # closed under us (uvloop raises); its handler ends the session
