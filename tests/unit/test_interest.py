"""Reference-counted interest (broker/interest.py): one acquire per key however many
wants, release after the last unwant (optionally delayed), serialised per key."""

from __future__ import annotations

import asyncio
import random

import pytest

from broker.interest import Interest


class Recorder:
    """acquire/release actions that record calls and can suspend like a network broker."""

    def __init__(self, yields: int = 0, rnd: random.Random | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.live: dict[str, int] = {}  # acquired minus released, per key
        self.overlaps = 0  # an acquire while the key was already acquired
        self.yields = yields
        self.rnd = rnd
        self.fail_next = 0

    async def _pause(self) -> None:
        n = self.rnd.randint(0, self.yields) if self.rnd else self.yields
        for _ in range(n):
            await asyncio.sleep(0)

    async def acquire(self, key: str) -> None:
        self.calls.append(("acquire", key))
        await self._pause()
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("broker says no")
        if self.live.get(key, 0):
            self.overlaps += 1
        self.live[key] = self.live.get(key, 0) + 1

    async def release(self, key: str) -> None:
        self.calls.append(("release", key))
        self.live[key] = self.live.get(key, 0) - 1
        await self._pause()

    def count(self, kind: str, key: str = "k") -> int:
        return self.calls.count((kind, key))


def consistent(interest: Interest, rec: Recorder, key: str = "k") -> None:
    held = interest.keys().count(key) == 1
    assert rec.overlaps == 0, "acquired twice without a release in between"
    assert rec.live.get(key, 0) == (1 if held else 0)
    assert (interest.count(key) > 0) <= held  # wanted implies held (no delay here)


async def test_acquire_once_for_many_wants_release_after_last_unwant() -> None:
    rec = Recorder()
    interest = Interest(rec.acquire, rec.release)
    for _ in range(5):
        await interest.want("k")
    assert rec.calls == [("acquire", "k")]
    assert interest.count("k") == 5
    assert interest.held == 1
    for left in (4, 3, 2, 1):
        await interest.unwant("k")
        assert interest.count("k") == left
        assert rec.count("release") == 0
    await interest.unwant("k")
    assert rec.calls == [("acquire", "k"), ("release", "k")]
    assert interest.count("k") == 0
    assert interest.held == 0
    assert interest.keys() == []


async def test_keys_are_independent() -> None:
    rec = Recorder()
    interest = Interest(rec.acquire, rec.release)
    await interest.want("a")
    await interest.want("b")
    await interest.want("a")
    assert sorted(interest.keys()) == ["a", "b"]
    await interest.unwant("b")
    assert interest.keys() == ["a"]
    assert rec.calls == [("acquire", "a"), ("acquire", "b"), ("release", "b")]


async def test_unbalanced_unwant_is_harmless() -> None:
    rec = Recorder()
    interest = Interest(rec.acquire, rec.release)
    await interest.unwant("k")
    assert interest.count("k") == 0
    await interest.want("k")
    await interest.unwant("k")
    await interest.unwant("k")
    assert rec.calls == [("acquire", "k"), ("release", "k")]
    assert interest.count("k") == 0
    await interest.want("k")
    assert interest.count("k") == 1  # no negative count carried over
    assert rec.count("acquire") == 2


async def test_concurrent_want_unwant_ends_consistent() -> None:
    rec = Recorder()
    interest = Interest(rec.acquire, rec.release)
    await asyncio.gather(*(interest.want("k") for _ in range(100)))
    assert rec.calls == [("acquire", "k")]
    assert interest.count("k") == 100
    await asyncio.gather(*(interest.unwant("k") for _ in range(60)), *(interest.want("k") for _ in range(10)))
    assert interest.count("k") == 50
    assert rec.calls == [("acquire", "k")]
    await asyncio.gather(*(interest.unwant("k") for _ in range(50)))
    assert interest.count("k") == 0
    assert interest.held == 0
    consistent(interest, rec)


async def test_concurrent_cycles_with_a_suspending_broker_end_consistent() -> None:
    """Many users want/unwant one key concurrently; acquire/release suspend once each."""
    rec = Recorder(yields=1)
    interest = Interest(rec.acquire, rec.release)

    async def user(i: int) -> None:
        for _ in range(i % 3):
            await asyncio.sleep(0)
        await interest.want("k")
        await asyncio.sleep(0)
        await interest.unwant("k")

    await asyncio.gather(*(user(i) for i in range(50)))
    assert interest.count("k") == 0
    consistent(interest, rec)


async def test_randomised_concurrent_cycles_never_double_acquire() -> None:
    for seed in range(30):
        rec = Recorder(yields=2, rnd=random.Random(seed))
        interest = Interest(rec.acquire, rec.release)
        rnd = random.Random(seed + 1000)

        async def user(delays: tuple[int, int], interest: Interest = interest) -> None:
            for _ in range(delays[0]):
                await asyncio.sleep(0)
            await interest.want("k")
            for _ in range(delays[1]):
                await asyncio.sleep(0)
            await interest.unwant("k")

        await asyncio.gather(*(user((rnd.randint(0, 3), rnd.randint(0, 3))) for _ in range(50)))
        assert interest.count("k") == 0, seed
        consistent(interest, rec)


async def test_want_queued_behind_a_release_is_not_raced_by_a_new_lock() -> None:
    gate = asyncio.Event()
    releasing = asyncio.Event()
    acquired = 0
    released = 0

    async def acquire(key: str) -> None:
        nonlocal acquired
        acquired += 1
        await asyncio.sleep(0)  # a network round trip

    async def release(key: str) -> None:
        nonlocal released
        released += 1
        releasing.set()
        await gate.wait()

    interest = Interest(acquire, release)
    await interest.want("k")
    a = asyncio.create_task(interest.unwant("k"))  # last unwant: releasing, holds the key's lock
    await releasing.wait()
    b = asyncio.create_task(interest.want("k"))  # queues on the lock
    await asyncio.sleep(0)
    gate.set()  # A finishes: unlocks (waking B) and forgets the lock
    await asyncio.sleep(0)
    c = asyncio.create_task(interest.want("k"))  # runs before or alongside B
    await asyncio.gather(a, b, c)
    assert interest.count("k") == 2
    assert acquired - released == 1, f"{acquired} acquires, {released} releases for one held key"


async def test_failing_acquire_leaves_no_count() -> None:
    rec = Recorder()
    interest = Interest(rec.acquire, rec.release)
    rec.fail_next = 1
    with pytest.raises(ConnectionError):
        await interest.want("k")
    assert interest.count("k") == 0
    assert interest.held == 0
    assert rec.count("release") == 0
    # The next want tries again and succeeds; one unwant then releases.
    await interest.want("k")
    assert interest.count("k") == 1
    assert interest.held == 1
    await interest.unwant("k")
    assert interest.held == 0
    assert rec.calls == [("acquire", "k"), ("acquire", "k"), ("release", "k")]


async def test_failing_acquire_with_others_waiting() -> None:
    rec = Recorder(yields=1)
    interest = Interest(rec.acquire, rec.release)
    rec.fail_next = 1
    results = await asyncio.gather(*(interest.want("k") for _ in range(3)), return_exceptions=True)
    assert sum(isinstance(r, ConnectionError) for r in results) == 1
    assert interest.count("k") == 2
    assert interest.held == 1
    assert rec.count("acquire") == 2  # the failed one, then one success for the two others


async def test_cancelled_acquire_leaves_no_count() -> None:
    started = asyncio.Event()

    async def slow_acquire(key: str) -> None:
        started.set()
        await asyncio.sleep(10)

    async def release(key: str) -> None:
        raise AssertionError("nothing was acquired")

    interest = Interest(slow_acquire, release)
    task = asyncio.create_task(interest.want("k"))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert interest.count("k") == 0
    assert interest.held == 0


async def test_release_delay_delays_and_a_want_cancels_it() -> None:
    rec = Recorder()
    interest = Interest(rec.acquire, rec.release, release_delay=0.05)
    await interest.want("k")
    await interest.unwant("k")
    assert interest.held == 1  # still subscribed during the delay
    assert interest.count("k") == 0
    await asyncio.sleep(0.02)
    await interest.want("k")  # e.g. a page reload: the pending release is cancelled
    await asyncio.sleep(0.08)
    assert interest.held == 1
    assert interest.count("k") == 1
    assert rec.calls == [("acquire", "k")]  # acquire not called again, release never called


async def test_release_delay_releases_after_the_delay() -> None:
    rec = Recorder()
    interest = Interest(rec.acquire, rec.release, release_delay=0.03)
    await interest.want("k")
    await interest.unwant("k")
    assert rec.count("release") == 0
    await asyncio.sleep(0.08)
    assert interest.held == 0
    assert rec.calls == [("acquire", "k"), ("release", "k")]
    await interest.want("k")  # a later want acquires again
    assert rec.count("acquire") == 2


async def test_release_delay_want_then_unwant_again_restarts_the_delay() -> None:
    rec = Recorder()
    interest = Interest(rec.acquire, rec.release, release_delay=0.05)
    await interest.want("k")
    await interest.unwant("k")
    await asyncio.sleep(0.03)
    await interest.want("k")
    await interest.unwant("k")
    await asyncio.sleep(0.035)  # 0.065 after the first unwant: the first timer would have fired
    assert interest.held == 1
    await asyncio.sleep(0.06)
    assert interest.held == 0
    assert rec.calls == [("acquire", "k"), ("release", "k")]


async def test_release_all() -> None:
    rec = Recorder()
    interest = Interest(rec.acquire, rec.release, release_delay=10.0)
    await interest.want("a")
    await interest.want("a")
    await interest.want("b")
    await interest.want("c")
    await interest.unwant("c")  # pending delayed release
    await interest.release_all()
    assert interest.held == 0
    assert interest.keys() == []
    assert interest.count("a") == 0
    assert sorted(k for kind, k in rec.calls if kind == "release") == ["a", "b", "c"]
    await asyncio.sleep(0)
    assert len([c for c in rec.calls if c[0] == "release"]) == 3  # the cancelled timer does not fire
    await interest.want("a")
    assert rec.count("acquire", "a") == 2
