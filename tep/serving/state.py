"""What one app shares between its requests (:class:`ServerState`)."""
from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tep.serving.auth import KeyChecker
from tep.backend import Backend
from tep.serving.config import ServerConfig
from tep.obs.events import EventLog, resolve_path
from tep.serving.admission import Admission
from tep.obs.metrics import Metrics
from tep.serving.response_store import ResponseStore

__all__ = ["ServerState"]


# Threads that prepare requests (compile grammars, render chat templates): a few, since
# llguidance releases the GIL and a slow compile must not hold up the next request.
PREP_THREADS = min(4, max(2, os.cpu_count() or 2))


class ServerState:
    """What the app shares between requests: backend, settings, worker pool, live
    requests, admission gate, keys, metrics, events and the responses store."""

    def __init__(self, backend: Backend, config: ServerConfig) -> None:
        self.backend = backend
        self.config = config
        self.executor: ThreadPoolExecutor | None = None
        self._prep: ThreadPoolExecutor | None = None
        self.active: set[threading.Event] = set()
        self.slots: dict[threading.Event, Any] = {}   # cancel flag -> release()
        self.streams: weakref.WeakSet = weakref.WeakSet()  # open StreamBridges
        self.draining = False                           # see begin_drain
        self._lock = threading.Lock()
        self.keys = KeyChecker(config.all_api_keys())
        self.metrics = Metrics(config.metrics)
        engine_stats = getattr(backend, "stats", None)
        if engine_stats is not None and hasattr(engine_stats, "prefix_hit_tokens"):
            # an EngineBackend; a model with slots (llama.cpp) counts its KV copies too
            self.metrics.attach_engine(lambda: backend.stats, getattr(
                getattr(backend, "model", None), "prefix_cache_stats", None))
        self.events = EventLog(resolve_path(config.events_jsonl) if config.events_jsonl
                               else None)
        running = config.max_concurrency
        engine = getattr(backend, "engine", None)
        if "max_concurrency" not in getattr(config, "explicit", ()) and engine is not None:
            # an engine batches every admitted request in one thread: by default admit as
            # many as it has sequence slots, not the thread pool's size
            running = max(running, int(getattr(engine.sched, "max_num_seqs", running)))
        self.admission = Admission(running, config.max_queue,
                                   on_change=self._queue_changed)
        self.responses = ResponseStore(config.responses_store_path(),
                                       max_rows=config.responses_max_rows,
                                       max_age_s=config.responses_max_age)

    def _queue_changed(self, running: int, queued: int) -> None:
        if self.metrics.enabled:
            self.metrics.queue_depth.set(queued)

    def pool(self) -> ThreadPoolExecutor:
        """The backend thread pool (created on first use)."""
        ex = self.executor
        if ex is not None:  # the per-request case: no lock
            return ex
        with self._lock:  # created in before_serving; lazily for bare test clients
            if self.executor is None:
                self.executor = ThreadPoolExecutor(
                    max_workers=self.config.max_concurrency, thread_name_prefix="tep-backend")
            return self.executor

    def prep_pool(self) -> ThreadPoolExecutor:
        """The worker pool for request preparation that computes (grammar compiles, chat
        templates of engine requests; :mod:`tep.serving.prepare`), beside the backend
        pool, so preparation never waits behind a running generation or takes its thread.
        Created on first use."""
        with self._lock:
            if self._prep is None:
                self._prep = ThreadPoolExecutor(max_workers=PREP_THREADS,
                                                thread_name_prefix="tep-prep")
            return self._prep

    def begin_drain(self, grace_s: float) -> None:
        """The server stops taking requests and has ``grace_s`` seconds to finish the open
        ones (call on the loop). New requests get 503 from now on; shortly before the
        grace period ends, requests still waiting for a slot get 503 and open streams are
        ended with ``finish_reason: "length"`` and ``[DONE]``, so no client is cut off
        mid-stream by the server closing its connection."""
        import asyncio

        if self.draining:
            return
        self.draining = True
        margin = min(2.0, 0.25 * grace_s)
        asyncio.get_running_loop().call_later(max(0.0, grace_s - margin), self.end_drain)

    def end_drain(self) -> None:
        """The grace period is (nearly) over: refuse the queue, end the streams, cancel
        the rest of the backend work."""
        from tep.errors import ServiceUnavailableError

        self.draining = True
        self.admission.fail_waiters(ServiceUnavailableError(
            "The server is shutting down; retry the request"))
        for bridge in list(self.streams):
            bridge.expire()
        for ev in list(self.active):
            ev.set()

    def shutdown(self) -> None:
        """Cancel live requests, give their slots back, stop the pool and close the
        responses store (its queued writes finish first)."""
        for ev in list(self.active):
            ev.set()
        for release in list(self.slots.values()):
            release()
        self.slots.clear()
        with self._lock:
            if self.executor is not None:
                self.executor.shutdown(wait=False, cancel_futures=True)
                self.executor = None
            if self._prep is not None:
                self._prep.shutdown(wait=False, cancel_futures=True)
                self._prep = None
        self.responses.close()

