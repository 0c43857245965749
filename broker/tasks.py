"""Background tasks that nobody awaits."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def spawn(tasks: set[asyncio.Task[Any]], coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Run ``coro`` in a task held in ``tasks`` until it ends: the loop keeps
    only weak references, so an unheld task can vanish before it is done.
    ``tasks`` is also what an owner cancels or awaits when it closes."""
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task


def shielded(tasks: set[asyncio.Task[Any]], coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """``asyncio.shield`` of ``coro``, run in a task held in ``tasks`` (see
    ``spawn``) whose failure counts as read: a shield cancelled first no
    longer passes its task's outcome on, and a failure after that would be
    logged as "never retrieved"."""
    task = spawn(tasks, coro)
    task.add_done_callback(failure_read)
    return asyncio.shield(task)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], tries: int = 10) -> None:
    """Cancel ``tasks`` and wait until they have ended. A cancel can be
    lost: Python 3.11's ``asyncio.wait_for`` (under nats-py's requests)
    returns a result that arrives together with the cancel and drops the
    cancel, and a loop around the request goes on. Those still running are
    cancelled again (every 0.5 s, ``tries`` times; then they are left)."""
    left = {task for task in tasks if not task.done()}
    for _ in range(tries):
        if not left:
            return
        for task in left:
            task.cancel()
        done, left = await asyncio.wait(left, timeout=0.5)
        for task in done:
            if not task.cancelled():
                task.exception()  # retrieved: ending with an error is no news at close


def failure_read(future: asyncio.Future[Any]) -> None:
    """Done callback of a future several waiters share: its failure counts as
    read. Each waiter still there gets it; when all have gone (a client left,
    the node stops) asyncio would log it as "never retrieved"."""
    if not future.cancelled():
        future.exception()
