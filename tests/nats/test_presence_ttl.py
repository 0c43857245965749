"""presence.ttl against a "<stream>_nodes" bucket made earlier with another TTL:
the bucket kept the TTL it was made with, and a node with a longer one was
"taken for a dead one" every ttl/3 (joins and leaves again, counts dropped)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest


async def test_a_bucket_made_with_a_shorter_ttl_does_not_make_the_node_flap(
    node_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    shared = {"subject": {"prefix": "ttlmix"}, "stream": {"name": "TTLMIX", "storage": "memory"}}
    first = await node_factory(presence={"ttl": 1.0}, **shared)  # makes TTLMIX_nodes with a 1 s TTL
    await first.stop()
    caplog.set_level(logging.WARNING, logger="herald.presence")
    await node_factory(presence={"ttl": 6.0}, **shared)  # refreshes every 2 s: its key expires after 1 s
    await asyncio.sleep(4.5)
    flaps = [r.getMessage() for r in caplog.records if "taken for a dead one" in r.getMessage()]
    # Either the node refuses to start (presence.ttl does not match the bucket), or it uses the bucket's
    # TTL / updates the bucket: it must not be taken for dead while it is alive.
    assert not flaps, flaps
