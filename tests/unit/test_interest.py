"""Reference-counted interest (broker/interest.py): one acquire per key however many
wants, release after the last unwant (optionally delayed)."""

from __future__ import annotations

import asyncio
import random

import pytest

from broker.interest import Interest


class Recorder:
    """acquire/release actions that record calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.live: dict[str, int] = {}  # acquired minus released, per key
        self.overlaps = 0  # an acquire while the key was already acquired
        self.fail_next = 0

    def acquire(self, key: str) -> None:
        self.calls.append(("acquire", key))
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("broker says no")
        if self.live.get(key, 0):
            self.overlaps += 1
        self.live[key] = self.live.get(key, 0) + 1

    def release(self, key: str) -> None:
        self.calls.append(("release", key))
        self.live[key] = self.live.get(key, 0) - 1

    def count(self, kind: str, key: str = "k") -> int:
        return self.calls.count((kind, key))


def consistent(interest: Interest, rec: Recorder, key: str = "k") -> None:
    held = interest.keys().count(key) == 1
    assert rec.overlaps == 0, "acquired twice without a release in between"
    assert rec.live.get(key, 0) == (1 if held else 0)
    assert (interest.count(key) > 0) <= held  # wanted implies held (no delay here)


def test_acquire_once_for_many_wants_release_after_last_unwant() -> None:
    rec = Recorder()
    interest = Interest(rec.acquire, rec.release)
    for _ in range(5):
        interest.want("k")
    assert rec.calls == [("acquire", "k")]
    assert interest.count("k") == 5
    assert interest.held == 1
    for left in (4, 3, 2, 1):
        interest.unwant("k")
        assert interest.count("k") == left
        assert rec.count("release") == 0
    interest.unwant("k")
    assert rec.calls == [("acquire", "k"), ("release", "k")]
    assert interest.count("k") == 0
    assert interest.held == 0
    assert interest.keys() == []


def test_keys_are_independent() -> None:
    rec = Recorder()
    interest = Interest(rec.acquire, rec.release)
    interest.want("a")
    interest.want("b")
    interest.want("a")
    assert sorted(interest.keys()) == ["a", "b"]
    interest.unwant("b")
    assert interest.keys() == ["a"]
    assert rec.calls == [("acquire", "a"), ("acquire", "b"), ("release", "b")]


def test_unbalanced_unwant_is_harmless() -> None:
    rec = Recorder()
    interest = Interest(rec.acquire, rec.release)
    interest.unwant("k")
    assert interest.count("k") == 0
    interest.want("k")
    interest.unwant("k")
    interest.unwant("k")
    assert rec.calls == [("acquire", "k"), ("release", "k")]
    assert interest.count("k") == 0
    interest.want("k")
    assert interest.count("k") == 1  # no negative count carried over
    assert rec.count("acquire") == 2


def test_failing_acquire_leaves_no_count() -> None:
    rec = Recorder()
    interest = Interest(rec.acquire, rec.release)
    rec.fail_next = 1
    with pytest.raises(ConnectionError):
        interest.want("k")
    assert interest.count("k") == 0
    assert interest.held == 0
    assert rec.count("release") == 0
    # The next want tries again and succeeds; one unwant then releases.
    interest.want("k")
    assert interest.count("k") == 1
    assert interest.held == 1
    interest.unwant("k")
    assert interest.held == 0
    assert rec.calls == [("acquire", "k"), ("acquire", "k"), ("release", "k")]


def test_randomised_wants_and_unwants_never_double_acquire() -> None:
    for seed in range(30):
        rnd = random.Random(seed)
        rec = Recorder()
        interest = Interest(rec.acquire, rec.release)
        wanted = 0
        for _ in range(200):
            if wanted and rnd.random() < 0.5:
                interest.unwant("k")
                wanted -= 1
            else:
                interest.want("k")
                wanted += 1
            assert interest.count("k") == wanted, seed
            consistent(interest, rec)


async def test_unwant_during_a_pending_release_schedules_no_second_one() -> None:
    rec = Recorder()
    interest = Interest(rec.acquire, rec.release, release_delay=0.02)
    interest.want("k")
    interest.unwant("k")
    interest.unwant("k")  # unbalanced while the release waits
    await asyncio.sleep(0.05)
    assert rec.calls == [("acquire", "k"), ("release", "k")]
    interest.want("k")
    assert interest.held == 1


async def test_release_delay_delays_and_a_want_cancels_it() -> None:
    rec = Recorder()
    interest = Interest(rec.acquire, rec.release, release_delay=0.05)
    interest.want("k")
    interest.unwant("k")
    assert interest.held == 1  # still subscribed during the delay
    assert interest.count("k") == 0
    await asyncio.sleep(0.02)
    interest.want("k")  # e.g. a page reload: the pending release is cancelled
    await asyncio.sleep(0.08)
    assert interest.held == 1
    assert interest.count("k") == 1
    assert rec.calls == [("acquire", "k")]  # acquire not called again, release never called


async def test_release_delay_releases_after_the_delay() -> None:
    rec = Recorder()
    interest = Interest(rec.acquire, rec.release, release_delay=0.03)
    interest.want("k")
    interest.unwant("k")
    assert rec.count("release") == 0
    await asyncio.sleep(0.08)
    assert interest.held == 0
    assert rec.calls == [("acquire", "k"), ("release", "k")]
    interest.want("k")  # a later want acquires again
    assert rec.count("acquire") == 2


async def test_release_delay_want_then_unwant_again_restarts_the_delay() -> None:
    rec = Recorder()
    interest = Interest(rec.acquire, rec.release, release_delay=0.05)
    interest.want("k")
    interest.unwant("k")
    await asyncio.sleep(0.03)
    interest.want("k")
    interest.unwant("k")
    await asyncio.sleep(0.035)  # 0.065 after the first unwant: the first timer would have fired
    assert interest.held == 1
    await asyncio.sleep(0.06)
    assert interest.held == 0
    assert rec.calls == [("acquire", "k"), ("release", "k")]


async def test_release_all() -> None:
    rec = Recorder()
    interest = Interest(rec.acquire, rec.release, release_delay=10.0)
    interest.want("a")
    interest.want("a")
    interest.want("b")
    interest.want("c")
    interest.unwant("c")  # pending delayed release
    interest.release_all()
    assert interest.held == 0
    assert interest.keys() == []
    assert interest.count("a") == 0
    assert sorted(k for kind, k in rec.calls if kind == "release") == ["a", "b", "c"]
    await asyncio.sleep(0)
    assert len([c for c in rec.calls if c[0] == "release"]) == 3  # the cancelled timer does not fire
    interest.want("a")
    assert rec.count("acquire", "a") == 2
