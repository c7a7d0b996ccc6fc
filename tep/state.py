"""What one app shares between its requests (:class:`ServerState`)."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tep.auth import KeyChecker
from tep.backend import Backend
from tep.config import ServerConfig
from tep.events import EventLog, resolve_path
from tep.limits import Admission
from tep.metrics import Metrics

__all__ = ["ServerState"]


class ServerState:
    """What the app shares between requests: backend, settings, worker pool, live
    requests, admission gate, keys, metrics and events."""

    def __init__(self, backend: Backend, config: ServerConfig) -> None:
        self.backend = backend
        self.config = config
        self.executor: ThreadPoolExecutor | None = None
        self.active: set[threading.Event] = set()
        self.slots: dict[threading.Event, Any] = {}   # cancel flag -> release()
        self._lock = threading.Lock()
        self.keys = KeyChecker(config.all_api_keys())
        self.metrics = Metrics(config.metrics)
        self.events = EventLog(resolve_path(config.events_jsonl) if config.events_jsonl
                               else None)
        self.admission = Admission(config.max_concurrency, config.max_queue,
                                   on_change=self._queue_changed)

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

    def shutdown(self) -> None:
        """Cancel live requests, give their slots back and stop the pool."""
        for ev in list(self.active):
            ev.set()
        for release in list(self.slots.values()):
            release()
        self.slots.clear()
        with self._lock:
            if self.executor is not None:
                self.executor.shutdown(wait=False, cancel_futures=True)
                self.executor = None

