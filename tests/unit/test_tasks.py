"""Ending background tasks at close (broker/tasks.py)."""

from __future__ import annotations

import asyncio

import pytest

from broker.tasks import cancel_and_wait


async def _loses_one_cancel(ticks: list[int]) -> None:
    """A loop whose first cancel is dropped, as Python 3.11's wait_for drops
    one that arrives with its result: the loop then goes on."""
    dropped = False
    while True:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if dropped:
                raise
            dropped = True
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        ticks.append(1)


async def test_a_task_that_lost_a_cancel_is_cancelled_again() -> None:
    ticks: list[int] = []
    task = asyncio.get_running_loop().create_task(_loses_one_cancel(ticks))
    await asyncio.sleep(0.03)
    await asyncio.wait_for(cancel_and_wait([task]), timeout=5)
    assert task.cancelled()


async def test_a_plain_cancel_and_gather_would_wait_for_ever() -> None:
    """What close did before (why the helper exists)."""
    task = asyncio.get_running_loop().create_task(_loses_one_cancel([]))
    await asyncio.sleep(0.03)
    task.cancel()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(asyncio.gather(task, return_exceptions=True)), timeout=0.3)
    await cancel_and_wait([task])


async def test_tasks_that_end_with_an_error_or_already_ended_are_fine() -> None:
    async def fails() -> None:
        raise RuntimeError("x")

    loop = asyncio.get_running_loop()
    failed, done = loop.create_task(fails()), loop.create_task(asyncio.sleep(0))
    await asyncio.sleep(0.01)
    await cancel_and_wait([failed, done])
    assert failed.done() and done.done()
