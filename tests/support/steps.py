"""Driving interleavings step by step: wait for a state another task reaches."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


async def until(condition: Callable[[], bool], *tasks: asyncio.Task[Any],
                most: int | None = None) -> None:
    """Until ``condition`` holds, looked at every 5 ms; a task that ends first (it should
    not) fails the test; with ``most``, so does not holding after that many looks."""
    looks = 0
    while not condition():
        for task in tasks:
            if task.done():
                raise AssertionError(f"ended too early: {task.result()!r}")
        looks += 1
        if most is not None and looks >= most:
            raise AssertionError("condition never held")
        await asyncio.sleep(0.005)
