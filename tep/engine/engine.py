"""The engine loop: one thread that schedules, runs one ``forward`` and one ``sample`` per
step, and delivers each token to its sequence's sink.

Seams (vLLM v1's): :meth:`Engine.add_request` (any thread) -> :meth:`Engine.step` =
``Scheduler.schedule`` -> ``Model.forward`` -> ``RowState.sample_rows`` ->
``_update_from_output`` -> ``_finish``. Per-step work is O(rows), never O(history).

Structured outputs (not implemented here) plug in through ``Seq.constraint``: an object
with ``fill_bitmask(row: np.ndarray) -> None`` (called for each constrained sampling row
while ``forward`` runs, to mark the allowed tokens) and ``accept(token_id: int) -> bool``
(called with each sampled token; False ends the sequence with an error). The loop calls
``fill_bitmask`` on the rows it is about to sample; until the kernel takes a bitmask the
mask is turned into ``allowed_token_ids``.

Threads: ``add_request`` and ``cancel`` may be called from any thread. Sinks and
``on_done`` callbacks run on the engine thread; they must not block (the server's
callbacks hand events to the event loop with ``call_soon_threadsafe``).
"""
from __future__ import annotations

import codecs
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from tep.engine.model import StepBatch
from tep.engine.rows import RowState, as_ids, fresh_seed
from tep.engine.scheduler import Plan, Scheduler, Seq

__all__ = ["Engine", "EngineStats", "StepRecord"]

log = logging.getLogger("tep.engine")


@dataclass
class EngineStats:
    """Counters since start (read them from any thread; exported as metrics by the server).

    Attributes:
        steps: engine steps run (one ``forward`` each).
        tokens_fed: tokens passed to ``forward``.
        tokens_sampled: tokens sampled.
        prefix_hit_tokens: prompt tokens the model already had cached (``reuse_prefix``).
        prefix_miss_tokens: prompt tokens that had to be evaluated.
        finished: sequences ended normally; cancelled: ended by their client, timeout or
            shutdown; failed: ended by a model or sampling error.
        forward_s, sample_s, step_s: seconds spent in forward, in sample, in whole steps.
    """

    steps: int = 0
    tokens_fed: int = 0
    tokens_sampled: int = 0
    prefix_hit_tokens: int = 0
    prefix_miss_tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    forward_s: float = 0.0
    sample_s: float = 0.0
    step_s: float = 0.0


@dataclass(frozen=True)
class StepRecord:
    """One step, kept when ``Engine(record_steps=True)`` (for tests): how many sequences
    were fed, how many tokens, and which slots sampled."""

    n_seqs: int
    n_tokens: int
    sampled_slots: tuple


class Engine:
    """Continuous batching over a :class:`tep.engine.Model`.

    Args:
        model: the model (``forward``, ``release``, ``vocab_size``; ``detokenize``,
            ``eog_token_ids``, ``reuse_prefix`` when present).
        max_num_seqs: most sequences in the model at once (slots; model ``seq_id`` range).
        max_batch_tokens: most tokens fed per step (prompt chunks + decode tokens).
        record_steps: keep a :class:`StepRecord` per step in ``self.steps`` (tests).
    """

    def __init__(self, model: Any, *, max_num_seqs: int = 64, max_batch_tokens: int = 2048,
                 record_steps: bool = False) -> None:
        self.model = model
        cap = getattr(model, "max_num_seqs", None)
        if cap is not None and max_num_seqs > int(cap):
            max_num_seqs = int(cap)
        self.sched = Scheduler(max_num_seqs, max(max_batch_tokens, max_num_seqs))
        self.vocab_size = int(model.vocab_size)
        self.rows = RowState(max_num_seqs, self.vocab_size)
        self.stats = EngineStats()
        self.steps: list[StepRecord] | None = [] if record_steps else None
        self._eog = frozenset(int(t) for t in (getattr(model, "eog_token_ids", None) or ()))
        self._detok = getattr(model, "detokenize", None)
        self._reuse = getattr(model, "reuse_prefix", None)
        self._piece_cache: dict[int, bytes] = {}
        self._inbox: list[Seq] = []
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # ---- lifecycle
    def start(self) -> "Engine":
        """Start the loop thread (idempotent)."""
        with self._cv:
            if self._thread is None:
                self._stop = False
                self._thread = threading.Thread(target=self._run, name="tep-engine",
                                                daemon=True)
                self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop: every live sequence is cancelled (its sink closes)."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=10)
        self._thread = None

    # ---- entry (any thread)
    def add_request(self, prompt: Any, sampling: Any, sink: Any,
                    on_done: Callable[[BaseException | None], None], *,
                    constraint: Any = None) -> Seq:
        """Queue one sequence. ``prompt``: token IDs (>= 1, each in [0, V)). ``sink``: a
        :class:`tep.backend.StreamSink` (it applies stops, ``max_tokens`` and the cancel
        flag). ``on_done(None | exc)`` is called once when the sequence ends."""
        ids = as_ids(prompt)
        if ids.shape[0] == 0:
            raise ValueError("the prompt must hold at least one token")
        seed = fresh_seed() if sampling.seed is None else int(sampling.seed)
        seq = Seq(prompt=ids, sampling=sampling, sink=sink, on_done=on_done, seed=seed,
                  constraint=constraint,
                  decoder=codecs.getincrementaldecoder("utf-8")(errors="replace"))
        with self._cv:
            if self._stop:
                raise RuntimeError("the engine is stopped")
            self._inbox.append(seq)
            self._cv.notify()
        return seq

    def wake(self) -> None:
        """Make an idle loop re-check its sequences (e.g. after a cancel flag was set)."""
        with self._cv:
            self._cv.notify()

    # ---- the loop
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._inbox and self.sched.idle:
                    self._cv.wait()
                if self._stop:
                    inbox, self._inbox = self._inbox, []
                    break
                inbox, self._inbox = self._inbox, []
            for s in inbox:
                self.sched.add(s)
            try:
                self.step()
            except Exception:  # a bug in the engine itself: fail what is live, go on
                log.exception("engine step failed")
                for s in list(self.sched.running) + list(self.sched.waiting):
                    self._finish(s, RuntimeError("engine step failed"))
        for s in inbox:
            self.sched.add(s)
        for s in list(self.sched.running) + list(self.sched.waiting):
            s.sink._cancel.set() if hasattr(s.sink, "_cancel") else None
            self._finish(s, None, cancelled=True)

    def run_until_idle(self, max_steps: int = 1_000_000) -> int:
        """Drive the engine on the calling thread until no sequence is left (tests and
        benchmarks without the loop thread). Returns the steps run."""
        n = 0
        while n < max_steps:
            with self._cv:
                inbox, self._inbox = self._inbox, []
            for s in inbox:
                self.sched.add(s)
            if self.sched.idle:
                break
            self.step()
            n += 1
        return n

    def step(self) -> None:
        """One step: drop ended sequences, schedule, forward, sample, deliver."""
        t0 = time.perf_counter()
        self._drop_cancelled()
        plan = self.sched.schedule(self._reuse_prefix if self._reuse is not None else None)
        if not plan.seqs:
            return
        batch = self._build_batch(plan)
        n_rows = len(plan.samplers)
        slots = np.fromiter((s.slot for s in plan.samplers), np.int64, n_rows)
        t1 = time.perf_counter()
        try:
            logits = self.model.forward(batch)
            logits = self._check_logits(logits, n_rows)
        except Exception as e:  # the model failed this step: only its sequences fail
            log.warning("model forward failed; failing %d sequences: %r", len(plan.seqs), e)
            for s in plan.seqs:
                self._finish(s, e)
            self.stats.failed += 0  # counted in _finish
            return
        t2 = time.perf_counter()
        st = self.stats
        st.steps += 1
        st.tokens_fed += batch.n_tokens
        st.forward_s += t2 - t1
        for s, n in zip(plan.seqs, plan.counts):
            s.n_fed = min(s.n_fed + n, s.prompt.shape[0]) if s.prefilling else s.n_fed
        if self.steps is not None:
            self.steps.append(StepRecord(len(plan.seqs), batch.n_tokens,
                                         tuple(slots.tolist())))
        if n_rows:
            self._apply_constraints(plan.samplers)
            res = self.rows.sample_rows(logits, slots)
            t3 = time.perf_counter()
            st.sample_s += t3 - t2
            st.tokens_sampled += n_rows
            self.rows.record(slots, res.token_ids)
            self._update_from_output(plan.samplers, res)
        st.step_s += time.perf_counter() - t0

    # ---- pieces of a step
    def _reuse_prefix(self, s: Seq) -> int:
        n = 0
        try:
            n = int(self._reuse(s.slot, s.prompt.tolist()))  # type: ignore[misc]
        except Exception:
            log.exception("reuse_prefix failed; evaluating the whole prompt")
            n = 0
        n = max(0, min(n, s.prompt.shape[0] - 1))
        self.stats.prefix_hit_tokens += n
        self.stats.prefix_miss_tokens += s.prompt.shape[0] - n
        return n

    def _admit_rows(self, plan: Plan) -> None:
        for s in plan.admitted:
            self.rows.admit(s.slot, s.sampling, s.seed, s.prompt)

    def _build_batch(self, plan: Plan) -> StepBatch:
        self._admit_rows(plan)
        N = plan.n_tokens
        tok = np.empty(N, np.int32)
        pos = np.empty(N, np.int32)
        sid = np.empty(N, np.int32)
        want = np.zeros(N, bool)
        i = 0
        for s, n in zip(plan.seqs, plan.counts):
            if s.prefilling:
                a = s.n_fed
                tok[i:i + n] = s.prompt[a:a + n]
                pos[i:i + n] = np.arange(a, a + n, dtype=np.int32)
                if a + n == s.prompt.shape[0]:
                    want[i + n - 1] = True
            else:
                tok[i] = s.last
                pos[i] = s.prompt.shape[0] + s.n_out - 1
                want[i] = True
            sid[i:i + n] = s.slot
            i += n
        return StepBatch(token_ids=tok, positions=pos, seq_ids=sid, logits=want)

    def _check_logits(self, logits: Any, n_rows: int) -> np.ndarray:
        if not isinstance(logits, np.ndarray):
            raise TypeError(f"forward must return a numpy array, got {type(logits).__name__}")
        if logits.shape != (n_rows, self.vocab_size):
            raise ValueError(f"forward returned shape {logits.shape}, expected "
                             f"({n_rows}, {self.vocab_size})")
        if logits.dtype != np.float32:
            logits = logits.astype(np.float32)
        return np.ascontiguousarray(logits)

    def _apply_constraints(self, samplers: list) -> None:
        for s in samplers:
            c = s.constraint
            if c is not None:
                mask = np.zeros(self.vocab_size, bool)
                c.fill_bitmask(mask)
                self.rows.allowed[s.slot] = np.flatnonzero(mask).astype(np.int64)

    def _piece(self, tok: int) -> bytes:
        b = self._piece_cache.get(tok)
        if b is None:
            b = bytes(self._detok([tok])) if self._detok is not None else b""
            if len(self._piece_cache) < 1 << 20:
                self._piece_cache[tok] = b
        return b

    def _update_from_output(self, samplers: list, res: Any) -> None:
        toks = res.token_ids.tolist()
        lp = res.logprobs is not None
        for i, s in enumerate(samplers):
            if not res.ok[i]:
                self._finish(s, res.errors[i])
                continue
            tok = toks[i]
            s.n_out += 1
            s.last = tok
            kw: dict = {}
            k = s.sampling.logprobs
            if lp and k is not None:
                kw = {"logprob": float(res.logprobs[i]),
                      "top_logprobs": list(zip(res.top_ids[i, :k].tolist(),
                                               res.top_lps[i, :k].tolist())),
                      "token_bytes": self._piece(tok)}
            c = s.constraint
            if c is not None and not c.accept(tok):
                self._finish(s, ValueError(f"token {tok} broke the output constraint"))
                continue
            sink = s.sink
            if tok in self._eog:
                sink.emit_token(s.decoder.decode(b"", final=True), tok, **kw)
                sink.emit_finish("stop")
                self._finish(s, None)
                continue
            go = sink.emit_token(s.decoder.decode(self._piece(tok)), tok, **kw)
            if not go:
                self._finish(s, None, cancelled=sink._cancel.is_set()
                             if hasattr(sink, "_cancel") else False)
            elif s.max_len is not None and s.prompt.shape[0] + s.n_out >= s.max_len:
                sink.emit_finish("length")
                self._finish(s, None)

    def _drop_cancelled(self) -> None:
        for s in list(self.sched.waiting):
            if s.sink.cancelled:
                self._finish(s, None, cancelled=True)
        for s in list(self.sched.running):
            if s.sink.cancelled:
                self._finish(s, None, cancelled=True)

    def _finish(self, s: Seq, exc: BaseException | None, *, cancelled: bool = False) -> None:
        if s.done:
            return
        s.done = True
        slot = s.slot
        self.sched.free(s)
        if slot >= 0:
            self.rows.release(slot)
            try:
                self.model.release(slot)
            except Exception:
                log.exception("model.release(%d) failed", slot)
        st = self.stats
        if exc is not None:
            st.failed += 1
        elif cancelled:
            st.cancelled += 1
        else:
            st.finished += 1
        try:
            s.on_done(exc)
        except Exception:
            log.exception("a sequence's on_done callback failed")
