"""Bounded per-connection outbound queues (the flusher that writes them: flusher.py).

The fan-out path never awaits a socket. A connection with nothing pending
gets a pass's first message as a write the flusher notes directly (no queue
entry); anything more goes to its queue. Once per event-loop pass (or after
``write_delay``) the flusher joins each connection's queued entries onto its
noted write — one transport write per connection per pass — filling the
transport's buffer up to ``write_buffer``, and issues the writes back to back. A queue with more than that
waits, in one task of its own and only while backed up, for the transport to
drain. ``max_bytes`` bounds what a connection holds in total (queued here plus
the transport's buffer): past it, droppable (drop-oldest) entries are shed, or
the overflow handler closes the connection as a slow consumer (one frame
larger than ``max_bytes`` alone in the queue goes out: it could never fit). A
transport that makes no progress for ``stall_timeout`` is treated the same
way (below ``write_buffer``, found by the links' ticks: SocketLink.check_stall).
What all of a node's queues hold is kept as it changes (``HeldBytes``): a
scrape reads no connection.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .metrics import TransportMetrics

# A write the flusher issues at the end of its pass: the queue it is for
# (skipped if closed by then: nothing may follow a close frame), the
# transport's write, and the bytes.
Write = tuple["Outbound", Callable[[bytes], object], bytes]

# What an entry is, for the delivery counters: a control frame (welcome, ack,
# error: not counted), a replayed message (counted) or a live one (counted,
# and its latency observed from its stream timestamp).
CONTROL, REPLAYED, LIVE = 0, 1, 2

# (frame bytes, kind, stream timestamp of a LIVE entry (else 0), droppable).
Entry = tuple[bytes, int, float, bool]


class Wire(Protocol):
    """The raw side of a transport."""

    # The transport's own write (a C method), kept as an attribute so the
    # flusher can issue all of a loop pass's writes back to back.
    send: Callable[[bytes], object]
    # Bytes the transport holds that the peer has not taken yet (the
    # transport's own method: asked once per write).
    buffered: Callable[[], int]

    def write(self, data: bytes) -> None:
        """Frame and write now; never blocks."""

    async def drained(self) -> None:
        """Return once the transport wants more (raises if the connection is gone)."""


class HeldBytes:
    """What a node's outbound queues hold (herald_outbound_queue_bytes), kept
    as it changes so that reading it costs the same at any number of
    connections: ``queued``, the sum of every queue's ``bytes``, exact; and
    ``sampled``, what their transports held at their links' last periodic
    tick (ws.heartbeat / 2, sse.keepalive): a transport's buffer can only be
    read one connection at a time, and those ticks read it anyway."""

    __slots__ = ("queued", "sampled")

    def __init__(self) -> None:
        self.queued = 0
        self.sampled = 0

    def total(self) -> float:
        return float(self.queued + self.sampled)


class Scheduler(Protocol):
    """The node's flusher (flusher.Flusher), as its queues and the hub use it."""

    flushing: int  # the pass whose writes are being put together
    held: HeldBytes  # what all its queues hold
    count_dropped: Callable[[int], None]
    clock_offset: float  # this node's wall clock minus the stream's: for latencies

    def schedule(self, queue: Outbound) -> None: ...
    def noted(self, queue: Outbound) -> bytes: ...
    def take_noted(self, queue: Outbound) -> bytes: ...
    def fan_out(self, queues: list[Outbound], frame: bytes, ts: float, droppable: bool) -> None: ...


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """How much one connection may hold, and how long its transport may stall."""

    max_bytes: int
    max_messages: int
    write_buffer: int
    stall_timeout: float
    # Live deliveries a session may hold aside while a replay runs. They are
    # references to deliveries every recipient shares, so this can be large.
    max_held: int = 10_000


class Outbound:
    """One connection's bounded queue of frames and how much its transport holds.

    ``entries``, ``wire``, ``limits``, ``metrics`` and ``waiter`` are read by
    the Flusher's fast path; ``noted_pass`` / ``noted_slot`` are the Flusher's
    own bookkeeping of this queue (the pass that noted a direct write for it,
    and where in that pass's writes) and it updates ``wire_bytes`` when it
    notes one. Attributes, not methods: the fast path reads them once per
    recipient.
    """

    __slots__ = (
        "_room",
        "_scheduled",
        "bytes",
        "closed",
        "entries",
        "flusher",
        "held",
        "limits",
        "metrics",
        "noted_pass",
        "noted_slot",
        "on_overflow",
        "sampled",
        "waiter",
        "wire",
        "wire_bytes",
        "written",
    )

    def __init__(
        self,
        wire: Wire,
        flusher: Scheduler,
        limits: QueueLimits,
        metrics: TransportMetrics,
        on_overflow: Callable[[bool], None],
    ) -> None:
        self.wire = wire
        self.flusher = flusher
        self.limits = limits
        self.metrics = metrics
        # A list, not a deque: an empty deque costs ~1.3 KiB per idle connection.
        self.entries: list[Entry] = []
        # The flusher pass that last noted a direct write for it, and where in
        # that pass's writes: what ``flush`` writes in the same pass joins it.
        self.noted_pass = 0
        self.noted_slot = 0
        self.bytes = 0  # every change is made to held.queued too
        self.held = flusher.held
        # What its transport held at its link's last tick, counted in held.sampled.
        self.sampled = 0
        # Transport buffer size as of the last write or check (or noted write).
        self.wire_bytes = 0
        # Bytes handed to the transport (but direct writes to an empty one,
        # which the kernel mostly takes at once): with what it holds, tells
        # whether the peer took any since an earlier look (stall checks).
        self.written = 0
        self._scheduled = False
        # Waits for the transport to drain, only while the queue is backed up.
        self.waiter: asyncio.Task[None] | None = None
        self._room: asyncio.Future[None] | None = None
        self.closed = False
        self.on_overflow = on_overflow  # called with stalled=False (full) / True (no progress)

    def __len__(self) -> int:
        return len(self.entries)

    def push(self, frame: bytes, kind: int = CONTROL, ts: float = 0.0, droppable: bool = False) -> None:
        """Queue ``frame`` (a ``kind`` entry; ``ts``: a LIVE one's stream timestamp)."""
        if self.closed:
            return
        self.entries.append((frame, kind, ts, droppable))
        size = len(frame)
        self.bytes += size
        self.held.queued += size
        limits = self.limits
        if self.bytes + self.wire_bytes > limits.max_bytes or len(self.entries) > limits.max_messages:
            # The cached transport size may be stale (the peer read since): ask
            # again, counting a direct write of this pass not sent yet.
            self.wire_bytes = self.wire.buffered() + len(self.flusher.noted(self))
            # A frame larger than the limit is let through alone in the queue:
            # past it, it could never be sent, and a resume would meet it again.
            alone = len(self.entries) == 1
            if not alone and not self._within_limits() and not self._shed():
                self.on_overflow(False)
                return
        if not self._scheduled and self.waiter is None:
            self._scheduled = True
            self.flusher.schedule(self)

    def _within_limits(self) -> bool:
        limits = self.limits
        return self.bytes + self.wire_bytes <= limits.max_bytes and len(self.entries) <= limits.max_messages

    def _shed(self) -> bool:
        """Drop the oldest droppable entries until within limits; True if that sufficed."""
        limits = self.limits
        budget = limits.max_bytes - self.wire_bytes
        entries = self.entries
        kept: list[Entry] = []
        dropped = shed = 0
        i = 0
        while i < len(entries) and (self.bytes - shed > budget or len(entries) - i + len(kept) > limits.max_messages):
            entry = entries[i]
            i += 1
            if entry[3]:
                shed += len(entry[0])
                dropped += 1
            else:
                kept.append(entry)
        kept.extend(entries[i:])
        self.entries = kept
        self.bytes -= shed
        self.held.queued -= shed
        if dropped:
            self.flusher.count_dropped(dropped)
        return self._within_limits()

    def flush(self, now: float, out: list[Write] | None = None) -> bool:
        """Write what fits below ``write_buffer`` in one write — or, with ``out``,
        append the write to it for the caller to issue. True if some is left."""
        self._scheduled = False
        entries = self.entries
        if self.closed or not entries:
            return False
        wire_bytes = self.wire.buffered()
        joining = out is not None and self.noted_pass == self.flusher.flushing
        if joining:
            assert out is not None
            wire_bytes += len(out[self.noted_slot][2])  # its direct write of this pass, not sent yet
        self.wire_bytes = wire_bytes
        allowance = self.limits.write_buffer - wire_bytes
        # One frame goes out even past the allowance, but only on its own.
        if allowance <= 0 or (joining and len(entries[0][0]) > allowance):
            self._backed_up()
            return True
        if len(entries) == 1:
            # The common case below saturation: one message for this connection
            # in this loop pass. Kept free of loops and copies.
            frame, kind, ts, _ = entries[0]
            entries.clear()
            self.held.queued -= self.bytes
            self.bytes = 0
            self._emit(frame, out)
            self.wire_bytes = wire_bytes + len(frame)
            if kind:
                metrics = self.metrics
                metrics.delivered += 1
                if kind == LIVE:
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
        metrics = self.metrics
        latency = metrics.latency
        counts, bounds = latency.counts, latency.bounds
        delivered = 0
        for _, kind, ts, _ in batch:
            if kind:
                delivered += 1
                if kind == LIVE:
                    lag = now - ts
                    counts[bisect_left(bounds, lag)] += 1
                    latency.sum += lag
        if batch is entries:
            entries.clear()
        self.bytes -= len(data)
        self.held.queued -= len(data)
        self._emit(data, out)
        self.wire_bytes += len(data)
        metrics.delivered += delivered
        if entries:
            self._backed_up()
            return True
        return False

    def _emit(self, data: bytes, out: list[Write] | None) -> None:
        self.written += len(data)
        if out is None:
            self.wire.write(data)
        elif self.noted_pass == self.flusher.flushing:  # one write per connection per pass
            _, send, first = out[self.noted_slot]
            out[self.noted_slot] = (self, send, first + data)
        else:
            out.append((self, self.wire.send, data))

    def _backed_up(self) -> None:
        if self.waiter is None and not self.closed:
            self.waiter = asyncio.get_running_loop().create_task(self._wait_writable())

    async def _wait_writable(self) -> None:
        loop = asyncio.get_running_loop()
        stall = self.limits.stall_timeout
        deadline = loop.time() + stall
        try:
            while not self.closed:
                held, written = self.wire.buffered(), self.written
                try:
                    async with asyncio.timeout_at(deadline):
                        await self.wire.drained()
                except TimeoutError:
                    if self.took_since(held, written):
                        # Slowly, but it reads: the transport did not fall to its
                        # low-water mark within stall_timeout, it was not stuck.
                        deadline = loop.time() + stall
                        continue
                    self.on_overflow(True)
                    return
                before = self.bytes
                more = self.flush(time.time() - self.flusher.clock_offset)
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
            self.waiter = None
            self._wake_room()

    def took_since(self, held: int, written: int) -> bool:
        """Whether the peer took bytes since the transport held ``held`` with
        ``written`` handed to it (writes since then count: held alone can grow
        while the peer reads, slower than it is written to)."""
        return held + (self.written - written) > self.wire.buffered()

    async def room(self, max_bytes: int, max_messages: int) -> None:
        """Wait until at most ``max_bytes`` and ``max_messages`` are queued here
        (or the queue is closed): how a replay paces itself to the client."""
        while not self.closed and (self.bytes > max_bytes or len(self.entries) > max_messages):
            if self.waiter is None:
                # The flusher writes first; what does not fit starts the waiter.
                await asyncio.sleep(0.001)
                continue
            room = self._room
            if room is None:  # shared: every waiter is woken by the same drain
                room = self._room = asyncio.get_running_loop().create_future()
            await asyncio.shield(room)

    def _wake_room(self) -> None:
        room, self._room = self._room, None
        if room is not None and not room.done():
            room.set_result(None)

    def write_out(self, messages: bool = True) -> None:
        """Write everything pending now, past ``write_buffer``: before a close
        frame, so the client still gets the acks and errors that explain it.
        The pass's direct write goes first: what queued behind it must not
        arrive without it (a resume from the last id would skip the hole).
        ``messages`` False (a slow consumer, which would not take them): only
        the control frames — the welcome above all, whose position is where a
        client that got no message resumes from."""
        if self.closed:
            return
        entries = self.entries
        if messages:
            noted = self.flusher.take_noted(self)
            if noted:
                self.written += len(noted)
                try:
                    self.wire.send(noted)  # framed already (the raw write, as the pass would)
                except RuntimeError:
                    return  # the connection is gone (uvloop raises): nothing more to write
        else:
            entries = [e for e in entries if e[1] == CONTROL]  # the pass's direct write is a message
        if entries:
            data = b"".join([e[0] for e in entries])
            self.entries.clear()
            self.held.queued -= self.bytes
            self.bytes = 0
            self.written += len(data)
            self.wire.write(data)

    def close(self) -> None:
        self.closed = True
        self.on_overflow = _closed  # not the session's method: no cycle, the session is freed at once
        self.entries.clear()
        held = self.held
        held.queued -= self.bytes
        held.sampled -= self.sampled
        self.bytes = self.sampled = 0
        self._wake_room()
        waiter = self.waiter
        if waiter is not None and waiter is not asyncio.current_task():
            waiter.cancel()

    def sample_wire(self, buffered: int) -> None:
        """Note what its transport holds now (``buffered``: its link's
        periodic tick read it), in place of the last note, in held.sampled."""
        if not self.closed:  # a closed queue's note left the total with it
            self.held.sampled += buffered - self.sampled
            self.sampled = buffered

    def pending_bytes(self) -> int:
        """What it holds now, queued and in its transport (one connection's, read now)."""
        return self.bytes + (0 if self.closed else self.wire.buffered())


def _closed(stalled: bool) -> None:
    """A closed queue's overflow: nothing to do (and no reference to a session)."""
