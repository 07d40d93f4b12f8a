"""One read at a time per key: the requests that need the same thing meanwhile share it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from contextvars import Context
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """``run(key, read)``: ``read()`` once for all the callers of ``key`` while it runs,
    instead of each asking the stores again (a cache entry expiring under load). Each
    caller's wait is shielded: one cancelled caller does not cancel the others' read.

    The read runs in a context of its own, not its first caller's: it serves every caller,
    so its log lines name neither that caller's request id nor its staff agent."""

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Future[T]] = {}

    async def run(self, key: Hashable, read: Callable[[], Coroutine[Any, Any, T]]) -> T:
        running = self._running.get(key)
        if running is None:
            running = asyncio.get_running_loop().create_task(read(), context=Context())
            self._running[key] = running
            running.add_done_callback(lambda done: self._done(key, done))
        return await asyncio.shield(running)

    def forget(self, key: Hashable) -> None:
        """The next ``run`` of ``key`` reads afresh, whatever is running (what it reads is
        known to be old)."""
        self._running.pop(key, None)

    def _done(self, key: Hashable, done: asyncio.Future[T]) -> None:
        if self._running.get(key) is done:  # not one started since a forget()
            del self._running[key]
        if not done.cancelled():
            done.exception()  # retrieved here; the callers get it from the shield
