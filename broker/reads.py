"""Each user's read position in the stream, cluster-wide (a KV bucket)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig

from .base import BrokerStats, BrokerUnavailable
from .kv import Bucket, allow_message_ttls, bind_bucket, compare_and_set, key_token, storage_type
from .link import NatsLink
from .readmark import decode, encode, trusted
from .throttle import Throttle

log = logging.getLogger("herald.reads")
warn = Throttle(log)
# A stored position outlives its last move by history.user_max_age and this:
# by then every message at or before it is past the inbox's age (it was
# published before the move), so the key can go — the user, as one that
# never read, is handed the same inbox — and the bucket does not keep a key
# for every user that ever read. The margin covers the clocks' differences.
READ_MARGIN = 86400.0


class KvReadPositions:
    """``broker.roles.ReadPositions``: one KV key per user, moved forward only
    (compare-and-set), so tabs racing each other never go back; each stored
    with the stream it counts in (broker/readmark.py)."""

    def __init__(
        self,
        bucket: str,
        link: NatsLink,
        last: Callable[[], Awaitable[int]],
        stats: BrokerStats,
        timeout: float = 5.0,
        inbox_age: float = 0.0,
    ) -> None:
        self.bucket = bucket
        self._timeout = timeout  # of each KV request (the JetStream context's)
        self._inbox_age = inbox_age  # history.user_max_age (0: positions kept for ever)
        self._expiring = False  # whether positions are written with a TTL (see READ_MARGIN)
        self._link = link
        self._last = last  # the stream's last sequence now
        self._stats = stats
        self._kv: Bucket | None = None
        # The stream's incarnation (readmark.stream_id): set by the broker once it knows the stream.
        self.stream_id = ""

    async def ensure(self, js: JetStreamContext, replicas: int, storage: str) -> None:
        kv = await bind_bucket(
            js,
            KeyValueConfig(
                bucket=self.bucket,
                description="Herald: read position per user",
                history=1,
                replicas=replicas,
                storage=storage_type(storage),
            ),
        )
        self._kv = Bucket(self._link, kv, self._timeout)
        self._expiring = self._inbox_age > 0 and await allow_message_ttls(js, kv)

    def _bucket(self) -> Bucket:
        self._link.jetstream()  # fails at once while NATS is away
        if self._kv is None:
            raise BrokerUnavailable("read positions are not available yet")
        return self._kv

    async def position(self, user: str) -> int:
        kv = self._bucket()
        try:
            value, _ = await kv.get(key_token(user))
        except BrokerUnavailable as exc:
            raise BrokerUnavailable(f"read position lookup failed: {exc}") from None
        if value is None:  # never set, or deleted
            return 0
        seq, written_for = decode(value)
        stream = self.stream_id or written_for or ""  # the stream not known yet: judge by its end only
        # This stream's own positions were checked when written; others need the stream's end.
        last = seq if written_for == stream else await self._last()
        position, set_aside = trusted(value, stream, last)
        if set_aside:
            self._stats.read_positions_reset += 1
            warn(
                "reset",
                "read position %d of a user is not this stream's (recreated?) or past its end (%d): "
                "the user's held messages count as unread",
                seq,
                last,
            )
        return position

    async def advance(self, user: str, seq: int) -> int:
        stored = seq
        stream = self.stream_id
        last = 0  # the stream's end, read only to judge a position stored without its stream

        def forward(value: bytes | None) -> bytes | None:
            nonlocal stored
            current, written_for = decode(value)
            if written_for is None:
                # As ``position`` counts it: trusted up to the stream's end.
                current, _ = trusted(value, stream, last)
            elif written_for != stream:
                current = 0  # another stream's position: not ahead of anything
            if current >= seq:
                stored = current
                return None
            stored = seq
            return encode(seq, stream)

        kv = self._bucket()
        key = key_token(user)
        try:
            known = await kv.get(key)
            if known[0] is not None and decode(known[0])[1] is None:
                last = await self._last()
            # Each conflict is another tab moving the position forward: it ends
            # once ours is no longer ahead; the bound only guards against a bug.
            done = await compare_and_set(
                kv, key, forward, tries=1000, known=known, ttl=self._ttl if self._expiring else None
            )
        except BrokerUnavailable as exc:
            raise BrokerUnavailable(f"storing the read position failed: {exc}") from None
        if not done:
            raise BrokerUnavailable("read position kept changing under us")
        return stored

    def _ttl(self, _: bytes) -> int:
        return int(self._inbox_age + READ_MARGIN)
