"""Running backend calls in the worker pool and bridging their output to the event loop.

A backend call runs in a thread of the app's dedicated ``ThreadPoolExecutor``. Its sink
hands events to the loop with ``loop.call_soon_threadsafe`` into one ``asyncio.Queue`` per
request; the request's async generator drains the queue, and its ``finally`` sets the
request's cancel flag, which covers client disconnect, timeouts and shutdown.
"""
from __future__ import annotations

import asyncio
import contextvars
import json
import threading
import time
from concurrent.futures import Executor, Future
from typing import Any, AsyncIterator, Callable

from tep.backend import StreamSink, current_cancel

__all__ = ["run_blocking", "StreamBridge", "sse", "sse_text_template", "BACKLOG_MAX"]

# Most events a streaming backend may be ahead of its client (see StreamBridge._put).
BACKLOG_MAX = 256


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


class StreamBridge:
    """Runs one backend call per choice in the pool and yields their events in order.

    Events (tuples): ``("role", i, role)``, ``("delta", i, text, logprobs)``,
    ``("finish", i, reason, completion_tokens, prompt_tokens)``, ``("error", i, exc)``,
    and ``("timeout", -1)`` when a deadline passed (see :meth:`events`).
    ``sinks[i]`` is choice ``i``'s sink once its job has started (its ``n_tokens`` and
    ``prompt_tokens`` count what a cut-off choice produced).
    """

    def __init__(self, executor: Executor, cancel: threading.Event,
                 request_id: str = "?") -> None:
        self._executor = executor
        self.request_id = request_id
        self.cancel = cancel
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._running = 0
        self.sinks: dict[int, StreamSink] = {}
        # Events from worker threads wait here; one loop wake-up moves all of them, so a
        # fast backend does not pay a self-pipe write and a loop turn per token.
        self._pending: list[tuple] = []
        self._pending_lock = threading.Lock()
        self._wake_scheduled = False
        # Backpressure: events produced but not yet taken by the stream. A backend that
        # gets BACKLOG_MAX ahead waits in its sink until the stream has sent half of
        # them, so a fast backend neither buffers without bound nor keeps the GIL from
        # the event loop (and from the other streams) while it runs ahead.
        self._backlog = 0
        self._room = threading.Event()
        self._room.set()

    def _put(self, item: tuple) -> None:
        with self._pending_lock:
            self._pending.append(item)
            self._backlog += 1
            full = self._backlog >= BACKLOG_MAX
            if full:
                self._room.clear()
            wake = not self._wake_scheduled
            self._wake_scheduled = True
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # loop closed: the server is gone, stop generating
                self.cancel.set()
                return
            # A backend that never releases the GIL (pure-Python or instant) would
            # otherwise keep the loop waiting up to a switch interval before it sends.
            time.sleep(0)
        if full:
            while not self._room.wait(0.05):
                if self.cancel.is_set():  # the stream is over: the sink says stop
                    return

    def _taken(self) -> None:
        """The stream took one event (on the loop): let a waiting backend go on once
        half of its backlog has been sent."""
        with self._pending_lock:
            self._backlog -= 1
            if self._backlog <= BACKLOG_MAX // 2 and not self._room.is_set():
                self._room.set()

    def _drain(self) -> None:
        with self._pending_lock:
            items, self._pending = self._pending, []
            self._wake_scheduled = False
        for item in items:
            self._queue.put_nowait(item)

    def has_pending(self) -> bool:
        """Whether an event is ready for :meth:`events` without waiting."""
        return not self._queue.empty()

    def start(self, index: int, make_sink: Callable[..., StreamSink],
              call: Callable[[StreamSink], None]) -> None:
        """Start choice ``index``: ``make_sink(on_delta=..., on_role=...)`` builds its sink
        and ``call(sink)`` runs the backend in a worker thread."""
        put = self._put

        def on_delta(text: str, lps: list) -> None:
            put(("delta", index, text, lps))

        def on_role(role: str) -> None:
            put(("role", index, role))

        def job() -> None:
            try:
                sink = make_sink(on_delta=on_delta, on_role=on_role)
                self.sinks[index] = sink
                call(sink)
                reason = sink.close()
                put(("finish", index, reason, sink.n_tokens, sink.prompt_tokens))
            except BaseException as e:  # reported to the client as an error event
                put(("error", index, e))

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
        loop, q = self._loop, self

        def put(item: tuple) -> None:
            with q._pending_lock:
                q._pending.append(item)
                q._backlog += 1
                wake = not q._wake_scheduled
                q._wake_scheduled = True
            if wake:
                try:
                    loop.call_soon_threadsafe(q._drain)
                except RuntimeError:  # loop closed: the server is gone, stop generating
                    q.cancel.set()

        sink = make_sink(on_delta=lambda text, lps: put(("delta", index, text, lps)),
                         on_role=lambda role: put(("role", index, role)))
        self.sinks[index] = sink

        def on_done(exc: BaseException | None) -> None:
            if exc is not None:
                put(("error", index, exc))
            else:
                put(("finish", index, sink.close(), sink.n_tokens, sink.prompt_tokens))

        self._running += 1
        try:
            submit(sink, on_done)
        except BaseException as e:  # refused at once (bad request): an error event
            put(("error", index, e))

    async def events(self, deadline: float | None = None) -> AsyncIterator[tuple]:
        """Events until every choice has finished, or up to and including an error.

        Args:
            deadline: ``loop.time()`` after which the cancel flag is set and a final
                ``("timeout", -1)`` event ends the iteration (None = no deadline).
        """
        try:
            while self._running:
                if deadline is None:
                    ev = await self._queue.get()
                else:
                    try:
                        ev = await asyncio.wait_for(self._queue.get(),
                                                    max(0.0, deadline - self._loop.time()))
                    except asyncio.TimeoutError:
                        self.cancel.set()
                        yield ("timeout", -1)
                        return
                self._taken()
                if ev[0] == "finish":
                    self._running -= 1
                yield ev
                if ev[0] == "error":
                    return
        finally:
            self._room.set()  # nobody takes events any more: never leave a backend waiting


def sse(obj: Any) -> bytes:
    """One server-sent event: ``data: <json>\\n\\n`` (or the literal ``[DONE]``)."""
    if isinstance(obj, str):
        return f"data: {obj}\n\n".encode()
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


_INDEX_MARK, _TEXT_MARK = 918273645, "\u2063tep-text\u2063"
_encode_str = json.encoder.encode_basestring  # what json.dumps(str, ensure_ascii=False) gives


def sse_text_template(make: Callable[[int, str], Any]) -> Callable[[int, str], bytes] | None:
    """A fast ``lambda index, text: sse(make(index, text))`` for per-token chunks.

    Renders ``make`` once with marker values and splits the bytes around them, so each
    token costs two joins and one string encode instead of a dict and a JSON encode; the
    bytes are the same. None when the markers do not appear exactly once (say, a model
    named like a marker): the caller then keeps rendering dicts."""
    b = sse(make(_INDEX_MARK, _TEXT_MARK))
    idx, txt = str(_INDEX_MARK).encode(), _encode_str(_TEXT_MARK).encode()
    if b.count(idx) != 1 or b.count(txt) != 1 or b.index(idx) > b.index(txt):
        return None
    pre, rest = b.split(idx)
    mid, post = rest.split(txt)

    def render(index: int, text: str) -> bytes:
        return b"".join((pre, str(index).encode(), mid, _encode_str(text).encode(), post))

    return render
