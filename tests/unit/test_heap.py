"""gateway/heap.py: freed heap memory handed back to the OS on a timer."""

from __future__ import annotations

import asyncio
import random

import pytest

from gateway.heap import malloc_trim, trim_heap_every


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0])


@pytest.mark.skipif(malloc_trim() is None, reason="not glibc: no malloc_trim")
def test_a_trim_gives_back_freed_heap_pages_below_live_ones() -> None:
    trim = malloc_trim()
    assert trim is not None
    trim()
    rnd = random.Random(1)
    blobs = [bytes(rnd.randint(600, 60_000)) for _ in range(3000)]  # heap-sized: under glibc's mmap threshold
    kept = blobs[::3]  # live ones among the freed: the heap's top cannot shrink past them
    del blobs
    before = rss_kib()
    trim()
    after = rss_kib()
    assert before - after > 30_000, f"RSS {before} KiB -> {after} KiB"  # ~60 MB freed below live blobs
    assert len(kept) == 1000


async def test_trims_on_the_timer_until_stopped() -> None:
    trims: list[float] = []
    loop = asyncio.get_running_loop()
    stop = trim_heap_every(loop, 0.02, lambda: trims.append(loop.time()) or 1)
    await asyncio.sleep(0.11)
    stop()
    done = len(trims)
    await asyncio.sleep(0.06)
    assert 3 <= done == len(trims)


async def test_without_a_trim_function_nothing_is_scheduled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.heap.malloc_trim", lambda: None)
    stop = trim_heap_every(asyncio.get_running_loop(), 0.01)
    stop()  # and stopping it is harmless


async def test_an_interval_of_zero_never_trims() -> None:
    trims: list[int] = []
    stop = trim_heap_every(asyncio.get_running_loop(), 0, lambda: trims.append(1) or 1)
    await asyncio.sleep(0.05)
    stop()
    assert trims == []
