"""Which sequences feed which tokens in the next step (no model, no sampling here).

Policy, per step, under two limits: at most ``max_num_seqs`` sequences hold a slot, and
at most ``max_batch_tokens`` tokens are fed.

1. Every running sequence that is decoding feeds its one last token (they come first, so a
   long prompt being prefilled never stalls a stream; ``max_batch_tokens >=
   max_num_seqs`` guarantees they all fit).
2. Running sequences still prefilling get the next chunk of their prompt, oldest first,
   from what is left of the budget.
3. Waiting sequences are admitted in arrival order (FIFO: the first one that does not get
   a slot stops admission) while a slot is free and budget is left; each gets a first chunk.

A sequence samples (its row of logits is asked for) in the step that feeds the last token
of its prompt, and in every decode step after.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

__all__ = ["Seq", "Scheduler", "Plan"]


@dataclass(eq=False)
class Seq:
    """One sequence (one choice of one request) inside the engine.

    Attributes:
        prompt: int64 [P], the prompt token IDs (P >= 1).
        sampling: the request's :class:`tep.Sampling` for this choice.
        sink: where tokens go (a :class:`tep.backend.StreamSink`).
        on_done: called once, from the engine thread, with None or the failure.
        seed: the sampler's seed (the request's, or fresh entropy).
        slot: its slot and model ``seq_id`` while running, else -1.
        n_fed: prompt tokens already in the model's cache (fed or reused).
        n_out: tokens generated.
        last: the last generated token (fed next step).
        constraint: an optional structured-output constraint (see ``tep.engine.engine``).
        decoder: the incremental UTF-8 decoder of its text.
    """

    prompt: np.ndarray
    sampling: Any
    sink: Any
    on_done: Callable[[BaseException | None], None]
    seed: int
    slot: int = -1
    n_fed: int = 0
    n_out: int = 0
    last: int = -1
    constraint: Any = None
    decoder: Any = None
    done: bool = False
    arrival: int = 0
    max_len: int | None = None   # context_size: most positions it may use

    @property
    def prefilling(self) -> bool:
        return self.n_fed < self.prompt.shape[0]

    @property
    def position(self) -> int:
        """Position of the next token fed."""
        return self.n_fed + max(0, self.n_out - 1) if not self.prefilling else self.n_fed


@dataclass
class Plan:
    """One step: what to feed and which sequences sample.

    Attributes:
        seqs: the sequences fed this step, in batch order.
        counts: tokens each feeds (same order).
        samplers: the sequences that sample, in logit-row order.
        admitted: sequences given a slot this step (their prefix reuse is done).
    """

    seqs: list = field(default_factory=list)
    counts: list = field(default_factory=list)
    samplers: list = field(default_factory=list)
    admitted: list = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(self.counts)


class Scheduler:
    """FIFO admission with chunked prefill; see the module docstring.

    Args:
        max_num_seqs: slots (sequences in the model at once), >= 1.
        max_batch_tokens: tokens fed per step, >= max_num_seqs.
    """

    def __init__(self, max_num_seqs: int, max_batch_tokens: int) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_batch_tokens < max_num_seqs:
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}) must be >= "
                             f"max_num_seqs ({max_num_seqs}): every running sequence "
                             f"feeds one token per step")
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self._free = list(range(max_num_seqs - 1, -1, -1))  # pop() gives the lowest
        self._arrivals = 0

    def add(self, seq: Seq) -> None:
        seq.arrival = self._arrivals
        self._arrivals += 1
        self.waiting.append(seq)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def free(self, seq: Seq) -> None:
        """Take a finished sequence out (its slot is free for the next step)."""
        if seq.slot >= 0:
            self.running.remove(seq)
            self._free.append(seq.slot)
            seq.slot = -1
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass

    def schedule(self, reuse_prefix: Callable[[Seq], int] | None = None) -> Plan:
        """Plan the next step. ``reuse_prefix(seq)`` (called once per admitted sequence,
        after its slot is set) returns how many prompt tokens are already cached."""
        plan = Plan()
        budget = self.max_batch_tokens
        for s in self.running:           # 1. decodes
            if not s.prefilling:
                plan.seqs.append(s)
                plan.counts.append(1)
                plan.samplers.append(s)
                budget -= 1
        for s in self.running:           # 2. unfinished prefills, oldest first
            if budget <= 0:
                break
            if s.prefilling:
                self._chunk(plan, s, budget)
                budget -= plan.counts[-1]
        while self.waiting and self._free and budget > 0:   # 3. admissions, FIFO
            s = self.waiting.popleft()
            s.slot = self._free.pop()
            self.running.append(s)
            plan.admitted.append(s)
            if reuse_prefix is not None:
                s.n_fed = reuse_prefix(s)
            self._chunk(plan, s, budget)
            budget -= plan.counts[-1]
        return plan

    @staticmethod
    def _chunk(plan: Plan, s: Seq, budget: int) -> None:
        n = min(s.prompt.shape[0] - s.n_fed, budget)
        plan.seqs.append(s)
        plan.counts.append(n)
        if s.n_fed + n == s.prompt.shape[0]:
            plan.samplers.append(s)
