"""Reading what a stream holds on some subjects, as of one moment.

An ephemeral pull consumer (no acks, in memory, one replica) is created; the
number of messages it has pending then is what is read, and nothing after. It
ends on its own: no end mark to wait for, unlike a KV watcher (nats-py's can
put its mark early, nats-io/nats.py#842, or, when a delivery is lost under
load, never), and writes arriving meanwhile do not keep it going. Used for
replays longer than a direct get's batch and for listing KV keys.

A one-replica consumer of a replicated stream is placed on any of the
stream's servers (nats-server picks one at random), and it reads that
server's copy, which may be behind the leader: a message the publisher has an
ack for may not be there yet. A read that must not miss such messages names
them (``reach``: per subject, its last sequence as the leader said before the
read), and goes on, waiting for that copy, until it has read them — or the
leader no longer holds them (retention dropped them meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Mapping
from typing import TypeVar

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy

FETCH_BATCH = 500

T = TypeVar("T")

# A replicated stream answers 503 for a moment after a leader change: try again.
_BRIEFLY_UNAVAILABLE = (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError)

# While a copy catches up, how often the leader is asked whether the messages
# awaited are still held: retention (max_age, max_bytes) may drop them
# meanwhile, and then they never come.
CATCH_UP_CHECK = 0.25

# A pull request's answers that end it: no (more) messages now, its wait expired.
_END_OF_REQUEST = ("404", "408")
# A pull request to a consumer not reachable yet is asked again 10, 20, 40…
# ms later, at most this far apart, until the read's timeout (a server that
# was stopped for a moment can take a while to announce its new consumer).
_UNREACHABLE_PAUSE_MAX = 0.2


def snapshot_config(
    name: str, filters: list[str], start_seq: int = 1, last_per_subject: bool = False, headers_only: bool = False
) -> ConsumerConfig:
    """The consumer of one snapshot: from ``start_seq``, or only the last
    message of each subject; ``headers_only`` leaves payloads out (a key
    listing needs none)."""
    if last_per_subject:
        policy: dict[str, object] = {"deliver_policy": DeliverPolicy.LAST_PER_SUBJECT}
    else:
        policy = {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": start_seq}
    return ConsumerConfig(
        name=name,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=30.0,
        mem_storage=True,
        num_replicas=1,
        headers_only=headers_only or None,
        **({"filter_subject": filters[0]} if len(filters) == 1 else {"filter_subjects": filters}),
        **policy,  # type: ignore[arg-type]
    )


async def read_snapshot(
    js: JetStreamContext,
    stream: str,
    config: ConsumerConfig,
    take: Callable[[Msg], T | None],
    limit: int,
    timeout: float,
    reach: Mapping[str, int] | None = None,
) -> list[T]:
    """``take(msg)`` of each message the consumer has pending when created,
    oldest first, at most ``limit`` (None results are left out) — and, while
    the consumer's copy of the stream is behind ``reach`` (subject → sequence
    it must read up to), what comes after, until it has caught up. Raises
    TimeoutError or nats.errors.Error if the stream cannot be read."""
    assert config.name is not None
    start = config.opt_start_seq or 1
    unmet = {subject: seq for subject, seq in (reach or {}).items() if seq >= start}
    found: list[T] = []
    try:
        info = await _add_consumer(js, stream, config)
        pending = min(int(info.num_pending or 0), limit)
        if pending or unmet:
            puller = await Puller.open(js, stream, config.name, timeout)
            deadline = asyncio.get_running_loop().time() + timeout
            try:
                read = 0
                while read < limit and (read < pending or unmet):
                    if read < pending:
                        batch = await puller.pull(min(FETCH_BATCH, pending - read))
                        if not batch:
                            pending = read  # fewer than it had: some were removed meanwhile
                    else:
                        batch = await _next_held(js, stream, puller, unmet, deadline)  # a copy behind the leader
                    for msg in batch:
                        read += 1
                        item = take(msg)
                        if item is not None:
                            found.append(item)
                        meta = msg.metadata
                        if unmet and meta.sequence.stream >= unmet.get(msg.subject, 1 << 63):
                            del unmet[msg.subject]
                        # No more (fewer if some were removed meanwhile); while
                        # catching up, all this copy holds so far.
                        if meta.num_pending == 0 or unmet:
                            pending = min(read + meta.num_pending, limit)
            finally:
                await puller.close()
    finally:
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, config.name)
    return found


class Puller:
    """Pull requests to one consumer, answered on one subscription of its own.

    Not nats-py's ``fetch``: when the consumer lives on another server whose
    interest has not reached ours yet (it was just created), a pull request
    has no responders; ``fetch`` of one message raises for it, and of several
    waits out its whole timeout. Here it is asked again, soon, until then."""

    def __init__(self, nc: Client, sub: Subscription, api: str, timeout: float) -> None:
        self._nc = nc
        self._sub = sub
        self._api = api
        self._timeout = timeout

    @classmethod
    async def open(cls, js: JetStreamContext, stream: str, consumer: str, timeout: float) -> Puller:
        nc: Client = js._nc  # the JetStream context's client (nats-py keeps it there)
        sub = await nc.subscribe(nc.new_inbox())
        return cls(nc, sub, f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}", timeout)

    async def pull(self, batch: int) -> list[Msg]:
        """What the consumer has now, up to ``batch`` messages."""
        return await self._request(batch, wait=False)

    async def next(self, timeout: float | None = None) -> list[Msg]:
        """The next message the consumer gets, within ``timeout`` (default: the
        puller's), else TimeoutError."""
        got = await self._request(1, wait=True, timeout=timeout)
        if not got:
            raise TimeoutError
        return got

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()

    async def _request(self, batch: int, wait: bool, timeout: float | None = None) -> list[Msg]:
        """One pull request (asked again while the consumer is not reachable,
        until the timeout): what it brings."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._timeout if timeout is None else timeout)
        got: list[Msg] = []
        for attempt in itertools.count():
            left = deadline - loop.time()
            request = {"batch": batch, "expires": int(left * 1e9)} if wait else {"batch": batch, "no_wait": True}
            await self._nc.publish(self._api, orjson.dumps(request), reply=self._sub.subject)
            while len(got) < batch:
                msg = await self._sub.next_msg(timeout=max(0.0, deadline - loop.time()))
                if msg.reply:  # a stored message (its reply subject carries its metadata)
                    got.append(msg)
                    continue
                status = (msg.headers or {}).get("Status")
                if status in _END_OF_REQUEST:
                    return got
                elif status == "503":
                    break  # no responders: not reachable yet
                elif status != "100":  # 100: a heartbeat
                    raise nats.js.errors.APIError.from_msg(msg)
            else:
                return got
            pause = min(_UNREACHABLE_PAUSE_MAX, 0.01 * 2**attempt)
            if loop.time() + pause >= deadline:
                break
            await asyncio.sleep(pause)
        raise nats.js.errors.ServiceUnavailableError(description="the consumer is not reachable")


async def _next_held(
    js: JetStreamContext, stream: str, puller: Puller, unmet: dict[str, int], deadline: float
) -> list[Msg]:
    """The next message of a copy catching up with the leader, before
    ``deadline`` (else TimeoutError); [] once every message awaited (``unmet``)
    has left the stream meanwhile: retention dropped it, it will never come."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return await puller.next(max(0.001, min(CATCH_UP_CHECK, deadline - loop.time())))
        except TimeoutError:
            if loop.time() >= deadline:
                raise
        missing = []
        for subject, seq in unmet.items():
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.get_msg(stream, seq)
                continue
            missing.append(subject)
        if missing:
            last = (await js.stream_info(stream)).state.last_seq or 0
            for subject in missing:
                if unmet[subject] <= last:
                    del unmet[subject]  # stored, and no longer held: dropped (not yet stored: wait on)
        if not unmet:
            return []


async def _add_consumer(js: JetStreamContext, stream: str, config: ConsumerConfig, tries: int = 4) -> ConsumerInfo:
    for attempt in range(tries):
        try:
            return await js.add_consumer(stream, config=config)
        except _BRIEFLY_UNAVAILABLE:
            if attempt == tries - 1:
                raise
            await asyncio.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")
