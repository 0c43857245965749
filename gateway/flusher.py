"""The node's flusher: each event-loop pass's writes to every connection,
and the fan-out's fast path that notes a delivery's write without queueing
it (see outbound.py for the per-connection queues it writes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from .metrics import LatencyHistogram
from .outbound import LIVE, HeldBytes, Outbound, Write


class Flusher:
    """Writes what queues got, once per event-loop pass: owns each pass's writes.

    The common case — a connection with nothing pending that gets one message
    in a loop pass — never touches the queue: ``fan_out`` checks the
    connection's limits and notes the write itself: the message's frame,
    encoded once, not per recipient. That is the cost of every delivery, so
    it is kept to a few attribute reads per recipient. Anything else (a
    second message in the same pass, a backed-up or closed connection) goes
    through ``push`` and ``flush``, after the direct writes so that order
    holds.
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
        self.held = HeldBytes()  # what the queues it writes hold (herald_outbound_queue_bytes)
        # This node's wall clock minus the stream's (BrokerEvents.clock_offset):
        # a delivery's latency is the stream's "now" minus its stream timestamp.
        self.clock_offset = 0.0

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
        return self._writes[queue.noted_slot][2] if queue.noted_pass == self._pass else b""

    def take_noted(self, queue: Outbound) -> bytes:
        """``noted``, which the caller writes itself: the pass will not."""
        data = self.noted(queue)
        if data:
            self._writes[queue.noted_slot] = (queue, queue.wire.send, b"")
        return data

    def fan_out(self, queues: list[Outbound], frame: bytes, ts: float, droppable: bool) -> None:
        """``push(frame, LIVE, ts, droppable)`` to every queue of ``queues``
        (one transport's recipients of one live message)."""
        size = len(frame)
        this_pass = self._pass
        writes = self._writes
        metrics = queues[0].metrics
        direct = 0
        for queue in queues:
            if (
                queue.noted_pass == this_pass  # already written to in this pass: queue behind that write
                or queue.entries
                or queue.waiter is not None
                or queue.closed
                or queue.flusher is not self
                or queue.metrics is not metrics
            ):
                queue.push(frame, LIVE, ts, droppable)
                continue
            wire = queue.wire
            wire_bytes = wire.buffered()
            limits = queue.limits
            if wire_bytes >= limits.write_buffer or size + wire_bytes > limits.max_bytes:
                queue.push(frame, LIVE, ts, droppable)
                continue
            queue.noted_pass = this_pass
            queue.noted_slot = len(writes)
            queue.wire_bytes = wire_bytes + size
            if wire_bytes:  # counted only where a stall check may look: the socket holds some
                queue.written += size
            writes.append((queue, wire.send, frame))
            direct += 1
        if direct:
            metrics.delivered += direct
            self._stamps.append((ts, direct, metrics.latency))
            self._schedule()

    def _run(self) -> None:
        self._scheduled = False
        self.flushing = self._pass
        self._pass += 1
        now = time.time() - self.clock_offset
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
