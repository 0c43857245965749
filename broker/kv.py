"""Small helpers shared by the KV buckets Herald keeps (read positions,
presence, connections per user)."""

from __future__ import annotations

import base64
import dataclasses
import logging
import uuid
from collections.abc import Callable

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from .acks import AckedPublisher, Refused
from .link import NatsLink
from .lookup import LastMessage
from .snapshot import read_snapshot, snapshot_config

log = logging.getLogger("herald.kv")

# A listing reads what the bucket holds when it starts; this bounds a read
# that stalls (the server answers within milliseconds otherwise).
KEYS_TIMEOUT = 2.0
_GONE = ("DEL", "PURGE")  # KV-Operation of a deleted or purged key
# JetStream's "wrong last sequence" (nats-py's KeyWrongLastSequenceError): another write got in first.
_WRONG_LAST = (10071, 10164)


def storage_type(storage: str) -> StorageType:
    """``stream.storage`` ("file" | "memory") as JetStream's enum."""
    return StorageType.MEMORY if storage == "memory" else StorageType.FILE


def key_token(text: str) -> str:
    """``text`` as one KV key token: ids may hold ':', '@', '+', which keys may not."""
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def from_key_token(token: str) -> str:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()


async def bind_bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """The bucket if it exists (another node made it), else a new one; read
    from its leader either way (``leader_reads``)."""
    try:
        return leader_reads(await js.key_value(config.bucket))
    except nats.js.errors.BucketNotFoundError:
        return leader_reads(await js.create_key_value(config))


def leader_reads(kv: KeyValue) -> KeyValue:
    """``kv`` with its gets asked of the stream's leader (``STREAM.MSG.GET``),
    even if the bucket allows direct gets (nats.go and the nats CLI make
    buckets so; Herald does not). A direct get may be answered by a copy a
    write behind the leader (now and then; often after a leader change): a
    table still holding a connection just counted out refuses a user under
    their limit, a read position behind hands read messages out again."""
    kv._direct = False  # what nats-py's get chooses by (Bucket's own reads ask the leader always)
    return kv


class Bucket:
    """One KV bucket's hot-path reads and checked writes, through the reply
    inbox (``LastMessage``, ``AckedPublisher``): what nats-py's ``get``,
    ``create`` and ``update`` do — same requests, same rules — without its
    per-request machinery. Fails with BrokerUnavailable; while NATS
    reconnects, waits for it within ``timeout`` (as nats-py does)."""

    def __init__(self, link: NatsLink, kv: KeyValue, timeout: float) -> None:
        # The bucket's stream and key prefix, as nats-py's KeyValue keeps them;
        # read from the leader whatever the bucket allows (see leader_reads).
        self._prefix = kv._pre
        self._last = LastMessage(link.replies, kv._stream, timeout, buffered=True)
        self._acks = AckedPublisher(link, kv._stream, timeout, buffered=True, resend=True)

    async def get(self, key: str) -> tuple[bytes | None, int]:
        """The key's value (None: never set, deleted or purged) and the
        revision a write must expect (0: no message on the key at all; a
        deleted key's is its delete marker's)."""
        stored = await self._last.get(self._prefix + key)
        if stored is None:
            return None, 0
        if stored.headers.get("KV-Operation") in _GONE:
            return None, stored.seq
        return stored.data, stored.seq

    async def write(self, key: str, value: bytes, revision: int, ttl: int = 0) -> int:
        """Store ``value`` if the key's last revision is still ``revision``
        (0: the key has no message): its new revision; 0 if it is not.
        ``ttl``: seconds after which the server removes it, key and all
        (0: never; the bucket must allow it, ``allow_message_ttls``)."""
        headers = {"Nats-Expected-Last-Subject-Sequence": str(revision)}
        if ttl:
            headers["Nats-TTL"] = f"{ttl}s"
        message = (self._prefix + key, value, headers)
        try:
            (ack,) = await self._acks.publish([message])
        except Refused as refused:
            if refused.code in _WRONG_LAST:
                return 0
            raise
        return ack.seq


# A key's value (None: absent) and the revision a write over it must expect.
Current = tuple[bytes | None, int]


async def compare_and_set(
    bucket: Bucket,
    key: str,
    change: Callable[[bytes | None], bytes | None],
    tries: int,
    known: Current | None = None,
    ttl: Callable[[bytes], int] | None = None,
) -> Current | None:
    """Write ``change(current value)`` (None: the key is absent) unless another
    writer got in between, in which case look again. ``change`` returning None
    leaves the key as it is. ``known``: the value and revision to try first
    (what this writer last wrote): no read when nobody wrote since (a write
    proves it; that nothing needs writing is checked on a read). ``ttl``:
    the TTL of a new value (see ``Bucket.write``). Returns the key's value
    and revision as this left them, or None after ``tries`` conflicts in a row."""
    for _ in range(tries):
        guessed = known is not None
        value, revision = known or await bucket.get(key)
        known = None
        new = change(value)
        if new is None:
            if guessed:
                continue  # nothing to write, judged on what may be stale: judged again on a read
            return value, revision
        # Over a deleted key, the write expects its delete marker (what
        # nats-py's create() finds out with a second get after a conflict).
        written = await bucket.write(key, new, revision, ttl(new) if ttl is not None else 0)
        if written:
            return new, written
        # Changed meanwhile: look again.
    return None


async def allow_message_ttls(js: JetStreamContext, kv: KeyValue) -> bool:
    """Whether values of ``kv`` may carry a TTL of their own (nats-server
    2.11+; buckets nats-py makes allow it), turned on if the bucket does not."""
    try:
        info = await js.stream_info(kv._stream)  # the bucket's stream, as nats-py's KeyValue keeps it
        if not info.config.allow_msg_ttl:
            info = await js.update_stream(dataclasses.replace(info.config, allow_msg_ttl=True))
    except nats.errors.Error as exc:
        log.warning("bucket %s: its values cannot expire on their own (%r): emptied keys stay", kv._stream, exc)
        return False
    return bool(info.config.allow_msg_ttl)


async def live_keys(kv: KeyValue, pattern: str) -> list[str]:
    """Keys matching ``pattern`` (NATS wildcards) that hold a value, filtered
    by the server: the last message of each key, as of one moment (see
    snapshot.py; nats-py's ``keys()`` and watchers wait for an end mark).
    Every write the leader acked before the call is seen, whichever copy of a
    replicated bucket the read lands on."""
    # The bucket's JetStream context, stream and subject prefix, as nats-py's
    # KeyValue keeps them (set in its constructor since nats-py 2.0).
    js, stream, prefix = kv._js, kv._stream, kv._pre
    subject = prefix + pattern
    try:
        # The last message on these keys, as the leader says: the read goes at
        # least that far (a copy behind it would miss keys already acked).
        last = await js.get_msg(stream, subject=subject)
        reach = {last.subject: last.seq} if last.subject and last.seq else {}
    except nats.js.errors.NotFoundError:
        reach = {}

    def entry(msg: Msg) -> tuple[str, bool]:
        headers = msg.headers or {}
        gone = headers.get("KV-Operation") in _GONE or "Nats-Marker-Reason" in headers
        return msg.subject[len(prefix) :], not gone

    config = snapshot_config(uuid.uuid4().hex, [subject], last_per_subject=True, headers_only=True)
    entries = await read_snapshot(js, stream, config, entry, 1 << 31, KEYS_TIMEOUT, reach)
    # A copy catching up delivers a key's later messages after its last one
    # as of the read's start: the latest says whether it holds a value.
    latest = dict(entries)
    return [key for key, held in latest.items() if held]
