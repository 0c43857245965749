"""Small helpers shared by the KV buckets Herald keeps (read positions,
presence, connections per user)."""

from __future__ import annotations

import base64
from collections.abc import Callable

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue


def storage_type(storage: str) -> StorageType:
    """``stream.storage`` ("file" | "memory") as JetStream's enum."""
    return StorageType.MEMORY if storage == "memory" else StorageType.FILE


def key_token(text: str) -> str:
    """``text`` as one KV key token: ids may hold ':', '@', '+', which keys may not."""
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def from_key_token(token: str) -> str:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()


async def bind_bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """The bucket if it exists (another node made it), else a new one."""
    try:
        return await js.key_value(config.bucket)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(config)


async def compare_and_set(kv: KeyValue, key: str, change: Callable[[bytes | None], bytes | None], tries: int) -> bool:
    """Write ``change(current value)`` (None: the key is absent) unless another
    writer got in between, in which case look again. ``change`` returning None
    leaves the key as it is. False if ``tries`` conflicts in a row."""
    for _ in range(tries):
        try:
            entry = await kv.get(key)
            value, revision = entry.value or b"", entry.revision
        except nats.js.errors.NotFoundError:  # never set, or deleted
            value, revision = None, 0
        new = change(value)
        if new is None:
            return True
        try:
            if revision:
                await kv.update(key, new, last=revision)
            else:
                await kv.create(key, new)
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            continue  # changed meanwhile: look again
    return False
