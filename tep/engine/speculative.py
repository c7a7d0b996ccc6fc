"""Speculative decoding on the engine: settings, draft sources and their counters.

A decoding sequence may propose up to K draft tokens per step. The engine feeds its last
token plus the drafts as extra rows of the same :class:`~tep.engine.model.StepBatch`
(K + 1 logits rows), verifies them with :func:`tep.kernels.verify` (exact match against
the sampler's own (seed, step) draws: a seeded output never changes with speculation)
and rewinds the model's cache past the first rejected draft (``Model.rewind``).

Draft sources:

- ``ngram``: prompt/history lookup. The last n tokens (n = 3, then 2, then 1) are looked up
  among the sequence's earlier tokens; the tokens that followed the latest earlier
  occurrence are the drafts. An index of n-gram -> next position is kept per sequence
  (compiled: tep/_kernels/ngram.pyx) and updated per accepted token, so a lookup is O(1),
  never a scan of the history; :meth:`NgramDrafter.propose_many` looks up a whole batch in
  one call, without the GIL.
- ``draft``: a second :class:`tep.engine.Model` (a smaller GGUF) decodes K tokens greedily
  per step for every speculating sequence, batched (see :class:`DraftModelDrafter`).

How many drafts to verify is decided per step, for the whole batch
(:func:`plan_drafts`): each sequence's acceptance estimate (:class:`Acceptance`) and the
forward's measured cost by tokens fed (:class:`StepCost`) give the draft lengths that
maximise expected tokens per second, which is none when drafts would not pay - so free
text, whose drafts are rarely accepted, runs as without speculation.
"""
from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Mapping, Sequence

import numpy as np

from tep._kernels.ngram import NgramIndex

__all__ = ["SpecConfig", "SpecStats", "NgramDrafter", "DraftModelDrafter", "Acceptance",
           "StepCost", "plan_drafts", "MODES", "ACCEPTANCE"]

MODES = ("off", "ngram", "draft")
ACCEPTANCE = ("exact", "rejection")
NGRAM_SIZES = (3, 2, 1)
# An n-gram draft's kind is the length of its match with the text before it (looked up
# to MATCH_REACH tokens back), bucketed: a long match is a copied run, whose drafts are
# accepted far more often than a 1-token coincidence in free text.
MATCH_REACH = 32
MATCH_BUCKETS = (1, 2, 3, 4, 8, 16)          # kind i + 1: match length >= MATCH_BUCKETS[i]
# The acceptance a kind is expected to have before the engine has seen any (index 0: a
# draft model's drafts); learned away after a few verifications.
KIND_START = (0.8, 0.5, 0.6, 0.7, 0.85, 0.93, 0.97)


def match_kind(length: int) -> int:
    """The draft kind (1..6) of an n-gram match of ``length`` tokens."""
    return bisect.bisect_right(MATCH_BUCKETS, length)


# match_kind of every length a lookup can report (at most max(MATCH_REACH, NGRAM_SIZES))
_KIND_OF_LENGTH = tuple(match_kind(m) for m in range(max(MATCH_REACH, *NGRAM_SIZES) + 1))


@dataclass(frozen=True)
class SpecConfig:
    """How an engine speculates.

    Attributes:
        mode: "off", "ngram" (history lookup) or "draft" (a second model).
        k: most draft tokens per sequence per step (1..64); a request may ask for fewer
            (``num_speculative_tokens``, 0 = off for it).
        acceptance: "exact" (a seeded output is the same as without speculation) or
            "rejection" (draft-model drafts accepted with min(1, p/q), residual resampling:
            the output distribution is the target's, a seeded output may differ).
        draft_model: the drafter (a :class:`tep.engine.Model`) for mode "draft".
    """

    mode: str = "off"
    k: int = 4
    acceptance: str = "exact"
    draft_model: Any = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"speculative must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.acceptance not in ACCEPTANCE:
            raise ValueError(f"speculative_acceptance must be one of "
                             f"{', '.join(ACCEPTANCE)}, got {self.acceptance!r}")
        if not 1 <= int(self.k) <= 64:
            raise ValueError(f"num_speculative_tokens must be in [1, 64], got {self.k}")
        if self.mode == "draft" and self.draft_model is None:
            raise ValueError("speculative 'draft' needs a draft model (--draft-model PATH)")

    @property
    def on(self) -> bool:
        return self.mode != "off"


@dataclass
class SpecStats:
    """Counters since start, per draft source (exported as metrics).

    drafted: draft tokens verified; accepted: of them, accepted; runs: verifications
    (sequence-steps that carried at least one draft); emitted: tokens those runs emitted
    (accepted + the target's own token)."""

    drafted: dict = field(default_factory=dict)
    accepted: dict = field(default_factory=dict)
    runs: dict = field(default_factory=dict)
    emitted: dict = field(default_factory=dict)

    def add(self, source: str, drafted: int, accepted: int, emitted: int) -> None:
        self.drafted[source] = self.drafted.get(source, 0) + drafted
        self.accepted[source] = self.accepted.get(source, 0) + accepted
        self.runs[source] = self.runs.get(source, 0) + 1
        self.emitted[source] = self.emitted.get(source, 0) + emitted

    def acceptance_rate(self, source: str) -> float:
        d = self.drafted.get(source, 0)
        return self.accepted.get(source, 0) / d if d else 0.0

    def mean_accepted_length(self, source: str) -> float:
        """Accepted drafts per verification run."""
        r = self.runs.get(source, 0)
        return self.accepted.get(source, 0) / r if r else 0.0


class Acceptance:
    """The chance p that a slot's next draft token is accepted, by draft kind (0: a draft
    model's drafts; 1..6: an n-gram draft by the length of its match, :func:`match_kind`).

    A verification of k drafts of which a were accepted is a geometric trial: a
    successes, then one failure when a < k. Per slot and kind, p = successes / trials
    over a fading window (``decay`` per verification), with the engine-wide estimate for
    that kind as a prior worth ``weight`` trials; the engine-wide estimate itself fades
    (``global_decay``) toward ``start[kind]``. A step in which a slot does not
    draft moves it back toward the prior by ``recover``, and a step in which nobody
    drafts moves the engine-wide estimates toward ``start`` by ``recover`` / 10, so a
    text that starts copying late is offered drafts again. Kinds separate what predicts
    well (a 3-gram that continues a copied run) from what does not (a 1-gram in free
    text)."""

    KINDS = len(KIND_START)

    def __init__(self, slots: int, *, start: Sequence[float] = KIND_START,
                 weight: float = 1.0, decay: float = 0.8, global_decay: float = 0.97,
                 recover: float = 0.03) -> None:
        if len(start) != self.KINDS:
            raise ValueError(f"start needs {self.KINDS} values (one per kind)")
        self.start, self.weight = tuple(start), weight
        self.decay, self.global_decay, self.recover = decay, global_decay, recover
        self.hits = [[0.0] * self.KINDS for _ in range(slots)]
        self.trials = [[0.0] * self.KINDS for _ in range(slots)]
        self.g_hits = [0.0] * self.KINDS
        self.g_trials = [0.0] * self.KINDS

    def reset(self, slot: int) -> None:
        self.hits[slot] = [0.0] * self.KINDS
        self.trials[slot] = [0.0] * self.KINDS

    def prior(self, kind: int) -> float:
        """The engine-wide estimate for ``kind``."""
        return (self.g_hits[kind] + self.start[kind]) / (self.g_trials[kind] + 1.0)

    def p(self, slot: int, kind: int) -> float:
        w = self.weight
        return ((self.hits[slot][kind] + w * self.prior(kind))
                / (self.trials[slot][kind] + w))

    def update(self, slot: int, kind: int, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        trials = accepted + (accepted < drafted)
        h, t, d = self.hits[slot], self.trials[slot], self.decay
        h[kind] = d * h[kind] + accepted
        t[kind] = d * t[kind] + trials
        g = self.global_decay
        self.g_hits[kind] = g * self.g_hits[kind] + accepted
        self.g_trials[kind] = g * self.g_trials[kind] + trials

    def idle(self, slot: int) -> None:
        """The slot decoded without drafts this step."""
        r = 1.0 - self.recover
        h, t = self.hits[slot], self.trials[slot]
        for k in range(self.KINDS):
            h[k] *= r
            t[k] *= r

    def idle_all(self) -> None:
        """Nobody drafted this step."""
        r = 1.0 - self.recover / 10
        for k in range(self.KINDS):
            self.g_hits[k] *= r
            self.g_trials[k] *= r


class StepCost:
    """What a decode step's forward costs (seconds) by the tokens it feeds and the passes
    it takes, learned from the steps the engine runs.

    A step whose sequences feed different numbers of tokens takes one pass over the
    weights per distinct number (llama.cpp splits a batch into micro-batches of equal
    tokens per sequence), and each pass costs about what a small step costs: on the
    2-core test machine 4 sequences x 4 tokens take 126 ms, 1+1+7+7 tokens 138 ms and
    1+3+5+7 tokens 172 ms. So the table holds one-pass steps, an exponential average per
    token count, and each further pass adds ``pass_s``, learned from the steps that took
    several (until then: the cost per token of the smallest step seen, a guess between a
    token's and a step's price).

    A count not seen yet is estimated from the seen ones: linearly between the nearest
    two; beyond the largest, with the slope of the last two (or, with one point,
    ``prior_slope`` x its cost per extra token - optimistic, so the engine tries a draft
    and learns the real price); below the smallest, as the smallest."""

    def __init__(self, *, alpha: float = 0.1, prior_slope: float = 0.05) -> None:
        self.alpha, self.prior_slope = alpha, prior_slope
        self._t: dict[int, float] = {}
        self._n: dict[int, int] = {}
        self._keys: list[int] = []
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None   # (keys, costs), sorted
        self._pass: float | None = None     # learned cost of one more pass (seconds)
        self._pass_n = 0
        self.frozen = False                 # True: observe() learns nothing (fixed)

    @classmethod
    def fixed(cls, costs: Mapping[int, float], pass_s: float | None = None) -> "StepCost":
        """A table that does not learn: a one-pass step of ``n`` tokens costs ``costs[n]``
        seconds (counts in between and beyond estimated by the class rules) and each
        further pass ``pass_s`` (None: the learned table's guess before it has seen one,
        the smallest step's cost per token). The draft plan then follows from the
        acceptance estimates alone, never from how loaded the machine was while steps
        ran: for tests, and for a deployment that measured its model once. Only an
        engine with speculative decoding reads it."""
        if not costs:
            raise ValueError("a fixed step cost needs at least one token count")
        c = cls()
        for n, t in costs.items():
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 \
                    or not 0 < float(t) < float("inf"):
                raise ValueError(f"step cost {n!r} tokens -> {t!r} s: need an integer "
                                 "count >= 1 and a finite cost > 0")
            c._t[int(n)] = float(t)
        if pass_s is not None and not 0 <= float(pass_s) < float("inf"):
            raise ValueError(f"pass_s must be finite and >= 0, got {pass_s}")
        c._keys, c.frozen = sorted(c._t), True
        c._pass = None if pass_s is None else float(pass_s)
        return c

    @classmethod
    def of(cls, model: Any) -> "StepCost":
        """The cost table of ``model`` (shared by every engine that runs it: the cost is
        the model's and the machine's, and a new engine need not learn it again)."""
        try:
            c = _COSTS.get(model)
            if c is None:
                c = _COSTS[model] = cls()
            return c
        except TypeError:            # not weak-referenceable: this engine's own table
            return cls()

    def observe(self, n_tokens: int, seconds: float, passes: int = 1) -> None:
        """Record one forward of ``n_tokens`` that took ``seconds`` in ``passes`` passes
        (the number of distinct per-sequence token counts in it)."""
        if self.frozen or n_tokens <= 0 or not seconds > 0:
            return
        if passes > 1:
            if self._keys:    # the excess over a one-pass step of as many tokens
                extra = max(0.0, (seconds - float(self.many(np.array([n_tokens]))[0]))
                            / (passes - 1))
                self._pass_n += 1
                old = self._pass
                self._pass = extra if old is None else \
                    old + max(self.alpha, 1.0 / self._pass_n) * (extra - old)
            return
        n = self._n.get(n_tokens, 0) + 1
        self._n[n_tokens] = n
        old = self._t.get(n_tokens)
        if old is None:
            self._t[n_tokens] = seconds
            self._keys = sorted(self._t)
            self._arrays = None
        else:   # a plain mean over the first 1/alpha steps (one slow step is not the
            # price), then an exponential average
            self._t[n_tokens] = old + max(self.alpha, 1.0 / n) * (seconds - old)
            self._arrays = None

    def many(self, n_tokens: np.ndarray) -> np.ndarray:
        """The estimated costs (seconds) of steps of ``n_tokens`` (an array of counts),
        by the rules in the class docstring; at least one count must have been seen."""
        if self._arrays is None:     # rebuilt after a step, not per estimate
            self._arrays = (np.asarray(self._keys, np.float64),
                            np.asarray([self._t[k] for k in self._keys], np.float64))
        keys, vals = self._arrays
        n = np.asarray(n_tokens, np.float64)
        out = np.interp(n, keys, vals)        # flat below the first and past the last
        last = keys[-1]
        if len(keys) >= 2:
            slope = max(0.0, (vals[-1] - vals[-2]) / (keys[-1] - keys[-2]))
        else:
            slope = self.prior_slope * vals[-1]
        beyond = n > last
        out[beyond] = vals[-1] + slope * (n[beyond] - last)
        return out

    @property
    def pass_s(self) -> float | None:
        """The estimated cost (seconds) of one more pass, or None before any step."""
        if self._pass is not None:
            return self._pass
        if not self._keys:
            return None
        k = self._keys[0]
        return self._t[k] / k

    def __call__(self, n_tokens: int) -> float | None:
        """The cost of a step of ``n_tokens`` (seconds), or None before any step."""
        t = self._t.get(n_tokens)
        if t is not None or not self._keys:
            return t
        return float(self.many(np.array([n_tokens]))[0])


_COSTS: "weakref.WeakKeyDictionary[Any, StepCost]" = weakref.WeakKeyDictionary()


def plan_drafts(base_tokens: int, offers: Sequence[tuple[int, float, int]],
                cost: StepCost, *, margin: float = 0.02) -> dict[int, int]:
    """How many drafts each slot verifies this step: ``offers`` = (slot, p, most); the
    step decodes ``base_tokens`` sequences, one token each before drafts.

    The choice maximises expected tokens emitted per second of forward. Every decoding
    row emits one token; the j-th draft of a slot adds p**j expected tokens (it counts
    only when the j - 1 before it were accepted) and one token to the batch, and every
    distinct number of drafts in the step (no drafts counts too) is one pass of the
    forward (:class:`StepCost`). Two families of plans are priced:

    - best first: drafts taken in order of p**j across the batch, every prefix of that
      order (not the first that stops improving: a step's cost is not linear in its
      tokens; on a CPU, two tokens of one sequence can cost much more than one, a third
      little more);
    - one length: every K, the m slots that gain most from K drafts each draft K (one
      pass if all rows do, else two), every m.

    The best plan must beat the plain step by ``margin`` (measured costs are noisy).
    Returns {slot: k > 0}."""
    base = cost(base_tokens)
    if base is None or not offers:
        return {}
    offers = [(slot, p, most) for slot, p, most in offers if p > 0 and most > 0]
    if not offers:
        return {}
    B = base_tokens
    pass_s = cost.pass_s or 0.0
    # (plain Python past this one estimate: the lists are short, numpy's per-call cost
    # is not, and this runs every decode step)
    top = sum(most for _, _, most in offers)
    step_s = cost.many(np.arange(B, B + top + 1)).tolist()    # [n]: one pass, B + n tokens
    best_ratio = B / base * (1.0 + margin)
    best: dict[int, int] | None = None

    # best first
    gains = sorted(((p ** j, slot) for slot, p, most in offers
                    for j in range(1, most + 1)), reverse=True)
    lens: dict[int, int] = {}       # slot -> drafts so far
    have: dict[int, int] = {}       # number of drafts -> slots with that many
    expected, cut = float(B), 0
    for i, (g, slot) in enumerate(gains):
        k = lens.get(slot, 0)
        if k:
            have[k] -= 1
            if not have[k]:
                del have[k]
        lens[slot] = k + 1
        have[k + 1] = have.get(k + 1, 0) + 1
        expected += g
        passes = len(have) + (len(lens) < B)
        r = expected / max(step_s[i + 1] + (passes - 1) * pass_s, 1e-12)
        if r > best_ratio:
            best_ratio, cut = r, i + 1
    if cut:
        best = {}
        for _, slot in gains[:cut]:
            best[slot] = best.get(slot, 0) + 1

    # one length (with one slot offering, these are the best-first prefixes again)
    if len(offers) > 1:
        sums = [(slot, most, list(accumulate(p ** j for j in range(1, most + 1))))
                for slot, p, most in offers]
        for k in range(1, max(most for _, _, most in offers) + 1):
            ranked = sorted(((g[k - 1], slot) for slot, most, g in sums if most >= k),
                            reverse=True)
            expected = float(B)
            for m, (g1, _) in enumerate(ranked, 1):
                expected += g1
                r = expected / max(step_s[k * m] + (pass_s if m < B else 0.0), 1e-12)
                if r > best_ratio:
                    best_ratio, best = r, {slot: k for _, slot in ranked[:m]}
    return best or {}


class NgramDrafter:
    """Prompt/history n-gram lookup, O(1) per lookup and per appended token.

    Per slot, in a compiled index (:class:`tep._kernels.ngram.NgramIndex`): the tokens
    (prompt then output) and, for each n in ``NGRAM_SIZES``, a hash table n-gram -> the
    position right after its latest occurrence. The index covers the n-grams that end
    before the last token, so the lookup of the last n tokens finds an *earlier*
    occurrence whose continuation already exists; the sizes are tried in order (largest
    first) and the first found gives the drafts. A draft's kind is :func:`match_kind` of
    its match length (measured up to ``MATCH_REACH`` tokens back).

    A released (or never admitted) slot proposes nothing and ignores ``extend``."""

    source = "ngram"

    def __init__(self, slots: int) -> None:
        self._index = NgramIndex(slots, NGRAM_SIZES, MATCH_REACH)
        self.kind = [0] * slots     # the kind of each slot's last proposal (match_kind)

    @property
    def nbytes(self) -> int:
        """Bytes of C memory the index holds (flat over admit / release cycles)."""
        return self._index.nbytes

    def admit(self, slot: int, prompt: Sequence[int]) -> None:
        self._index.admit(slot, prompt)

    def release(self, slot: int) -> None:
        self._index.release(slot)

    # A free slot is the rare case: it costs an exception, the common case one call.
    def extend(self, slot: int, tokens: Sequence[int]) -> None:
        try:
            self._index.extend(slot, tokens)
        except ValueError:
            if self._index.live(slot):
                raise                   # a bad token id, not a free slot

    def verified(self, slot: int, accepted: int) -> None:
        """Nothing to undo: the index only ever holds emitted tokens."""

    def propose(self, slot: int, k: int) -> list[int]:
        """Up to k drafts for ``slot`` (empty when no n-gram recurs)."""
        if k <= 0:
            return []
        try:
            drafts, m = self._index.propose(slot, k)
        except ValueError:
            if self._index.live(slot):
                raise
            return []
        if drafts:
            self.kind[slot] = _KIND_OF_LENGTH[m]
        return drafts

    def propose_many(self, want: dict[int, int]) -> dict[int, list[int]]:
        """``{slot: propose(slot, k)}`` for ``want`` = {slot: k}, in one compiled call
        (the lookups run without the GIL)."""
        slots = list(want)
        try:
            drafts, match = self._index.propose_lists(slots, list(want.values()))
        except ValueError:              # a free slot or a k < 0 among them: no drafts there
            ok = {s: k for s, k in want.items() if k > 0 and self._index.live(s)}
            if len(ok) == len(want):
                raise
            return {s: [] for s in want} | (self.propose_many(ok) if ok else {})
        kind, kinds = self.kind, _KIND_OF_LENGTH
        for s, m in zip(slots, match):
            if m:
                kind[s] = kinds[m]
        return dict(zip(slots, drafts))


class DraftModelDrafter:
    """A second :class:`tep.engine.Model` proposes K tokens greedily per step.

    The drafter keeps its own cache per engine slot (same seq ids): each step it is fed
    what the target accepted since (rewinding past rejected drafts first), then decodes K
    tokens one forward at a time, all speculating sequences batched together."""

    source = "draft"

    def __init__(self, model: Any, slots: int, vocab_size: int) -> None:
        if int(model.vocab_size) < 1:
            raise ValueError("the draft model has no vocabulary")
        if not callable(getattr(model, "rewind", None)):
            raise TypeError("the draft model must have rewind(seq_id, n) (e.g. a "
                            "LlamaCppModel)")
        self.model = model
        self.vocab_size = vocab_size
        self._toks: list[list[int] | None] = [None] * slots
        self._cached = np.zeros(slots, np.int64)    # tokens in the drafter's cache
        self.kind = [0] * slots                     # one kind of draft (Acceptance)
        self.last_probs: dict[int, np.ndarray] = {}

    def admit(self, slot: int, prompt: Sequence[int]) -> None:
        self._toks[slot] = [int(t) for t in prompt]
        self._cached[slot] = 0
        self.model.rewind(slot, 0)

    def release(self, slot: int) -> None:
        self._toks[slot] = None
        try:
            self.model.release(slot)
        except Exception:  # noqa: BLE001 - a drafter failure never fails the sequence
            pass

    def extend(self, slot: int, tokens: Sequence[int]) -> None:
        t = self._toks[slot]
        if t is not None:
            t.extend(tokens)

    def propose_many(self, want: dict[int, int],
                     sample_from: dict[int, tuple[float, int, int]] | None = None
                     ) -> dict[int, list[int]]:
        """Drafts for several slots at once: ``want`` = {slot: k}. Greedy on the draft
        model, except the slots in ``sample_from`` = {slot: (temperature, seed, step)}:
        those draw each draft from q = softmax(draft logits / T) (a generator keyed on
        (seed, step + j)) and keep q in ``last_probs[slot]`` (float32 [k, V]) for
        rejection sampling."""
        from tep.engine.model import StepBatch

        live = [s for s, k in want.items() if k > 0 and self._toks[s] is not None]
        self.last_probs = {}
        if not live:
            return {}
        sample_from = sample_from or {}
        out: dict[int, list[int]] = {s: [] for s in live}
        probs: dict[int, list[np.ndarray]] = {s: [] for s in live if s in sample_from}
        # catch up: feed each slot's tokens not yet in the drafter cache (its last token
        # included: its logits give the first draft)
        tok, pos, sid, lg = [], [], [], []
        for s in live:
            t = self._toks[s]
            c = int(self._cached[s])
            if c > len(t) - 1:
                self.model.rewind(s, len(t) - 1)
                c = len(t) - 1
            feed = t[c:]
            tok += feed
            pos += list(range(c, c + len(feed)))
            sid += [s] * len(feed)
            lg += [False] * (len(feed) - 1) + [True]
            self._cached[s] = len(t)
        k_max = max(want[s] for s in live)
        cur = live
        for j in range(k_max):
            batch = StepBatch(token_ids=np.asarray(tok, np.int32),
                              positions=np.asarray(pos, np.int32),
                              seq_ids=np.asarray(sid, np.int32), logits=np.asarray(lg, bool))
            logits = np.asarray(self.model.forward(batch), np.float32)[:, :self.vocab_size]
            tok, pos, sid, lg = [], [], [], []
            keep = []
            for i, s in enumerate(cur):
                if s in sample_from:
                    T, seed, step = sample_from[s]
                    z = logits[i].astype(np.float64) / max(T, 1e-5)
                    q = np.exp(z - z.max())
                    q /= q.sum()
                    q32 = q.astype(np.float32)
                    q32 /= q32.sum(dtype=np.float64)
                    rng = np.random.default_rng([seed, step + j, 0x5EC])
                    t = int(rng.choice(q32.shape[0], p=q32.astype(np.float64) / q32.sum()))
                    probs[s].append(q32)
                else:
                    t = int(np.argmax(logits[i]))
                out[s].append(t)
                if len(out[s]) < want[s] and j + 1 < k_max:
                    keep.append(s)
                    tok.append(t)
                    pos.append(int(self._cached[s]))
                    sid.append(s)
                    lg.append(True)
                    self._cached[s] += 1
            cur = keep
            if not cur:
                break
        self.last_probs = {s: np.stack(p) for s, p in probs.items() if p}
        return out

    def verified(self, slot: int, accepted: int) -> None:
        """The target accepted ``accepted`` of this slot's drafts (called before
        ``extend``): the drafter's cache past them is stale."""
        t = self._toks[slot]
        if t is None:
            return
        valid = len(t) + accepted
        if self._cached[slot] > valid:
            self.model.rewind(slot, valid)
            self._cached[slot] = valid
