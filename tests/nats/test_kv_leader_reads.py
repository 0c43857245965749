"""Herald's KV reads ask the bucket stream's leader, even when the bucket
allows direct gets (made beforehand by nats.go or the nats CLI, which turn
``allow_direct`` on). A direct get may be answered by a replica behind the
leader: on a 3-server cluster with such buckets, in the second after a
leader stepdown, about 1 user in 20 at their limit of one connection was
refused after closing their last one, and 1 read position in 10 was read
behind what was just stored (its inbox messages handed out again as
unread). Seen on a cluster only (tests/system/test_replica_reads.py); here,
on one server, the API the reads ask is checked."""

from __future__ import annotations

import uuid

import nats
import pytest
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig, StorageType

from broker import Delivery
from broker.channels import Subjects
from broker.embedded import NatsServer
from broker.hooks import HookSource
from broker.jetstream import NatsConfig

from ..helpers import wait_for
from .test_lean_requests import started_broker

BUCKETS = ("conns", "read", "presence", "nodes")


@pytest.mark.timeout(30)
async def test_kv_reads_ask_the_leader_even_if_the_bucket_allows_direct_gets(nats_server: NatsServer) -> None:
    name = f"kvl{uuid.uuid4().hex[:8]}"
    stream = name.upper()
    watcher = await nats.connect(nats_server.url)
    asked: dict[str, int] = {"direct": 0, "leader": 0}

    async def seen(msg: Msg) -> None:
        kind = "direct" if msg.subject.startswith("$JS.API.DIRECT.GET.") else "leader"
        asked[kind] += 1

    try:
        js = watcher.jetstream()
        for bucket in BUCKETS:
            ttl = NatsConfig().presence_ttl if bucket == "nodes" else None  # as the nodes make it
            config = KeyValueConfig(
                bucket=f"{stream}_{bucket}", history=1, ttl=ttl, storage=StorageType.MEMORY, direct=True
            )
            await js.create_key_value(config)
        kv_streams = [f"KV_{stream}_{bucket}" for bucket in BUCKETS]
        for kv_stream in kv_streams:
            await watcher.subscribe(f"$JS.API.DIRECT.GET.{kv_stream}.>", cb=seen)
            await watcher.subscribe(f"$JS.API.STREAM.MSG.GET.{kv_stream}", cb=seen)
        await watcher.flush()
        broker = await started_broker(nats_server, name, list[Delivery]())
        source = HookSource((nats_server.url,), Subjects(name, f"{name}_live"), stream, ack_wait=5.0)
        try:
            await source.start()
            user = "alice"
            await broker.connections.open(user, "c1", 1, close_oldest=False)
            counted_out = broker.connections.close(user, "c1")
            assert counted_out is not None
            await counted_out
            await broker.reads.advance(user, 1)
            assert await broker.reads.position(user) == 1
            assert await source.read_position(user) == 1
            assert not await source.online(user)
            await watcher.flush()
            # A read at least each: the table's (counting in), the position's (advance, position), the hooks' two.
            await wait_for(lambda: sum(asked.values()) >= 5)
        finally:
            await source.close()
            await broker.close()
        assert asked["direct"] == 0, asked
    finally:
        await watcher.close()
