"""Backpressure: at most ``max_concurrency`` requests run, at most ``max_queue`` wait.

The gate lives on the event loop (every call is made from it, so it needs no lock). A
request that finds every slot busy waits in a FIFO queue; when the queue is full it is
refused (the app answers 429 with ``Retry-After``). A waiting request whose client
disconnects is cancelled by Quart while it waits, leaves the queue and never reaches the
backend ("dropped"). A freed slot is handed straight to the next waiter, so a newcomer
cannot overtake the queue.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable

__all__ = ["Admission", "QueueFull"]


class QueueFull(Exception):
    """Every slot is busy and the wait queue is full."""


class Admission:
    """A FIFO admission gate.

    Args:
        max_running: requests admitted at once (>= 1).
        max_queue: requests that may wait (>= 0).
        on_change: called with ``(running, queued)`` after every change (metrics).
    """

    def __init__(self, max_running: int, max_queue: int,
                 on_change: Callable[[int, int], None] | None = None) -> None:
        self.max_running = max_running
        self.max_queue = max_queue
        self.running = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._on_change = on_change

    @property
    def queued(self) -> int:
        """Requests waiting now."""
        return len(self._waiters)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.running, len(self._waiters))

    async def acquire(self) -> bool:
        """Take a slot, waiting in line if needed. Returns True if the request had to
        wait. Raises :class:`QueueFull`, or ``CancelledError`` when the waiting task is
        cancelled (the client left): the request then holds no slot."""
        if self.running < self.max_running and not self._waiters:
            self.running += 1
            self._changed()
            return False
        if len(self._waiters) >= self.max_queue:
            raise QueueFull()
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._changed()
        try:
            await fut  # release() hands its slot over: ``running`` already counts us
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # got a slot in the same tick as the cancel: pass it on
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
                self._changed()
            raise
        return True

    def fail_waiters(self, exc: BaseException) -> int:
        """Refuse every waiting request with ``exc`` (shutdown); returns how many."""
        n = 0
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)
                n += 1
        self._changed()
        return n

    def release(self) -> None:
        """Give a slot back (to the next live waiter, if any)."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                self._changed()
                return
        self.running = max(0, self.running - 1)
        self._changed()
