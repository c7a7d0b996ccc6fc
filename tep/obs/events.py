"""Run events: one JSON object per line in a file (the event kinds are listed below).

Every line has ``event``, ``ts`` (Unix seconds, float), ``run_id`` and ``pid``; then:

- ``run_start`` (once, at boot): ``host`` (hostname, platform, python, tep version),
  ``backend`` (``kind`` from ``device_kind()``, ``class``), ``models``, ``config``
  (the server settings; API keys are only counted).
- ``eval`` (once per completions / chat / embeddings request, when it ends):
  ``phase: "serve"``, ``name: "request"``, ``extra``: ``endpoint``, ``model``,
  ``prompt_tokens``, ``completion_tokens``, ``latency_us``, ``ttft_us`` (streams),
  ``sampling``, ``request_id``, ``principal_id``, ``status`` (HTTP status; 499 when the
  client left before a response started) and ``outcome``: ``ok`` | ``error`` |
  ``timeout`` (generation timeout, ended with ``finish_reason: "length"``) |
  ``cancelled`` (client left, or shutdown, while it ran) | ``dropped`` (client left while
  queued: it never ran) | ``rejected`` (429, queue full).
- ``step`` (per generated token, only for requests that asked for logprobs):
  ``request_id``, ``choice``, ``step``, ``token``, ``token_id``, ``logprob``.
- ``run_end`` (once, at shutdown, last line): ``reason`` (``ok`` | ``errored``) and
  ``stats``: ``requests``, ``errors`` (``eval`` events whose outcome is ``error``),
  ``tokens_out``.

No path means no file I/O and no writer thread. Lines are written by one background
thread so a slow disk never blocks the event loop; a failed write (unwritable path,
full disk) is logged and the line dropped, never failing a request.

Several processes (``tep serve --workers N``, Ray Serve replicas) write one file each:
``{worker}`` / ``{pid}`` in the path are replaced per process, and with ``--workers N``
and neither placeholder the CLI writes ``events.<worker>.jsonl`` beside ``events.jsonl``.
:func:`read_events` merges such files by time.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import platform
import queue
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

__all__ = ["EventLog", "resolve_path", "read_events"]

log = logging.getLogger("tep.obs.events")

_STOP = object()


def resolve_path(path: str, worker: str | None = None) -> str:
    """``path`` with ``{worker}`` and ``{pid}`` filled in (``worker`` defaults to
    ``$TEP_WORKER_ID``, else ``"0"``)."""
    if worker is None:
        worker = os.environ.get("TEP_WORKER_ID", "0")
    return path.replace("{worker}", str(worker)).replace("{pid}", str(os.getpid()))


class EventLog:
    """An append-only JSONL event writer (thread-safe; writes on its own thread).

    Args:
        path: the file (parents are created); None = a disabled log that does nothing.
    """

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = None if path is None else Path(path)
        self.run_id = uuid.uuid4().hex[:16]
        self.requests = 0
        self.errors = 0
        self.tokens_out = 0
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._started = False
        self._ended = False
        self._failing = False

    @property
    def enabled(self) -> bool:
        """True when events go to a file."""
        return self.path is not None

    # ---- the event kinds
    def run_start(self, *, backend: Any, models: Any, config: dict[str, Any]) -> None:
        """Write ``run_start`` (once; later calls are ignored)."""
        if not self.enabled or self._started:
            return
        self._started = True
        from tep import __version__

        self._emit("run_start", {
            "host": {"hostname": socket.gethostname(), "platform": platform.platform(),
                     "python": platform.python_version(), "tep": __version__},
            "backend": {"kind": _safe(backend.device_kind), "class": type(backend).__name__},
            "models": models, "config": config})

    def request(self, extra: dict[str, Any]) -> None:
        """Count one finished request and write its ``eval`` event."""
        with self._lock:
            self.requests += 1
            self.errors += extra.get("outcome") == "error"
            self.tokens_out += int(extra.get("completion_tokens") or 0)
        if self.enabled:
            self._emit("eval", {"phase": "serve", "name": "request", "extra": extra})

    def steps(self, request_id: str, choice: int, first_step: int,
              entries: Iterable[Any]) -> int:
        """Write one ``step`` event per logprob entry (:class:`tep.TokenLogprob`) and
        return how many were written."""
        n = 0
        for e in entries:
            if self.enabled:
                self._emit("step", {"request_id": request_id, "choice": choice,
                                    "step": first_step + n, "token": e.token,
                                    "token_id": e.token_id, "logprob": e.logprob})
            n += 1
        return n

    def run_end(self, reason: str = "ok") -> None:
        """Write ``run_end`` (once) and stop the writer; later events are dropped."""
        if not self.enabled or self._ended:
            return
        with self._lock:
            stats = {"requests": self.requests, "errors": self.errors,
                     "tokens_out": self.tokens_out}
        self._emit("run_end", {"reason": reason, "stats": stats})
        self._ended = True
        self.close()

    def close(self) -> None:
        """Flush what is queued and stop the writer thread."""
        t = self._thread
        if t is not None:
            self._queue.put(_STOP)
            t.join(timeout=10)
            self._thread = None

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every queued line has been written (tests; shutdown)."""
        done = threading.Event()
        if self._thread is None:
            return
        self._queue.put(done)
        done.wait(timeout)

    # ---- internals
    def _emit(self, kind: str, fields: dict[str, Any]) -> None:
        if self._ended:
            log.debug("event %s after run_end dropped", kind)
            return
        rec = {"event": kind, "ts": time.time(), "run_id": self.run_id, "pid": os.getpid(),
               **fields}
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._writer, name="tep-events",
                                                daemon=True)
                self._thread.start()
        self._queue.put(rec)

    def _writer(self) -> None:
        f = None
        while True:
            item = self._queue.get()
            batch = [item]
            while True:  # drain what is there, then write it in one go
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            lines, stop, waiters = [], False, []
            for it in batch:
                if it is _STOP:
                    stop = True
                elif isinstance(it, threading.Event):
                    waiters.append(it)
                else:
                    lines.append(json.dumps(it, ensure_ascii=False, separators=(",", ":"),
                                            default=str))
            if lines:
                f = self._write(f, lines)
            for w in waiters:
                w.set()
            if stop:
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        pass
                return

    def _write(self, f: Any, lines: list[str]) -> Any:
        try:
            if f is None:
                assert self.path is not None
                self.path.parent.mkdir(parents=True, exist_ok=True)
                f = open(self.path, "a", encoding="utf-8")
            f.write("\n".join(lines) + "\n")
            f.flush()
            if self._failing:
                log.warning("events file %s is writable again", self.path)
                self._failing = False
        except (OSError, ValueError) as e:
            if not self._failing:  # log once per failure streak, not per line
                log.error("cannot write events to %s (%s); dropping events until it works",
                          self.path, e)
                self._failing = True
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
            f = None
        return f


def _safe(fn: Any) -> Any:
    try:
        return fn()
    except Exception as e:  # a broken metadata method must not stop the server
        return f"<failed: {e!r}>"


def read_events(*paths: str | os.PathLike) -> list[dict[str, Any]]:
    """Read events from files or glob patterns (e.g. ``"events.*.jsonl"``), merged and
    sorted by ``ts``. Lines that are not JSON (a torn last line) are skipped."""
    files: list[str] = []
    for p in paths:
        hits = sorted(glob.glob(str(p)))
        files.extend(hits if hits else ([str(p)] if Path(p).exists() else []))
    out = []
    for name in dict.fromkeys(files):
        with open(name, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    out.sort(key=lambda e: e.get("ts", 0.0))
    return out
