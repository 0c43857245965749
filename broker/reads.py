"""Each user's read position in the stream, cluster-wide (a KV bucket)."""

from __future__ import annotations

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from .base import BrokerUnavailable
from .kv import bind_bucket, compare_and_set, key_token, storage_type
from .link import NatsLink


class KvReadPositions:
    """``broker.roles.ReadPositions``: one KV key per user, moved forward only
    (compare-and-set), so tabs racing each other never go back."""

    def __init__(self, bucket: str, link: NatsLink) -> None:
        self.bucket = bucket
        self._link = link
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
        self._link.jetstream()  # fails at once while NATS is away
        if self._kv is None:
            raise BrokerUnavailable("read positions are not available yet")
        return self._kv

    async def position(self, user: str) -> int:
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
