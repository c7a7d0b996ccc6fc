"""Running backend calls in the worker pool and bridging their output to the event loop.

A backend call runs in a thread of the app's dedicated ``ThreadPoolExecutor``. Its sink
hands events to the loop with ``loop.call_soon_threadsafe`` into one ``asyncio.Queue`` per
request; the request's async generator drains the queue, and its ``finally`` sets the
request's cancel flag, which covers client disconnect, timeouts and shutdown.
"""
from __future__ import annotations

import asyncio
import contextvars
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Executor, Future
from typing import Any, AsyncIterator, Callable, NamedTuple, Union

from tep.backend import StreamSink, current_cancel
from tep.errors import APIError

__all__ = ["run_blocking", "StreamBridge", "BACKLOG_MAX", "StreamEvent", "RoleEvent",
           "DeltaEvent", "FinishEvent", "ErrorEvent", "TimeoutEvent", "StreamStalled"]

class RoleEvent(NamedTuple):
    """Choice ``index`` announced its role (chat) before any text."""

    index: int
    role: str


class DeltaEvent(NamedTuple):
    """Choice ``index`` produced ``text`` (and the logprob entries of its tokens)."""

    index: int
    text: str
    logprobs: list


class FinishEvent(NamedTuple):
    """Choice ``index`` ended: why, how many tokens it made, its prompt length (if known)."""

    index: int
    reason: str
    completion_tokens: int
    prompt_tokens: int | None


class ErrorEvent(NamedTuple):
    """Choice ``index``'s backend call raised ``exc``."""

    index: int
    exc: BaseException


class TimeoutEvent(NamedTuple):
    """The request's generation deadline passed (its cancel flag is set)."""


StreamEvent = Union[RoleEvent, DeltaEvent, FinishEvent, ErrorEvent, TimeoutEvent]


# Most events a streaming backend may be ahead of its client (see StreamBridge._put).
BACKLOG_MAX = 256
# most an engine thread waits for a lagging event loop (see StreamBridge._put)
_STARVED_WAIT_S = 0.05


class StreamStalled(APIError):
    """A stream's client stopped reading (its buffer filled, or it read nothing for the
    stall timeout): the sequence was cancelled. Sent as the stream's last event."""

    status = 408
    type = "timeout_error"
    code = "stream_stalled"


async def run_blocking(executor: Executor, cancel: threading.Event,
                       fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in ``executor``; if the awaiting task is cancelled (client gone),
    set ``cancel`` so a backend polling its sink stops."""
    ctx = contextvars.copy_context()
    ctx.run(current_cancel.set, cancel)
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def done(cf: Future) -> None:  # in the worker thread (or here, if it failed at once)
        try:
            loop.call_soon_threadsafe(_settle, fut, cf)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    # Leaner than loop.run_in_executor (no two-way future chaining, one loop callback
    # per call): this runs once per request.
    executor.submit(ctx.run, fn, *args).add_done_callback(done)
    try:
        return await fut
    except asyncio.CancelledError:
        cancel.set()
        raise


def _settle(fut: asyncio.Future, cf: Future) -> None:
    """Copy a finished concurrent future's outcome onto ``fut`` (on the loop)."""
    if fut.cancelled():
        return
    if cf.cancelled():  # the pool shut down before the job ran
        fut.cancel()
        return
    exc = cf.exception()
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(cf.result())


class _LoopWaker:
    """Drains many bridges in one loop callback: an engine thread that hands a token to
    each of 64 streams per step then costs the loop one wake-up (one self-pipe write)
    per step instead of 64, and none while the loop has not yet run the last one."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._ready: list["StreamBridge"] = []
        self._scheduled = False
        # an engine thread's wait for a lagging loop timed out (StreamBridge._put): no
        # such wait, for any stream, until the loop runs the next wake-up
        self.wait_failed = False

    def request(self, bridge: "StreamBridge") -> None:
        """(any thread) Drain ``bridge`` on the loop soon."""
        with self._lock:
            self._ready.append(bridge)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._run)
        except RuntimeError:
            with self._lock:
                self._scheduled = False
            raise

    def wait_timed_out(self) -> None:
        """(an engine thread) A wait for the loop timed out: a loop that has not run the
        pending wake-up by then (stopped, or blocked) costs one such wait, not one per
        stream or per event, until it runs."""
        with self._lock:
            if self._scheduled:
                self.wait_failed = True

    def _run(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
            self._scheduled = False
            self.wait_failed = False
        for bridge in ready:
            bridge._drain()


_WAKERS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopWaker]" = \
    weakref.WeakKeyDictionary()
_WAKERS_LOCK = threading.Lock()


def _waker(loop: asyncio.AbstractEventLoop) -> _LoopWaker:
    w = _WAKERS.get(loop)
    if w is None:
        with _WAKERS_LOCK:
            w = _WAKERS.get(loop)
            if w is None:
                w = _WAKERS[loop] = _LoopWaker(loop)
    return w


class StreamBridge:
    """Runs one backend call per choice in the pool and yields their events in order.

    Events are :data:`StreamEvent` values (:class:`RoleEvent`, :class:`DeltaEvent`,
    :class:`FinishEvent`, :class:`ErrorEvent`, and :class:`TimeoutEvent` when a deadline
    passed, see :meth:`events`).
    ``sinks[i]`` is choice ``i``'s sink once its job has started (its ``n_tokens`` and
    ``prompt_tokens`` count what a cut-off choice produced).
    """

    def __init__(self, executor: Executor, cancel: threading.Event,
                 request_id: str = "?") -> None:
        self._executor = executor
        self.request_id = request_id
        self.cancel = cancel
        self._loop = asyncio.get_running_loop()
        # events handed to the loop, and the stream's wait for the next one (a deque
        # and one future: an asyncio.Queue costs several futures and calls per token)
        self._events: deque[StreamEvent] = deque()
        self._waiter: asyncio.Future | None = None
        self._running = 0
        self.sinks: dict[int, StreamSink] = {}
        # Events from worker threads wait here; one loop wake-up moves all of them, so a
        # fast backend does not pay a self-pipe write and a loop turn per token.
        self._pending: list[StreamEvent] = []
        self._pending_lock = threading.Lock()
        self._wake_scheduled = False
        # cleared by an engine thread that waits for the next drain (see _put)
        self._drained = threading.Event()
        # Backpressure: events produced but not yet taken by the stream. A backend that
        # gets BACKLOG_MAX ahead waits in its sink until the stream has sent half of
        # them, so a fast backend neither buffers without bound nor keeps the GIL from
        # the event loop (and from the other streams) while it runs ahead.
        self._backlog = 0
        self._room = threading.Event()
        self._room.set()
        # Engine streams cannot wait (see _put): their buffer is bounded by cancelling
        # the sequence once `_buffer_max` events are unread, or once events have waited
        # `_stall_s` seconds with none taken (set by watch()).
        self._buffer_max = 0           # 0 = unbounded (until watch())
        self._stall_s = 0.0
        self._since = 0.0              # monotonic time of the last take or first unread
        self.stalled: str | None = None   # why the stream was ended for its client
        self._stall_sent = False
        self._done = False

    def _put(self, item: StreamEvent, wait: bool = True) -> None:
        """Hand an event to the loop (from any thread). ``wait``: a worker-pool backend
        yields the GIL after a wake-up and waits while its backlog is full; an engine
        thread (``wait=False``) serves every stream, so it never waits for one client."""
        with self._pending_lock:
            self._pending.append(item)
            if self._backlog == 0:
                self._since = time.monotonic()
            self._backlog += 1
            full = self._backlog >= BACKLOG_MAX
            if full:
                self._room.clear()
            overflow = (not wait and self._buffer_max and self.stalled is None
                        and self._backlog >= self._buffer_max)
            if overflow:
                self.stalled = (f"the client read nothing while {self._backlog} events "
                                "waited (the stream's buffer is full)")
            wake = not self._wake_scheduled
            self._wake_scheduled = True
            # Half the buffer unread and the events handed over before this one still
            # not moved to the stream: the loop lags behind this stream (an engine thread
            # that holds the GIL between fast steps starves it, and a client that reads
            # would be cut as a stalled one).
            behind = (not wait and not wake and not overflow and self._buffer_max
                      and self._backlog >= max(1, self._buffer_max // 2)
                      and self.stalled is None and not self.cancel.is_set()
                      and not _waker(self._loop).wait_failed)
            if behind:
                self._drained.clear()
        if overflow:  # stop the sequence now: the engine drops it at its next step
            self.cancel.set()
        elif behind:
            # Let the loop drain this stream first (without the GIL, at most 50 ms). Also
            # paid, one loop round trip, by a slow client's stream that gets two events
            # within one loop turn while it is between half and all of its buffer behind.
            if not self._drained.wait(_STARVED_WAIT_S):
                _waker(self._loop).wait_timed_out()
        if wake:
            try:
                if wait:
                    self._loop.call_soon_threadsafe(self._drain)
                else:  # an engine thread: one loop wake-up for all its streams
                    _waker(self._loop).request(self)
            except RuntimeError:  # loop closed: the server is gone, stop generating
                self.cancel.set()
                return
            if not wait:
                return
            # A backend that never releases the GIL (pure-Python or instant) would
            # otherwise keep the loop waiting up to a switch interval before it sends.
            time.sleep(0)
        if full and wait:
            while not self._room.wait(0.05):
                if self.cancel.is_set():  # the stream is over: the sink says stop
                    return

    def _taken(self) -> None:
        """The stream took one event (on the loop): let a waiting backend go on once
        half of its backlog has been sent."""
        with self._pending_lock:
            self._since = time.monotonic()
            self._backlog -= 1
            if self._backlog <= BACKLOG_MAX // 2 and not self._room.is_set():
                self._room.set()

    def _drain(self) -> None:
        with self._pending_lock:
            items, self._pending = self._pending, []
            self._wake_scheduled = False
            if not self._drained.is_set():   # a waiter cleared it (a flag read, no lock)
                self._drained.set()
        stalled = self.stalled is not None and not self._stall_sent
        for item in items:
            if stalled and type(item) is FinishEvent:
                # the sequence ended because its client stalled: say so, not "length"
                self._end_stalled()
                stalled = False
            self._deliver(item)
        if stalled:
            self._end_stalled()

    def watch(self, buffer_events: int, stall_timeout: float) -> None:
        """Bound this stream for a client that stops reading (on the loop): once
        ``buffer_events`` events are unread, or unread events have waited
        ``stall_timeout`` seconds (0 = never) with none taken, the request's cancel flag
        is set (the engine drops the sequence, a worker-pool backend stops at its next
        token) and the stream ends with a :class:`StreamStalled` error event after what
        was already buffered."""
        self._buffer_max = max(1, int(buffer_events))
        self._stall_s = float(stall_timeout)
        if self._stall_s > 0:
            self._loop.call_later(min(self._stall_s, 1.0), self._check_stall)

    def _check_stall(self) -> None:
        """(loop timer) End the stream when its unread events are older than the stall
        timeout; re-arm while the stream lives."""
        if self._done or self._stall_sent or (self.cancel.is_set() and self.stalled is None):
            return  # the stream is over (its request released), or already ended
        with self._pending_lock:
            idle = self._backlog > 0 and time.monotonic() - self._since > self._stall_s
            if idle and self.stalled is None:
                self.stalled = (f"the client read nothing for {self._stall_s:g} s while "
                                "events waited")
        if self.stalled is not None:
            self.cancel.set()
            self._end_stalled()
            return
        self._loop.call_later(min(self._stall_s, 1.0), self._check_stall)

    def _end_stalled(self) -> None:
        """(loop) Queue the stream's final error event, once."""
        self._stall_sent = True
        self._deliver(ErrorEvent(-1, StreamStalled(
            f"the stream was ended: {self.stalled}")))

    def expire(self) -> None:
        """End the stream now (on the loop): the cancel flag is set and the stream gets a
        :class:`TimeoutEvent`, so every open choice finishes with "length"."""
        self.cancel.set()
        self._deliver(TimeoutEvent())

    def has_pending(self) -> bool:
        """Whether an event is ready for :meth:`events` without waiting."""
        return bool(self._events)

    def _deliver(self, item: StreamEvent) -> None:
        """(loop) Queue an event for :meth:`events` and wake it if it waits."""
        self._events.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _next(self) -> StreamEvent:
        """(loop) The next event, waiting for one."""
        while not self._events:
            w = self._waiter = self._loop.create_future()
            try:
                await w
            finally:
                self._waiter = None
        return self._events.popleft()

    def start(self, index: int, make_sink: Callable[..., StreamSink],
              call: Callable[[StreamSink], None]) -> None:
        """Start choice ``index``: ``make_sink(on_delta=..., on_role=...)`` builds its sink
        and ``call(sink)`` runs the backend in a worker thread."""
        put = self._put

        def on_delta(text: str, lps: list) -> None:
            put(DeltaEvent(index, text, lps))

        def on_role(role: str) -> None:
            put(RoleEvent(index, role))

        def job() -> None:
            try:
                sink = make_sink(on_delta=on_delta, on_role=on_role)
                self.sinks[index] = sink
                call(sink)
                reason = sink.close()
                put(FinishEvent(index, reason, sink.n_tokens, sink.prompt_tokens))
            except BaseException as e:  # reported to the client as an error event
                put(ErrorEvent(index, e))

        ctx = contextvars.copy_context()
        ctx.run(current_cancel.set, self.cancel)
        self._running += 1
        self._executor.submit(ctx.run, job)

    def start_submitted(self, index: int, make_sink: Callable[..., StreamSink],
                        submit: Callable[[StreamSink, Callable], None]) -> None:
        """Like :meth:`start`, for a backend with a non-blocking entry (e.g.
        :class:`tep.engine.EngineBackend`): ``submit(sink, on_done)`` queues the work and
        returns; the backend's own thread drives the sink and calls ``on_done(None | exc)``.
        No worker thread is held, and the sink never waits for the client (an engine
        thread serves every stream, so one slow client must not stall it)."""
        def put(item: StreamEvent) -> None:
            self._put(item, wait=False)

        sink = make_sink(on_delta=lambda text, lps: put(DeltaEvent(index, text, lps)),
                         on_role=lambda role: put(RoleEvent(index, role)))
        self.sinks[index] = sink

        def on_done(exc: BaseException | None) -> None:
            if exc is not None:
                put(ErrorEvent(index, exc))
            else:
                put(FinishEvent(index, sink.close(), sink.n_tokens, sink.prompt_tokens))

        self._running += 1
        try:
            submit(sink, on_done)
        except BaseException as e:  # refused at once (bad request): an error event
            put(ErrorEvent(index, e))

    async def events(self, deadline: float | None = None) -> AsyncIterator[StreamEvent]:
        """Events until every choice has finished, or up to and including an error.

        Args:
            deadline: ``loop.time()`` after which the cancel flag is set and a final
                :class:`TimeoutEvent` ends the iteration (None = no deadline).
        """
        try:
            while self._running:
                if self._events and (deadline is None or self._loop.time() < deadline):
                    ev = self._events.popleft()
                elif deadline is None:
                    ev = await self._next()
                else:
                    try:
                        ev = await asyncio.wait_for(self._next(),
                                                    max(0.0, deadline - self._loop.time()))
                    except asyncio.TimeoutError:
                        self.cancel.set()
                        yield TimeoutEvent()
                        return
                if type(ev) is not TimeoutEvent and not (
                        type(ev) is ErrorEvent and type(ev.exc) is StreamStalled):
                    self._taken()  # expire() and a stall bypass the backlog count
                if type(ev) is FinishEvent:
                    self._running -= 1
                yield ev
                if type(ev) is ErrorEvent or type(ev) is TimeoutEvent:
                    return  # an error ends the stream; so does expire()
        finally:
            self._done = True
            self._room.set()  # nobody takes events any more: never leave a backend waiting
