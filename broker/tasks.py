"""Background tasks that nobody awaits."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def spawn(tasks: set[asyncio.Task[Any]], coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Run ``coro`` in a task held in ``tasks`` until it ends: the loop keeps
    only weak references, so an unheld task can vanish before it is done.
    ``tasks`` is also what an owner cancels or awaits when it closes."""
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task
