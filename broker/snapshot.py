"""Reading what a stream holds on some subjects, as of one moment.

An ephemeral pull consumer (no acks, in memory, one replica) is created on the
stream leader; the number of messages it has pending then is what is read,
and nothing after. It ends on its own: no end mark to wait for, unlike a KV
watcher (nats-py's can put its mark early, nats-io/nats.py#842, or, when a
delivery is lost under load, never), and writes arriving meanwhile do not
keep it going. Used for replays and for listing KV keys.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy

FETCH_BATCH = 500

T = TypeVar("T")

# A replicated stream answers 503 for a moment after a leader change: try again.
_BRIEFLY_UNAVAILABLE = (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError)


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
) -> list[T]:
    """``take(msg)`` of each message the consumer has pending when created,
    oldest first, at most ``limit`` (None results are left out). Raises
    TimeoutError or nats.errors.Error if the stream cannot be read."""
    assert config.name is not None
    found: list[T] = []
    try:
        info = await _add_consumer(js, stream, config)
        pending = min(int(info.num_pending or 0), limit)
        if pending:
            sub = await js.pull_subscribe_bind(config.name, stream=stream)
            try:
                read = 0
                while read < pending:
                    batch = await sub.fetch(min(FETCH_BATCH, pending - read), timeout=timeout)
                    for msg in batch:
                        read += 1
                        item = take(msg)
                        if item is not None:
                            found.append(item)
                        if msg.metadata.num_pending == 0:  # the last one (fewer if some were removed meanwhile)
                            pending = read
            finally:
                await sub.unsubscribe()
    finally:
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, config.name)
    return found


async def _add_consumer(js: JetStreamContext, stream: str, config: ConsumerConfig, tries: int = 4) -> ConsumerInfo:
    for attempt in range(tries):
        try:
            return await js.add_consumer(stream, config=config)
        except _BRIEFLY_UNAVAILABLE:
            if attempt == tries - 1:
                raise
            await asyncio.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")
