"""broker/coalesce.py: a burst of callers shares calls, and each is answered
by a call sent after it asked."""

from __future__ import annotations

import asyncio

import pytest

from broker.coalesce import Fresh


async def test_a_burst_costs_two_calls_and_every_answer_is_fresh() -> None:
    state = {"value": 0, "calls": 0}

    async def ask() -> int:
        state["calls"] += 1
        seen = state["value"]
        await asyncio.sleep(0.01)
        return seen

    fresh = Fresh(ask)
    first = asyncio.ensure_future(fresh.get())
    await asyncio.sleep(0.002)  # the first call is in flight, having seen 0
    state["value"] = 1  # what later callers ask after must be seen by their answer
    later = [asyncio.ensure_future(fresh.get()) for _ in range(50)]
    assert await first == 0
    assert await asyncio.gather(*later) == [1] * 50
    assert state["calls"] == 2


async def test_a_failure_reaches_every_waiter_and_the_next_call_goes_out() -> None:
    calls = 0

    async def ask() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("away")
        return 7

    fresh = Fresh(ask)
    results = await asyncio.gather(fresh.get(), fresh.get(), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert await fresh.get() == 7


async def test_a_waiter_cancelled_does_not_cancel_the_others() -> None:
    async def ask() -> int:
        await asyncio.sleep(0.01)
        return 3

    fresh = Fresh(ask)
    a, b = asyncio.ensure_future(fresh.get()), asyncio.ensure_future(fresh.get())
    await asyncio.sleep(0)
    a.cancel()
    assert await b == 3
    with pytest.raises(asyncio.CancelledError):
        await a


async def test_recent_takes_an_answer_young_enough_else_asks_again() -> None:
    calls = 0

    async def ask() -> int:
        nonlocal calls
        calls += 1
        return calls

    fresh = Fresh(ask)
    assert await fresh.recent(10) == 1  # none yet: asked
    assert await fresh.recent(10) == 1  # young enough
    assert await fresh.get() == 2  # get always asks
    await asyncio.sleep(0.03)
    assert await fresh.recent(0.01) == 3  # too old: asked again
    assert await fresh.recent(0) == 4  # 0: asked now, even within the same clock tick
    assert calls == 4


@pytest.mark.parametrize("started", [False, True], ids=["before-it-started", "waiting-for-the-call-in-flight"])
async def test_a_queued_call_cancelled_before_it_went_out_ends_its_waiters(started: bool) -> None:
    """A queued call's task cancelled before its call went out (it waits for
    the one in flight; or it had not started yet) left its answer pending:
    its waiters hung for good, and every later caller joined them."""
    release = asyncio.Event()
    calls = 0

    async def ask() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return calls

    fresh = Fresh(ask)
    first = asyncio.ensure_future(fresh.get())
    await asyncio.sleep(0.01)  # the first call is in flight
    before = set(fresh._tasks)
    queued = asyncio.ensure_future(fresh.get())
    await asyncio.sleep(0)  # its call is queued: a task made, not started yet
    (sender,) = fresh._tasks - before
    if started:
        await asyncio.sleep(0)  # it waits for the call in flight
    sender.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(queued, timeout=1.0)
    release.set()
    assert await first == 1
    assert await asyncio.wait_for(fresh.get(), timeout=1.0) == 2  # a new call, not the cancelled one
    assert calls == 2
