"""Small asyncio helpers."""

from __future__ import annotations

import asyncio
from typing import Any


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
