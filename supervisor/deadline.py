"""``within(awaitable, seconds)``: ``asyncio.wait_for`` without its Python 3.11 cancellation bug.

On 3.11, ``wait_for`` returns the result and drops a ``cancel()`` that arrives in the same loop
iteration in which the awaited call completes (CPython gh-86296), so a cancelled side task can
keep running and shutdown waits for it forever. ``asyncio.timeout`` does not have that problem.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[T], seconds: float) -> T:
    """Await ``aw``; raise :class:`TimeoutError` after ``seconds``."""
    async with asyncio.timeout(seconds):
        return await aw
