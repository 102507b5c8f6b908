"""Awaiting a row that a worker will change (a run's end, an analysis job's answer), from a web request."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

Row = TypeVar("Row")


async def poll_until(
    fetch: Callable[[], Awaitable[Row]],
    done: Callable[[Row], bool],
    timeout: float,
    first_pause: float,
    pause_ceiling: float,
) -> Row:
    """fetch() until done(row) or `timeout` passes, the pause doubling up to pause_ceiling; the last row.

    Awaiting keeps Django's one sync thread free for the server's other requests."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pause = first_pause
    while True:
        row = await fetch()
        remaining = deadline - loop.time()
        if done(row) or remaining <= 0:
            return row
        await asyncio.sleep(min(pause, remaining))
        pause = min(pause * 2, pause_ceiling)
