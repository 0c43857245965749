"""Reading the stream back, and the users' read positions (a KV bucket)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from .base import BrokerUnavailable, Delivery
from .channels import DEFAULT_EVENT, EVENT_RE
from .kv import bind_bucket, compare_and_set, key_token, storage_type
from .snapshot import read_snapshot, snapshot_config

EVENT_HEADER = "Herald-Event"


def event_of(headers: dict[str, str]) -> str:
    """The message's event name; a malformed one (it would break SSE framing) is replaced."""
    event = headers.get(EVENT_HEADER, DEFAULT_EVENT)
    if event is not DEFAULT_EVENT and EVENT_RE.fullmatch(event) is None:
        return DEFAULT_EVENT
    return event


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
    """Stored messages on ``filters`` after ``after_seq``, oldest first, at most ``limit``."""
    config = snapshot_config(name, list(filters), start_seq=after_seq + 1)
    try:
        return await read_snapshot(js, stream, config, lambda msg: _stored(msg, channel_of), limit, timeout)
    except (TimeoutError, nats.errors.Error) as exc:
        raise BrokerUnavailable(f"reading the stream failed: {exc.__class__.__name__}: {exc}") from None


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
    """The last sequence stored on ``subject``: 0 if none, None if unknown.
    Asked of the stream leader: a direct get may be answered by a replica
    that is behind, and "nothing after the position" from it would skip
    messages the publisher already has acks for (ADR-31: stale reads)."""
    try:
        msg = await js.get_msg(stream, subject=subject, direct=False)
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
