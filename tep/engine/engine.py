"""The engine loop: one thread that schedules, runs one ``forward`` and one ``sample`` per
step, and delivers each token to its sequence's sink.

Seams (vLLM v1's): :meth:`Engine.add_request` (any thread) -> :meth:`Engine.step` =
``Scheduler.schedule`` -> ``Model.forward`` -> ``RowState.sample_rows`` ->
``_update_from_output`` -> ``_finish``. Per-step work is O(rows), never O(history).

Structured outputs plug in through ``Seq.constraint`` (a
:class:`tep.structured.Constraint`): the int32 token bitmask of every constrained row of
a step is filled on a worker thread while ``forward`` runs (``fill_bitmask`` releases the
GIL), then handed to the step's one ``sample`` call (``token_bitmask=``, unconstrained
rows all ones); each sampled token goes to ``accept`` (False ends the sequence with an
error).

Overlap (``Engine(overlap=True)``, the server's ``--overlap on``): in a steady decode
step (the same sequences as the step before, no prompt, grammar or speculation) whose
sequences all go on (no end-of-generation or stop id sampled, ``max_tokens`` not reached,
nobody cancelled), the next step's ``forward`` is started on a worker thread right after
sampling, and this step's tokens are delivered while it runs (SGLang's overlap
scheduler). Tokens stay the same: sampling is keyed on (seed, step), and a sequence that
a stop string or its client ends during delivery is dropped from the step's rows when the
forward returns; its slot goes back to the model (``release``) only after that forward.

Threads: ``add_request`` and ``cancel`` may be called from any thread. Sinks and
``on_done`` callbacks run on the engine thread; they must not block (the server's
callbacks hand events to the event loop with ``call_soon_threadsafe``).
"""
from __future__ import annotations

import codecs
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from tep.engine.model import StepBatch
from tep.engine.rows import RowState, _status_text, as_ids, fresh_seed
from tep.engine.scheduler import Plan, Scheduler, Seq
from tep.engine.speculative import (Acceptance, DraftModelDrafter, NgramDrafter, SpecConfig,
                                   StepCost, plan_drafts,
                                    SpecStats)

__all__ = ["Engine", "EngineStats", "StepRecord"]

log = logging.getLogger("tep.engine")
_F32 = np.dtype(np.float32)


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
        overlapped: steps whose forward ran while the previous step's tokens were
            delivered (``overlap``).
        spec: speculative decoding counters per draft source (a
            :class:`~tep.engine.speculative.SpecStats`).
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
    overlapped: int = 0
    spec: SpecStats = field(default_factory=SpecStats)


@dataclass
class _DecodePlan:
    """A decode-only plan kept for the next steps while ``Scheduler.version`` is the same
    (the same sequences, all decoding): its slots, batch ``seq_ids``/``logits`` arrays and
    gathered static ``sample`` arguments."""

    version: int
    plan: Plan
    slots: np.ndarray
    seq_ids: np.ndarray
    want: np.ndarray
    static: dict


@dataclass
class _InFlight:
    """A decode step whose ``forward`` runs on the overlap worker: the plan and slots it
    feeds (row i of its logits is ``slots[i]``) and the future of (logits, seconds)."""

    plan: Plan
    slots: np.ndarray
    slot_set: frozenset
    n_tokens: int
    future: Future


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
        sample_threads: threads of the one ``sample`` call per step (None = the kernel's
            automatic choice; 1 avoids OpenMP on an oversubscribed machine).
        speculative: a :class:`~tep.engine.speculative.SpecConfig` (None or mode "off":
            no speculation). Needs ``model.rewind`` (the cache of rejected drafts is
            dropped through it).
        overlap: start a steady decode step's ``forward`` before delivering the previous
            step's tokens (see the module docstring). Not with speculation, whose drafts
            depend on the delivered tokens.
        step_cost: the forward's cost table the draft plan prices drafts by (a
            :class:`~tep.engine.speculative.StepCost`, e.g. ``StepCost.fixed(...)``);
            default: the model's table, learned from the steps it runs.
    """

    def __init__(self, model: Any, *, max_num_seqs: int = 64, max_batch_tokens: int = 2048,
                 record_steps: bool = False, sample_threads: int | None = None,
                 speculative: SpecConfig | None = None, overlap: bool = False,
                 step_cost: StepCost | None = None) -> None:
        self.model = model
        cap = getattr(model, "max_num_seqs", None)
        if cap is not None and max_num_seqs > int(cap):
            max_num_seqs = int(cap)
        self.sched = Scheduler(max_num_seqs, max(max_batch_tokens, max_num_seqs))
        self.vocab_size = int(model.vocab_size)
        self.rows = RowState(max_num_seqs, self.vocab_size, n_threads=sample_threads)
        self.stats = EngineStats()
        self.steps: list[StepRecord] | None = [] if record_steps else None
        self._eog = frozenset(int(t) for t in (getattr(model, "eog_token_ids", None) or ()))
        self._detok = getattr(model, "detokenize", None)
        self._reuse = getattr(model, "reuse_prefix", None)
        self._piece_cache: dict[int, bytes] = {}
        self._text_cache: dict[int, str] = {}   # tokens that are whole UTF-8 alone
        self._checked: Any = None   # the last logits array _check_logits passed as is
        self._decode: _DecodePlan | None = None
        self._masks: Any = None   # tep.structured.StepMasks, made on the first constraint
        # held around forward; other users of the model (embeddings) take it too
        self.model_lock = threading.Lock()
        self._inbox: list[Seq] = []
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.spec = speculative if speculative is not None and speculative.on else None
        self.overlap = bool(overlap) and self.spec is None
        self._inflight: _InFlight | None = None
        self._deferred: list[int] = []     # slots whose model.release waits for _inflight
        self._pool: ThreadPoolExecutor | None = None
        self.spec_stats = self.stats.spec
        self._drafter: Any = None
        self._reject = False
        self._spec_masks: dict | None = None   # {slot: [n_draft + 1, W] int32}, this step
        if self.spec is not None:
            self._rewind = getattr(model, "rewind", None)
            if not callable(self._rewind):
                raise ValueError("speculative decoding needs a model with rewind(seq_id, n) "
                                 f"({type(model).__name__} has none)")
            S = self.sched.max_num_seqs
            self._accept = Acceptance(S)
            self._cost = step_cost if step_cost is not None else StepCost.of(model)
            self._kind: dict[int, int] = {}      # {slot: draft kind} of this step
            self._drafter = (NgramDrafter(S) if self.spec.mode == "ngram" else
                             DraftModelDrafter(self.spec.draft_model, S, self.vocab_size))
            self._ctx = getattr(model, "context_size", None)

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
        if self._pool is not None and (t is None or not t.is_alive()):
            self._pool.shutdown(wait=True)
            self._pool = None

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
        seq.slow = constraint is not None or sampling.logprobs is not None
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
                while (not self._stop and not self._inbox and self.sched.idle
                       and self._inflight is None):
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
                self._join_quietly()
                for s in list(self.sched.running) + list(self.sched.waiting):
                    self._finish(s, RuntimeError("engine step failed"))
        self._join_quietly()
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
            if self.sched.idle and self._inflight is None:
                break
            self.step()
            n += 1
        return n

    def step(self) -> None:
        """One step: drop ended sequences, schedule, forward, sample, deliver."""
        t0 = time.perf_counter()
        if self._inflight is not None:
            self._step_inflight(t0)
            return
        self._drop_cancelled()
        rows = self.rows
        c = self._decode
        if c is not None and c.version == self.sched.version:
            # the same sequences as last step, all decoding: no re-planning
            plan, slots = c.plan, c.slots
            batch = self._decode_batch(c)
            fed_slots, fed_counts = slots, 1
        else:
            plan = self.sched.schedule(self._reuse_prefix if self._reuse is not None else None)
            if not plan.seqs:
                return
            for s in plan.admitted:
                rows.admit(s.slot, s.sampling, s.seed, s.prompt, s.n_fed)
                if self._drafter is not None:
                    self._drafter.admit(s.slot, s.prompt)
                    self._accept.reset(s.slot)
            batch, fed_slots, fed_counts = self._build_batch(plan)
            slots = np.fromiter((s.slot for s in plan.samplers), np.int64, len(plan.samplers))
            self._decode = None
            if not plan.prefills and not any(s.constraint is not None for s in plan.seqs):
                self._decode = _DecodePlan(self.sched.version, plan, slots,
                                           batch.seq_ids, batch.logits,
                                           rows.static_kwargs(slots))
        if self._drafter is not None:
            drafts = self._propose(plan)
            if drafts:
                self._spec_step(plan, drafts, t0)
                return
        n_rows = slots.shape[0]
        constrained = [(i, s.constraint) for i, s in enumerate(plan.samplers)
                       if s.constraint is not None] if self._decode is None else []
        if constrained:  # masks are filled on a worker thread while forward runs
            if self._masks is None:
                from tep.structured import StepMasks

                self._masks = StepMasks(self.vocab_size)
            self._masks.start(n_rows, constrained)
        t1 = time.perf_counter()
        try:
            with self.model_lock:
                out = self.model.forward(batch)
            logits = self._check_logits(out, n_rows)
        except Exception as e:  # the model failed this step: only its sequences fail
            log.warning("model forward failed; failing %d sequences: %r", len(plan.seqs), e)
            if constrained:
                self._finish_masks(constrained)
            for s in list(plan.seqs):
                self._finish(s, e)
            return
        bitmask = self._finish_masks(constrained) if constrained else None
        t2 = time.perf_counter()
        st = self.stats
        st.steps += 1
        st.tokens_fed += batch.n_tokens
        st.forward_s += t2 - t1
        if self._drafter is not None and not plan.prefills:
            self._cost.observe(batch.n_tokens, t2 - t1)
        if type(fed_counts) is int and fed_slots.shape[0] == 1:   # one sequence: no ufunc
            rows.pos[int(fed_slots[0])] += fed_counts
        else:
            rows.pos[fed_slots] += fed_counts
        if plan.prefills:
            for s, n in zip(plan.seqs, plan.counts):
                if s.n_fed < s.plen:
                    s.n_fed += n
        if self.steps is not None:
            self.steps.append(StepRecord(len(plan.seqs), batch.n_tokens,
                                         tuple(slots.tolist())))
        if n_rows:
            self._sample_deliver(plan, plan.samplers, slots, logits, bitmask, t2)
        st.step_s += time.perf_counter() - t0

    def _sample_deliver(self, plan: Plan, samplers: list, slots: np.ndarray,
                        logits: np.ndarray, bitmask: Any, t2: float) -> None:
        """The end of a plain step: sample the rows of ``samplers`` (``slots``), record
        the tokens, start the next forward when overlapping, deliver."""
        rows, st, c = self.rows, self.stats, self._decode
        whole = samplers is plan.samplers
        static = c.static if whole and c is not None and c.plan is plan else None
        res = rows.sample_rows(logits, slots, static, token_bitmask=bitmask)
        st.sample_s += time.perf_counter() - t2
        st.tokens_sampled += len(samplers)
        rows.record(slots, res.token_ids)
        if self._drafter is not None:
            ext = self._drafter.extend
            for slot, tok in zip(slots.tolist(), res.token_ids.tolist()):
                ext(slot, (tok,))
        if self.overlap and whole:
            self._launch_next(plan, slots, res)
        self._update_from_output(samplers, res)

    def _decode_batch(self, c: _DecodePlan) -> StepBatch:
        """The next step of a decode plan: each slot's last token at its next position."""
        rows, slots = self.rows, c.slots
        return StepBatch(token_ids=rows.last[slots].astype(np.int32),
                         positions=rows.pos[slots].astype(np.int32),
                         seq_ids=c.seq_ids, logits=c.want)

    # ---- overlap: the next forward runs while this step's tokens are delivered
    def _launch_next(self, plan: Plan, slots: np.ndarray, res: Any) -> None:
        """Start the next decode step's forward on the worker when this steady decode
        step's sequences all go on and nothing waits to be admitted."""
        c = self._decode
        if (c is None or c.plan is not plan or c.version != self.sched.version
                or self._inbox or self.sched.waiting or not res.all_ok):
            return
        eog = self._eog
        for s, tok in zip(plan.samplers, res.token_ids.tolist()):
            goes_on = getattr(s.sink, "goes_on_after", None)
            if tok in eog or goes_on is None or not goes_on(tok):
                return
        batch = self._decode_batch(c)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="tep-forward")
        self._inflight = _InFlight(plan, slots, frozenset(slots.tolist()), batch.n_tokens,
                                   self._pool.submit(self._timed_forward, batch))
        self.stats.overlapped += 1

    def _timed_forward(self, batch: StepBatch) -> tuple[Any, float]:
        t = time.perf_counter()
        with self.model_lock:
            out = self.model.forward(batch)
        return out, time.perf_counter() - t

    def _join_quietly(self) -> None:
        """Wait for the in-flight forward (its result is dropped), then hand back the
        slots whose release waited for it."""
        fl, self._inflight = self._inflight, None
        if fl is not None:
            try:
                fl.future.result()
            except BaseException:  # noqa: BLE001 - its sequences are being ended anyway
                pass
        self._release_deferred()

    def _release_deferred(self) -> None:
        slots, self._deferred = self._deferred, []
        for slot in slots:
            try:
                self.model.release(slot)
            except Exception:
                log.exception("model.release(%d) failed", slot)

    def _step_inflight(self, t0: float) -> None:
        """The step whose forward the previous step started: wait for it, drop the rows
        of sequences that ended meanwhile, sample, maybe start the next, deliver."""
        fl, self._inflight = self._inflight, None
        plan, rows, st = fl.plan, self.rows, self.stats
        try:
            out, dt = fl.future.result()
            logits = self._check_logits(out, fl.slots.shape[0])
        except Exception as e:  # the model failed this step: only its sequences fail
            self._release_deferred()
            log.warning("model forward failed; failing %d sequences: %r", len(plan.seqs), e)
            for s in list(plan.samplers):
                self._finish(s, e)
            return
        self._release_deferred()
        t2 = time.perf_counter()
        st.steps += 1
        st.tokens_fed += fl.n_tokens
        st.forward_s += dt
        rows.pos[fl.slots] += 1
        self._drop_cancelled()
        samplers, slots = plan.samplers, fl.slots
        if any(s.done for s in samplers):   # ended by a stop string or its client
            live = [i for i, s in enumerate(samplers) if not s.done]
            samplers = [samplers[i] for i in live]
            slots = slots[live]
            logits = np.ascontiguousarray(logits[live])
        if self.steps is not None:
            self.steps.append(StepRecord(len(plan.seqs), fl.n_tokens, tuple(slots.tolist())))
        if samplers:
            self._sample_deliver(plan, samplers, slots, logits, None, t2)
        st.step_s += time.perf_counter() - t0

    # ---- speculative decoding
    def _propose(self, plan: Plan) -> dict:
        """{slot: draft tokens} for this step's decoding samplers (empty: a plain step).
        A step that prefills does not speculate; drafts never take the step past
        ``max_batch_tokens``. A constrained sequence's drafts are cut at the first token
        its grammar refuses (:meth:`_grammar_masks`)."""
        spec, rows = self.spec, self.rows
        if plan.prefills:
            # a step that prefills stays exactly the step it would be without speculation
            # (llama.cpp's logits for a prompt can depend on what else its decode holds)
            return {}
        budget = self.sched.max_batch_tokens - len(plan.seqs)
        caps: dict[int, int] = {}
        for s in plan.samplers:
            if s.n_fed < s.plen:
                continue                     # finishing its prompt this step
            k = getattr(s.sampling, "num_speculative_tokens", None)
            k = spec.k if k is None else min(int(k), spec.k)  # type: ignore[union-attr]
            cap = int(s.sampling.max_tokens) - s.n_out - 1
            if self._ctx is not None:
                cap = min(cap, int(self._ctx) - 1 - int(rows.pos[s.slot]))
            k = min(k, cap)
            if k > 0:
                caps[s.slot] = k
        if not caps or budget <= 0:
            return {}
        d = self._drafter
        acc = self._accept
        props: dict = {}
        if isinstance(d, NgramDrafter):    # n-gram drafts cost nothing: offer what exists
            props = self._grammar_cut(plan, d.propose_many(caps))
            kind = d.kind
            offers = [(slot, acc.p(slot, kind[slot]), len(t)) for slot, t in props.items() if t]
        else:
            offers = [(slot, acc.p(slot, 0), k) for slot, k in caps.items()]
        want = plan_drafts(len(plan.seqs), offers, self._cost)
        for slot in caps:
            if slot not in want:
                acc.idle(slot)
        if not want:
            acc.idle_all()
        self._kind = {slot: d.kind[slot] for slot in want}
        for slot, k in list(want.items()):  # never past max_batch_tokens
            want[slot] = k = min(k, budget)
            budget -= k
            if k <= 0:
                del want[slot]
        if not want:
            return {}
        self._reject = False
        if props:
            out = {slot: props[slot] for slot in want}
        else:
            sample_from = None
            if spec.acceptance == "rejection" and all(  # type: ignore[union-attr]
                    rows.rejection_ok(s.slot) and s.constraint is None
                    for s in plan.samplers):
                self._reject = True
                sample_from = {s.slot: (float(rows.temperature[s.slot]), int(rows.seed[s.slot]),
                                        int(rows.step[s.slot])) for s in plan.samplers
                               if s.slot in want}
            try:
                out = self._grammar_cut(plan, d.propose_many(want, sample_from))
            except Exception:  # noqa: BLE001 - a drafter failure costs speed, never output
                log.exception("the draft model failed; decoding this step without drafts")
                return {}
        drafts = {slot: list(t[:want[slot]]) for slot, t in out.items() if t}
        self._spec_masks = None
        if any(s.constraint is not None for s in plan.samplers):
            self._spec_masks = self._grammar_masks(plan, drafts)
        return {slot: t for slot, t in drafts.items() if t}

    def _grammar_cut(self, plan: Plan, drafts: dict) -> dict:
        """``drafts`` ({slot: tokens}) with each constrained sequence's drafts cut where
        its grammar refuses them (:meth:`_grammar_prefix`); before planning, so the plan
        sees the lengths that can be verified."""
        for s in plan.samplers:
            if s.constraint is not None and drafts.get(s.slot):
                drafts[s.slot] = drafts[s.slot][:self._grammar_prefix(s.constraint,
                                                                      drafts[s.slot])]
        return drafts

    def _grammar_masks(self, plan: Plan, drafts: dict) -> dict:
        """For each constrained sampler (its drafts already cut by :meth:`_grammar_cut`):
        the grammar mask of each of its verify rows, ``[n_draft + 1, W]`` int32 (row j =
        the state after j drafts), so the target samples every row exactly as a plain
        constrained step would. The matcher is walked down the drafts and rolled back:
        delivery accepts the tokens that are emitted. Returns {slot: masks}."""
        from tep.structured.bitmask import bitmask_words

        masks = {}
        W = bitmask_words(self.vocab_size)
        for s in plan.samplers:
            c = s.constraint
            if c is None:
                continue
            t = drafts.get(s.slot, [])
            m = np.empty((len(t) + 1, W), np.int32)
            c.fill_bitmask(m[0])
            walked = 0
            try:
                for j, tok in enumerate(t):
                    if not c.accept(tok):      # valid_prefix said it would: a matcher bug
                        del t[j:]
                        m = m[:j + 1]
                        break
                    walked += 1
                    c.fill_bitmask(m[j + 1])
            finally:
                if walked:
                    c.rollback(walked)
            masks[s.slot] = m
        return masks

    def _spec_step(self, plan: Plan, drafts: dict, t0: float) -> None:
        """A step with drafts: each drafting sequence feeds its last token plus its drafts
        (K + 1 logits rows), one ``verify`` for all samplers, the rejected drafts' cache
        rewound, and every emitted token delivered in order."""
        rows, samplers = self.rows, plan.samplers
        B = len(samplers)
        slots = np.fromiter((s.slot for s in samplers), np.int64, B)
        nd = np.zeros(B, np.int64)
        K = max(len(t) for t in drafts.values())
        dr = np.zeros((B, K), np.int32)
        for i, s in enumerate(samplers):
            t = drafts.get(s.slot)
            if t:
                nd[i] = len(t)
                dr[i, :len(t)] = t
        tok: list[int] = []
        pos: list[int] = []
        sid: list[int] = []
        want: list[bool] = []
        for s, n in zip(plan.seqs, plan.counts):
            a = s.n_fed
            if a < s.plen:
                tok += s.prompt[a:a + n].tolist()
                pos += range(a, a + n)
                want += [False] * (n - 1) + [a + n == s.plen]
                sid += [s.slot] * n
            else:
                t = drafts.get(s.slot, ())
                p0 = int(rows.pos[s.slot])
                tok.append(int(rows.last[s.slot]))
                tok += t
                pos += range(p0, p0 + 1 + len(t))
                want += [True] * (1 + len(t))
                sid += [s.slot] * (1 + len(t))
        batch = StepBatch(token_ids=np.asarray(tok, np.int32), positions=np.asarray(pos, np.int32),
                          seq_ids=np.asarray(sid, np.int32), logits=np.asarray(want, bool))
        decoding = [s.n_fed >= s.plen for s in samplers]
        t1 = time.perf_counter()
        try:
            with self.model_lock:
                out = self.model.forward(batch)
            logits = self._check_logits(out, int(nd.sum()) + B)
        except Exception as e:  # the model failed this step: only its sequences fail
            log.warning("model forward failed; failing %d sequences: %r", len(plan.seqs), e)
            for s in list(plan.seqs):
                self._finish(s, e)
            return
        t2 = time.perf_counter()
        st = self.stats
        st.steps += 1
        st.tokens_fed += batch.n_tokens
        st.forward_s += t2 - t1
        if not plan.prefills:   # one pass per distinct count of tokens fed by a sequence
            self._cost.observe(batch.n_tokens, t2 - t1, len(set(nd.tolist())))
        for s, n in zip(plan.seqs, plan.counts):
            if s.n_fed < s.plen:
                rows.pos[s.slot] += n
                s.n_fed += n
        static = None
        if self._decode is not None and self._decode.plan is plan:
            static = self._decode.static
        if self._reject:
            res, errors = self._verify_rejection(logits, slots, dr, nd, drafts)
        else:
            res, errors = rows.verify_rows(logits, slots, dr, nd, static,
                                           self._spec_bitmask(samplers, nd))
        t3 = time.perf_counter()
        st.sample_s += t3 - t2
        if self.steps is not None:
            self.steps.append(StepRecord(len(plan.seqs), batch.n_tokens, tuple(slots.tolist())))
        counts = res.n_tokens.tolist()
        source = self._drafter.source
        runs = []
        for i, s in enumerate(samplers):
            n, k, slot = counts[i], int(nd[i]), s.slot
            toks = res.token_ids[i, :n].tolist()
            if decoding[i]:
                p0 = int(rows.pos[slot])
                rows.pos[slot] = p0 + n
                if n < k + 1 and n > 0:
                    try:   # the rejected drafts' cache
                        self._rewind(slot, p0 + n)
                    except Exception as e:  # noqa: BLE001
                        log.warning("model.rewind failed: %r", e)
                        runs.append((s, [], e))
                        continue
            if n:
                if k:
                    a = n - 1
                    self._drafter.verified(slot, a)
                    self._accept.update(slot, self._kind.get(slot, 0), k, a)
                    self.spec_stats.add(source, k, a, n)
                self._drafter.extend(slot, toks)
                rows.record_run(slot, toks)
            st.tokens_sampled += n
            err = errors[i]
            if err is None and int(res.status[i]) != 0:
                err = ValueError(f"logits: the row {_status_text(int(res.status[i]))}")
            runs.append((s, toks, err))
        for i, (s, toks, err) in enumerate(runs):
            self._deliver_run(s, toks, i, res, err)
        st.step_s += time.perf_counter() - t0

    def _grammar_prefix(self, c: Any, toks: list) -> int:
        """How many of ``toks`` (drafts) the constraint ``c`` allows in a row, up to and
        including an end-of-generation token; 0 for a constraint without draft support
        (``valid_prefix``/``rollback``)."""
        if not (hasattr(c, "rollback") and hasattr(c, "valid_prefix")):
            return 0
        n = c.valid_prefix(toks)
        return next((j + 1 for j, tok in enumerate(toks[:n]) if tok in self._eog), n)

    def _spec_bitmask(self, samplers: list, nd: np.ndarray) -> np.ndarray | None:
        """The verify call's grammar masks, int32 [sum(nd + 1), W] (all bits set for an
        unconstrained sequence's rows), or None when no sampler is constrained."""
        masks = self._spec_masks
        if not masks:
            return None
        W = next(iter(masks.values())).shape[1]
        bm = np.full((int(nd.sum()) + len(samplers), W), -1, np.int32)
        r = 0
        for i, s in enumerate(samplers):
            n = int(nd[i]) + 1
            m = masks.get(s.slot)
            if m is not None:
                bm[r:r + n] = m[:n]
            r += n
        return bm

    def _verify_rejection(self, logits: np.ndarray, slots: np.ndarray, dr: np.ndarray,
                          nd: np.ndarray, drafts: dict) -> tuple[Any, list]:
        """Rejection-sampling verification of draft-model drafts (every row of the step is
        temperature-only: ``RowState.rejection_ok``)."""
        from tep.kernels import verify_rejection

        rows = self.rows
        q = self._drafter.last_probs
        V = logits.shape[1]
        parts = []
        for i, slot in enumerate(slots.tolist()):
            k = int(nd[i])
            if k:
                p = q[slot][:k, :V]
                if p.shape[1] < V:
                    p = np.pad(p, ((0, 0), (0, V - p.shape[1])))
                parts.append(p)
        probs = np.ascontiguousarray(np.concatenate(parts)) if parts else \
            np.zeros((0, V), np.float32)
        t0 = time.perf_counter()
        res = verify_rejection(logits, dr, probs, n_draft=nd,
                               temperature=rows.temperature[slots], seed=rows.seed[slots],
                               step=rows.step[slots], row_status=True)
        rows.kernel_s += time.perf_counter() - t0
        return res, [None] * slots.shape[0]

    def _deliver_run(self, s: Seq, toks: list, i: int, res: Any,
                     err: BaseException | None) -> None:
        """Deliver a verified run token by token until the sequence ends."""
        k = s.sampling.logprobs
        c = s.constraint
        for j, tok in enumerate(toks):
            if s.done:
                return
            if c is not None and not self._grammar_accepts(s, c, tok):
                return
            s.n_out += 1
            kw: dict = {}
            if k is not None and res.logprobs is not None:
                kw = {"logprob": float(res.logprobs[i, j]),
                      "top_logprobs": list(zip(res.top_token_ids[i, j, :k].tolist(),
                                               res.top_logprobs[i, j, :k].tolist())),
                      "token_bytes": self._piece(tok)}
            if not self._emit(s, tok, kw):
                return
        if err is not None and not s.done:
            self._finish(s, err)

    # ---- pieces of a step
    def _reuse_prefix(self, s: Seq) -> int:
        n = 0
        try:
            n = int(self._reuse(s.slot, s.prompt.tolist()))  # type: ignore[misc]
        except Exception:
            log.exception("reuse_prefix failed; evaluating the whole prompt")
            n = 0
        n = max(0, min(n, s.plen - 1))
        try:
            s.sink.cached_tokens = n   # per request (a router learns what was cached)
        except AttributeError:
            pass
        self.stats.prefix_hit_tokens += n
        self.stats.prefix_miss_tokens += s.plen - n
        return n

    def _build_batch(self, plan: Plan) -> tuple[StepBatch, np.ndarray, np.ndarray]:
        """The step's StepBatch, and the slots fed with their token counts."""
        N = plan.n_tokens
        tok = np.empty(N, np.int32)
        pos = np.empty(N, np.int32)
        sid = np.empty(N, np.int32)
        want = np.zeros(N, bool)
        rows = self.rows
        i = 0
        for s, n in zip(plan.seqs, plan.counts):
            a = s.n_fed
            if a < s.plen:
                tok[i:i + n] = s.prompt[a:a + n]
                pos[i:i + n] = np.arange(a, a + n, dtype=np.int32)
                if a + n == s.plen:
                    want[i + n - 1] = True
            else:
                tok[i] = rows.last[s.slot]
                pos[i] = rows.pos[s.slot]
                want[i] = True
            sid[i:i + n] = s.slot
            i += n
        fed = np.fromiter((s.slot for s in plan.seqs), np.int64, len(plan.seqs))
        return (StepBatch(token_ids=tok, positions=pos, seq_ids=sid, logits=want), fed,
                np.asarray(plan.counts, np.int64))

    def _check_logits(self, logits: Any, n_rows: int) -> np.ndarray:
        if logits is self._checked and logits.shape[0] == n_rows:
            return logits     # the view the model returned last step, checked then
        if (type(logits) is np.ndarray and logits.dtype == _F32
                and logits.shape == (n_rows, self.vocab_size) and logits.flags.c_contiguous):
            self._checked = logits
            return logits     # what a model normally returns: nothing to convert
        if not isinstance(logits, np.ndarray):
            raise TypeError(f"forward must return a numpy array, got {type(logits).__name__}")
        if logits.shape != (n_rows, self.vocab_size):
            raise ValueError(f"forward returned shape {logits.shape}, expected "
                             f"({n_rows}, {self.vocab_size})")
        if logits.dtype != np.float32:
            logits = logits.astype(np.float32)
        return np.ascontiguousarray(logits)

    def _finish_masks(self, constrained: list) -> Any:
        """The step's bitmask; a grammar that failed to produce its mask fails its
        sequences (``StepMasks`` marks them and leaves their rows end-of-sequence only)."""
        res = self._masks.finish()
        if res.error is not None:
            log.warning("structured-output mask failed: %r", res.error)
        return res.bitmask

    def _piece(self, tok: int) -> bytes:
        b = self._piece_cache.get(tok)
        if b is None:
            b = bytes(self._detok([tok])) if self._detok is not None else b""
            if len(self._piece_cache) < 1 << 20:
                self._piece_cache[tok] = b
        return b

    def _update_from_output(self, samplers: list, res: Any) -> None:
        toks = res.token_ids.tolist()
        all_ok = res.all_ok
        eog, texts = self._eog, self._text_cache
        for i, s in enumerate(samplers):
            tok = toks[i]
            if s.slow or tok in eog or not all_ok:
                s.n_out += 1
                self._deliver_slow(s, tok, i, res)
                continue
            s.n_out += 1
            text = texts.get(tok) if not s.pending else None
            if text is None:
                text = self._text_of(s, tok)
            sink = s.sink
            if not sink.emit_token(text, tok):
                self._finish(s, None, cancelled=sink._cancel.is_set()
                             if hasattr(sink, "_cancel") else False)

    def _text_of(self, s: Seq, tok: int) -> str:
        """The text ``tok`` adds to ``s`` (its incremental UTF-8 decoder), and remember
        tokens that are whole UTF-8 on their own so the next time needs no decoder."""
        b = self._piece(tok)
        if not s.pending and tok not in self._text_cache:
            try:
                t = b.decode("utf-8")
                if len(self._text_cache) < 1 << 20:
                    self._text_cache[tok] = t
                return t
            except UnicodeDecodeError:
                pass
        text = s.decoder.decode(b)
        s.pending = bool(s.decoder.getstate()[0])
        return text

    def _deliver_slow(self, s: Seq, tok: int, i: int, res: Any) -> None:
        """A token with logprobs, a constraint or an end-of-generation ID, or a row that
        failed."""
        if not res.ok[i]:
            self._finish(s, res.errors[i])
            return
        kw: dict = {}
        k = s.sampling.logprobs
        if res.logprobs is not None and k is not None:
            kw = {"logprob": float(res.logprobs[i]),
                  "top_logprobs": list(zip(res.top_ids[i, :k].tolist(),
                                           res.top_lps[i, :k].tolist())),
                  "token_bytes": self._piece(tok)}
        c = s.constraint
        if c is not None and not self._grammar_accepts(s, c, tok):
            return
        self._emit(s, tok, kw)

    def _grammar_accepts(self, s: Seq, c: Any, tok: int) -> bool:
        """Advance ``s``'s constraint past ``tok``; when it refuses (or its mask failed
        earlier) the sequence ends with the constraint's typed error."""
        failed = getattr(c, "failed", None)
        if failed is None and c.accept(tok):
            return True
        violation = getattr(c, "violation", None)   # a typed 400 for the client
        self._finish(s, failed or (violation(tok) if violation is not None else
                                   ValueError(f"token {tok} broke the constraint")))
        return False

    def _emit(self, s: Seq, tok: int, kw: dict) -> bool:
        """Hand one sampled token to the sequence's sink; an end-of-generation ID finishes
        it (``stop``), a sink that refuses (client gone, stop string, max_tokens) ends it.
        Returns whether the sequence goes on."""
        sink = s.sink
        if tok in self._eog:
            sink.emit_token(s.decoder.decode(b"", final=True), tok, **kw)
            sink.emit_finish("stop")
            self._finish(s, None)
            return False
        text = self._text_cache.get(tok) if not s.pending else None
        if not sink.emit_token(text if text is not None else self._text_of(s, tok), tok, **kw):
            self._finish(s, None, cancelled=sink._cancel.is_set()
                         if hasattr(sink, "_cancel") else False)
            return False
        return True

    def _drop_cancelled(self) -> None:
        if self.sched.waiting:
            for s in list(self.sched.waiting):
                if s.sink.cancelled:
                    self._finish(s, None, cancelled=True)
        for s in [s for s in self.sched.running if s.sink.cancelled]:
            self._finish(s, None, cancelled=True)

    def _finish(self, s: Seq, exc: BaseException | None, *, cancelled: bool = False) -> None:
        if s.done:
            return
        s.done = True
        slot = s.slot
        self.sched.free(s)
        if slot >= 0:
            self.rows.release(slot)
            if self._drafter is not None:
                self._drafter.release(slot)
            fl = self._inflight
            if fl is not None and slot in fl.slot_set:
                self._deferred.append(slot)   # its cache is being written: release after
            else:
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
