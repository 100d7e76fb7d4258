"""How many runs the node hands its sandbox pool at once: a limit that can change while waiters wait.

Runs handed to the pool count as started (a suspension pauses them instead of handing them back),
and a batch of them crosses to a worker in one frame. Tiny tasks need deep batches (one frame per
task costs more than the task); long tasks gain nothing from them, and every run queued in the pool
is one the node can no longer hand back when its owner needs the machine. So the depth follows the
measured task time (batching.runs_per_slot), which an asyncio.Semaphore of fixed size cannot do.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from types import TracebackType


class RunGate:
    """An async context manager admitting at most `limit` holders, first come first served."""

    def __init__(self, limit: int) -> None:
        self._limit = max(1, limit)
        self.inside = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, limit: int) -> None:
        """Takes effect at once for waiters; holders above a lowered limit finish as usual."""
        self._limit = max(1, limit)
        self._wake()

    async def __aenter__(self) -> None:
        if self.inside < self._limit and not self._waiters:
            self.inside += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.inside -= 1  # admitted and cancelled in the same step: pass the place on
                self._wake()
            else:
                with contextlib.suppress(ValueError):  # `_wake` may have dropped it already
                    self._waiters.remove(waiter)
            raise
        # `_wake` counted us in when it admitted us

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.inside -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.inside < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.inside += 1
                waiter.set_result(None)
