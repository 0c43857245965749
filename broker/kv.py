"""Small helpers shared by the KV buckets Herald keeps (read positions,
presence, connections per user)."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable

import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from .snapshot import read_snapshot, snapshot_config

# A listing reads what the bucket holds when it starts; this bounds a read
# that stalls (the server answers within milliseconds otherwise).
KEYS_TIMEOUT = 2.0
_GONE = ("DEL", "PURGE")  # KV-Operation of a deleted or purged key


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


async def live_keys(kv: KeyValue, pattern: str) -> list[str]:
    """Keys matching ``pattern`` (NATS wildcards) that hold a value, filtered
    by the server: the last message of each key, as of one moment (see
    snapshot.py; nats-py's ``keys()`` and watchers wait for an end mark)."""
    # The bucket's JetStream context, stream and subject prefix, as nats-py's
    # KeyValue keeps them (set in its constructor since nats-py 2.0).
    js, stream, prefix = kv._js, kv._stream, kv._pre

    def key(msg: Msg) -> str | None:
        headers = msg.headers or {}
        if headers.get("KV-Operation") in _GONE or "Nats-Marker-Reason" in headers:
            return None
        return msg.subject[len(prefix) :]

    config = snapshot_config(uuid.uuid4().hex, [prefix + pattern], last_per_subject=True, headers_only=True)
    return await read_snapshot(js, stream, config, key, 1 << 31, KEYS_TIMEOUT)
