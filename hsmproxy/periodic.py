"""One background refresher: run ``work`` every ``interval`` seconds and at once on :meth:`notify`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("hsmproxy")


class Refresher:
    """Calls ``work`` every ``interval`` seconds, or sooner after :meth:`notify`; a failing call is
    logged (``failure`` says what is kept) and the next one runs on schedule."""

    def __init__(
        self, work: Callable[[], Awaitable[object]], interval: float, name: str, failure: str
    ) -> None:
        self.work = work
        self.interval = interval
        self.name = name
        self.failure = failure
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def notify(self) -> None:
        """Run soon (something changed)."""
        self._wake.set()

    def start(self) -> None:
        """Start the background task."""
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            try:
                await self.work()
            except Exception:
                log.exception("%s: %s", self.name, self.failure)

    async def stop(self) -> None:
        """Stop the background task (a call in progress is cancelled)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
