"""Small asyncio helpers."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

K = TypeVar("K")
T = TypeVar("T")


async def cancel_and_wait(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel the tasks and wait until they are done.

    On Python 3.11, ``asyncio.wait_for`` (which redis-py uses for socket timeouts)
    swallows a cancellation that arrives just as the call it guards completes; the task
    then runs on. So cancel again until every task has ended."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    await asyncio.gather(*tasks, return_exceptions=True)


class SingleFlight(Generic[K, T]):
    """One run of a piece of work per key at a time: callers that come while it runs
    wait for that run instead of starting their own. A caller cancelled while it waits
    (its deadline) only stops waiting; the run goes on for the others. A failure reaches
    every waiter and is not kept: the next caller runs the work again."""

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Task[T]] = {}

    async def run(self, key: K, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
        task = self._running.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(work())
            self._running[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        return await asyncio.shield(task)

    def running(self, key: K) -> asyncio.Task[T] | None:
        """The run under way for ``key`` (None: none, or it was forgotten)."""
        return self._running.get(key)

    def forget(self, key: K) -> None:
        """The run under way, if any, is no longer the one for ``key``: its waiters still
        get its result, the next caller starts a new run."""
        self._running.pop(key, None)

    def _done(self, key: K, task: asyncio.Task[T]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()  # retrieved: the waiters (if any are left) have it
