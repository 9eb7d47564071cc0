"""Background work of a node: a job's concurrent parts (``run_all``), and the one owner of
every task the node starts (``TaskOwner``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
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


class TaskOwner:
    """The one owner of a node's background tasks: keyed jobs (a pipeline's warm job, one
    per key), and loose ones (loops, re-warms, origin closers). ``stop()`` cancels and awaits
    every one, so nothing outlives the node.

    ``cancel`` may be called from worker threads (evictions run there): it hands the
    cancellation to the loop, since ``Task.cancel`` is not thread-safe.
    """

    def __init__(self) -> None:
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._loose: set[asyncio.Task[Any]] = set()
        self._finishing: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop tasks run on (for calls from other threads)."""
        self._loop = loop

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def spawn(
        self, coroutine: Coroutine[Any, Any, Any], *, name: str, finish: bool = False
    ) -> asyncio.Task[Any]:
        """A loose task, awaited on stop; cancelled first unless ``finish`` (a clean-up such
        as closing an origin's connections must run to its end)."""
        task = asyncio.create_task(coroutine, name=name)
        group = self._finishing if finish else self._loose
        group.add(task)
        task.add_done_callback(group.discard)
        return task

    def spawn_soon(self, factory: Callable[[], Coroutine[Any, Any, Any]], *, name: str) -> None:
        """``spawn`` from any thread; dropped when the loop is not running (a node that has
        not started picks the work up in ``start``)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(lambda: self.spawn(factory(), name=name))

    def start_job(
        self, key: str, coroutine: Coroutine[Any, Any, None], *, on_done: Callable[[], None]
    ) -> asyncio.Task[None]:
        """The job of ``key`` (the caller cancelled any previous one); ``on_done`` runs when
        it ends, after it is no longer listed."""
        task = asyncio.create_task(coroutine, name=key)
        self._jobs[key] = task

        def done(_: asyncio.Task[None]) -> None:
            if self._jobs.get(key) is task:  # not a newer job of the same key
                del self._jobs[key]
            on_done()

        task.add_done_callback(done)
        return task

    def has_jobs(self) -> bool:
        return bool(self._jobs)

    def cancel_job(self, key: str) -> None:
        task = self._jobs.pop(key, None)
        if task is None:
            return
        loop = self._loop
        if loop is not None and not loop.is_closed() and not _on_loop(loop):
            loop.call_soon_threadsafe(task.cancel)
        else:
            task.cancel()

    def cancel_all(self) -> None:
        """Cancel every job and loose task (not the clean-ups)."""
        for task in [*self._jobs.values(), *self._loose]:
            task.cancel()

    async def stop(self) -> None:
        """Cancel every job and loose task, let the clean-ups finish, and wait for all of
        them (tasks spawned meanwhile too)."""
        while self._jobs or self._loose or self._finishing:
            self.cancel_all()
            tasks = [*self._jobs.values(), *self._loose, *self._finishing]
            self._jobs.clear()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loose.difference_update(tasks)
            self._finishing.difference_update(tasks)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
