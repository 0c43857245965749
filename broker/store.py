"""Reading the stream back, and the users' read positions (a KV bucket)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy, KeyValueConfig
from nats.js.kv import KeyValue

from .base import BrokerUnavailable, Delivery
from .channels import DEFAULT_EVENT, EVENT_RE
from .kv import bind_bucket, compare_and_set, key_token, storage_type

EVENT_HEADER = "Herald-Event"
FETCH_BATCH = 500


def event_of(headers: dict[str, str]) -> str:
    """The message's event name; a malformed one (it would break SSE framing) is replaced."""
    event = headers.get(EVENT_HEADER, DEFAULT_EVENT)
    if event is not DEFAULT_EVENT and EVENT_RE.fullmatch(event) is None:
        return DEFAULT_EVENT
    return event


# A replicated stream answers 503 for a moment after a leader change: try again.
_BRIEFLY_UNAVAILABLE = (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError)


async def _add_consumer(js: JetStreamContext, stream: str, config: ConsumerConfig, tries: int = 4) -> ConsumerInfo:
    for attempt in range(tries):
        try:
            return await js.add_consumer(stream, config=config)
        except _BRIEFLY_UNAVAILABLE:
            if attempt == tries - 1:
                raise
            await asyncio.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


async def read_stored(
    js: JetStreamContext,
    stream: str,
    filters: Sequence[str],
    after_seq: int,
    limit: int,
    name: str,
    channel_of: Callable[[str], str | None],
    timeout: float,
) -> list[Delivery]:
    """Stored messages on ``filters`` after ``after_seq``, oldest first, at most
    ``limit``: an ephemeral pull consumer (no acks) read until nothing is
    pending, then deleted."""
    config = ConsumerConfig(
        name=name,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=after_seq + 1,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=30.0,
        mem_storage=True,
        num_replicas=1,
        **({"filter_subject": filters[0]} if len(filters) == 1 else {"filter_subjects": list(filters)}),
    )
    found: list[Delivery] = []
    try:
        info = await _add_consumer(js, stream, config)
        pending = min(int(info.num_pending or 0), limit)
        if pending:
            sub = await js.pull_subscribe_bind(name, stream=stream)
            try:
                read = 0
                while read < pending:
                    batch = await sub.fetch(min(FETCH_BATCH, pending - read), timeout=timeout)
                    for msg in batch:
                        read += 1
                        delivery = _stored(msg, channel_of)
                        if delivery is not None:
                            found.append(delivery)
                        if msg.metadata.num_pending == 0:
                            pending = read
            finally:
                await sub.unsubscribe()
    except (TimeoutError, nats.errors.Error) as exc:
        raise BrokerUnavailable(f"reading the stream failed: {exc.__class__.__name__}: {exc}") from None
    finally:
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, name)
    return found


def _stored(msg: Msg, channel_of: Callable[[str], str | None]) -> Delivery | None:
    channel = channel_of(msg.subject)
    if channel is None:
        return None
    meta = msg.metadata
    return Delivery(channel, meta.sequence.stream, 0, meta.timestamp.timestamp(), event_of(msg.headers or {}), msg.data)


async def first_sequence(js: JetStreamContext, stream: str) -> int:
    """The lowest sequence the stream still holds."""
    try:
        info = await js.stream_info(stream)
    except (TimeoutError, nats.errors.Error) as exc:
        raise BrokerUnavailable(f"stream info failed: {exc.__class__.__name__}") from None
    return int(info.state.first_seq or 0)


async def last_sequence(js: JetStreamContext, stream: str, subject: str) -> int | None:
    """The last sequence stored on ``subject``: 0 if none, None if unknown."""
    try:
        msg = await js.get_msg(stream, subject=subject, direct=True)
    except nats.js.errors.NotFoundError:
        return 0
    except (TimeoutError, nats.errors.Error, AttributeError, KeyError):
        return None  # an old server without direct get, an odd reply: read the stream instead
    return int(msg.seq or 0) or None


class ReadPositions:
    """Each user's read position, cluster-wide: one KV key per user, moved
    forward only (compare-and-set), so tabs racing each other never go back."""

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        self._kv: KeyValue | None = None

    async def ensure(self, js: JetStreamContext, replicas: int, storage: str) -> None:
        self._kv = await bind_bucket(
            js,
            KeyValueConfig(
                bucket=self.bucket,
                description="Herald: read position per user",
                history=1,
                replicas=replicas,
                storage=storage_type(storage),
            ),
        )

    def _bucket(self) -> KeyValue:
        if self._kv is None:
            raise BrokerUnavailable("read positions are not available yet")
        return self._kv

    async def get(self, user: str) -> int:
        kv = self._bucket()
        try:
            entry = await kv.get(key_token(user))
        except nats.js.errors.NotFoundError:  # never set, or deleted
            return 0
        except (TimeoutError, nats.errors.Error) as exc:
            raise BrokerUnavailable(f"read position lookup failed: {exc.__class__.__name__}") from None
        return int(entry.value or b"0")

    async def advance(self, user: str, seq: int) -> int:
        stored = seq

        def forward(value: bytes | None) -> bytes | None:
            nonlocal stored
            current = int(value or b"0")
            if current >= seq:
                stored = current
                return None
            stored = seq
            return str(seq).encode()

        try:
            # Each conflict is another tab moving the position forward: it ends
            # once ours is no longer ahead; the bound only guards against a bug.
            done = await compare_and_set(self._bucket(), key_token(user), forward, tries=1000)
        except (TimeoutError, nats.errors.Error) as exc:
            raise BrokerUnavailable(f"storing the read position failed: {exc.__class__.__name__}") from None
        if not done:
            raise BrokerUnavailable("read position kept changing under us")
        return stored
