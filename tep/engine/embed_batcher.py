"""Cross-request batching for embeddings: concurrent requests share one ``embed`` call.

A request's inputs wait on one batcher thread. The thread takes everything queued (up to
``max_batch`` inputs; a request is never split) and runs it as one call; when the queue
held a single request it first waits up to ``max_wait_ms`` for others to join, so a lone
request is delayed at most that long, and under load the batch simply holds whatever
arrived while the previous call ran.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from tep.backend import Backend

__all__ = ["EmbedBatcher", "BatchedEmbeddings"]

log = logging.getLogger("tep.engine")

OnVectors = Callable[[Any, "BaseException | None"], None]


class EmbedBatcher:
    """Runs ``embed(model, list_of_token_id_lists) -> [B, D] or B vectors`` over the
    inputs of every request queued at once for the same model.

    Args:
        embed: the batched embedding function (called on the batcher thread only).
        max_wait_ms: most time a lone request waits for company (0 = never waits).
        max_batch: most inputs per call (a bigger request runs alone).
    """

    def __init__(self, embed: Callable[[str, list], Any], *, max_wait_ms: float = 2.0,
                 max_batch: int = 256) -> None:
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._embed = embed
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_batch = max_batch
        self._queue: deque[tuple[str, list, OnVectors]] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.calls = 0          # embed calls made
        self.requests = 0       # requests served

    def submit(self, model: str, inputs: list[list[int]], on_done: OnVectors) -> None:
        """Queue one request's inputs; ``on_done(vectors, None)`` or ``(None, exc)`` runs
        on the batcher thread when its batch is done."""
        with self._cv:
            if self._thread is None:
                self._stop = False
                self._thread = threading.Thread(target=self._run, name="tep-embed",
                                                daemon=True)
                self._thread.start()
            self._queue.append((model, inputs, on_done))
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        t = self._thread
        if t is not None:
            t.join(timeout=10)
        self._thread = None

    def _take(self) -> list[tuple[str, list, OnVectors]]:
        with self._cv:
            while not self._queue and not self._stop:
                self._cv.wait()
            if self._stop and not self._queue:
                return []
            if len(self._queue) == 1 and self.max_wait_s > 0:
                end = time.monotonic() + self.max_wait_s
                while len(self._queue) == 1 and not self._stop:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            jobs, n = [], 0
            model = self._queue[0][0]
            while self._queue and self._queue[0][0] == model:
                k = len(self._queue[0][1])
                if jobs and n + k > self.max_batch:
                    break
                jobs.append(self._queue.popleft())
                n += k
            return jobs

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if not jobs:
                return
            flat = [x for _, inputs, _ in jobs for x in inputs]
            try:
                vecs = self._embed(jobs[0][0], flat)
                if len(vecs) != len(flat):
                    raise ValueError(f"embed returned {len(vecs)} vectors for "
                                     f"{len(flat)} inputs")
            except Exception as e:  # every request of the batch fails with it
                for _, _, done in jobs:
                    self._call(done, None, e)
                continue
            self.calls += 1
            i = 0
            for _, inputs, done in jobs:
                self.requests += 1
                self._call(done, [np.asarray(v, np.float32) for v in vecs[i:i + len(inputs)]],
                           None)
                i += len(inputs)

    @staticmethod
    def _call(done: OnVectors, vecs: Any, exc: BaseException | None) -> None:
        try:
            done(vecs, exc)
        except Exception:
            log.exception("an embeddings callback failed")


class BatchedEmbeddings(Backend):
    """Wraps any :class:`tep.Backend` so that concurrent ``/v1/embeddings`` requests share
    one ``generate_embeddings_batch`` call (e.g. the MiniLM backend). Every other method
    is the wrapped backend's.

    Args:
        backend: the backend to wrap.
        max_wait_ms, max_batch: see :class:`EmbedBatcher`.
    """

    def __init__(self, backend: Backend, *, max_wait_ms: float = 2.0,
                 max_batch: int = 256) -> None:
        self.backend = backend
        self._batcher = EmbedBatcher(backend.generate_embeddings_batch,
                                     max_wait_ms=max_wait_ms, max_batch=max_batch)

    def submit_embeddings(self, model: str, token_ids: list[list[int]],
                          on_done: OnVectors) -> None:
        """Queue one request's inputs (see :meth:`EmbedBatcher.submit`)."""
        self._batcher.submit(model, token_ids, on_done)

    @property
    def batcher(self) -> EmbedBatcher:
        return self._batcher

    def close(self) -> None:
        self._batcher.stop()
        close = getattr(self.backend, "close", None)
        if callable(close):
            close()

    # ---- delegated
    def list_models(self) -> list[str]:
        return self.backend.list_models()

    def device_kind(self) -> str:
        return self.backend.device_kind()

    def supports_embeddings(self) -> bool:
        return self.backend.supports_embeddings()

    def generate_embeddings_batch(self, model: str, token_ids: list[list[int]]) -> Any:
        return self.backend.generate_embeddings_batch(model, token_ids)

    def embedding_dimensions(self, model: str) -> int | None:
        return self.backend.embedding_dimensions(model)

    def tokenize(self, model: str, text: str) -> list[int]:
        return self.backend.tokenize(model, text)

    def detokenize(self, model: str, token_ids: list[int]) -> str:
        return self.backend.detokenize(model, token_ids)

    def supports_tokenize(self) -> bool:
        return self.backend.supports_tokenize()

    def supports_detokenize(self) -> bool:
        return self.backend.supports_detokenize()

    def supports_chat(self) -> bool:
        return False
