"""Running a job's concurrent parts: all succeed, or the first failure cancels the rest."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any


async def run_all(coroutines: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run ``coroutines`` concurrently; the first failure cancels the others and is raised.

    asyncio tasks rather than an anyio task group: a task cancelled before its first step
    still closes its coroutine, where a task-group child cancelled that early leaves one
    never awaited (a RuntimeWarning per cancelled part). And the caller gets the failure
    itself, not an exception group around it.
    """
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()  # a no-op for the ones that finished
        await asyncio.gather(*tasks, return_exceptions=True)
