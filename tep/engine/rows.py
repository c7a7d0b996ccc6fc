"""Per-slot sampling state that lives between engine steps (vLLM v1's persistent batch).

A running sequence owns one slot ``s`` in ``[0, max_num_seqs)`` (also its model
``seq_id``). Its knobs sit in numpy arrays indexed by slot, written once when the sequence
is admitted; a step gathers the rows it samples with one fancy index per knob. Token
histories (for the penalties) sit in one slot-major int64 buffer ``hist[s, :]`` holding the
prompt then the output; a sampled token is one store, never a rebuilt list.

``sample_rows`` is the only place that calls :func:`tep.kernels.sample`, so moving to a
span-based history API touches this module alone.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple, Sequence

import numpy as np

from tep.kernels import sample

__all__ = ["RowState", "RowSample"]


class RowSample(NamedTuple):
    """What one sampling call gives for B rows.

    Attributes:
        token_ids: int64 [B].
        ok: bool [B]; False where the row could not be sampled (``errors[i]`` says why).
        errors: one entry per row, None or the exception for that row.
        logprobs: float32 [B] raw logprob of the chosen token, or None.
        top_ids: int64 [B, n], top_lps: float32 [B, n] (n = the most asked), or None.
    """

    token_ids: np.ndarray
    ok: np.ndarray
    errors: list
    logprobs: np.ndarray | None
    top_ids: np.ndarray | None
    top_lps: np.ndarray | None


class RowState:
    """Knob arrays and token histories by slot.

    Args:
        max_slots: S, the number of slots.
        vocab_size: V (histories are checked against it once, at admission).
        hist_capacity: initial columns of the history buffer (grows by doubling).
    """

    def __init__(self, max_slots: int, vocab_size: int, hist_capacity: int = 256) -> None:
        S = max_slots
        self.vocab_size = vocab_size
        self.temperature = np.ones(S, np.float64)
        self.top_k = np.zeros(S, np.int64)
        self.top_p = np.ones(S, np.float64)
        self.min_p = np.zeros(S, np.float64)
        self.repetition_penalty = np.ones(S, np.float64)
        self.presence_penalty = np.zeros(S, np.float64)
        self.frequency_penalty = np.zeros(S, np.float64)
        self.seed = np.zeros(S, np.uint64)
        self.step = np.zeros(S, np.uint64)          # tokens generated so far = next step
        self.n_logprobs = np.full(S, -1, np.int64)  # -1: logprobs not requested
        self.penalized = np.zeros(S, bool)          # keeps a history
        self.prompt_len = np.zeros(S, np.int64)
        self.out_len = np.zeros(S, np.int64)
        self.hist = np.zeros((S, max(1, hist_capacity)), np.int64)
        self.logit_bias: list[dict | None] = [None] * S
        self.allowed: list[np.ndarray | None] = [None] * S

    # ---- admission / release
    def admit(self, slot: int, sampling: Any, seed: int, prompt: np.ndarray) -> None:
        """Write a new sequence's knobs into ``slot``. ``prompt`` int64 [P]."""
        s = sampling
        self.temperature[slot] = s.temperature
        self.top_k[slot] = s.top_k
        self.top_p[slot] = s.top_p
        self.min_p[slot] = s.min_p
        self.repetition_penalty[slot] = s.repetition_penalty
        self.presence_penalty[slot] = s.presence_penalty
        self.frequency_penalty[slot] = s.frequency_penalty
        self.seed[slot] = seed
        self.step[slot] = 0
        self.n_logprobs[slot] = -1 if s.logprobs is None else int(s.logprobs)
        pen = (s.repetition_penalty != 1.0 or s.presence_penalty != 0.0
               or s.frequency_penalty != 0.0)
        self.penalized[slot] = pen
        self.out_len[slot] = 0
        self.prompt_len[slot] = prompt.shape[0] if pen else 0
        if pen:
            self._reserve(prompt.shape[0] + int(s.max_tokens))
            self.hist[slot, :prompt.shape[0]] = prompt
        self.logit_bias[slot] = dict(s.logit_bias) if s.logit_bias else None
        self.allowed[slot] = (np.asarray(s.allowed_token_ids, np.int64)
                              if s.allowed_token_ids else None)

    def release(self, slot: int) -> None:
        """Forget ``slot``'s sparse state (the dense arrays are overwritten on admit)."""
        self.logit_bias[slot] = None
        self.allowed[slot] = None
        self.penalized[slot] = False

    def _reserve(self, n: int) -> None:
        cap = self.hist.shape[1]
        if n <= cap:
            return
        while cap < n:
            cap *= 2
        grown = np.zeros((self.hist.shape[0], cap), np.int64)
        grown[:, :self.hist.shape[1]] = self.hist
        self.hist = grown

    # ---- one step
    def record(self, slots: np.ndarray, tokens: np.ndarray) -> None:
        """Append the sampled ``tokens`` (int64 [B]) to their slots' histories and advance
        their steps. ``slots`` int64 [B]."""
        self.step[slots] += 1
        pen = self.penalized[slots]
        if pen.any():
            ps = slots[pen]
            col = self.prompt_len[ps] + self.out_len[ps]
            if int(col.max()) >= self.hist.shape[1]:
                self._reserve(int(col.max()) + 1)
            self.hist[ps, col] = tokens[pen]
            self.out_len[ps] += 1

    def sample_rows(self, logits: np.ndarray, slots: np.ndarray) -> RowSample:
        """One :func:`tep.kernels.sample` call for the rows of ``logits`` (float32 [B, V]),
        row i belonging to ``slots[i]``. A row the kernel refuses (say, no finite logit)
        fails alone: the batch is re-sampled row by row to find it; the (seed, step)
        keying makes the other rows' tokens the same either way."""
        B = slots.shape[0]
        kw = self._kwargs(slots)
        n_lp = int(self.n_logprobs[slots].max()) if B else -1
        if n_lp >= 0:
            kw["logprobs"] = n_lp
        try:
            r = sample(logits, **kw)
            return self._result(r, B, n_lp, np.ones(B, bool), [None] * B)
        except (ValueError, MemoryError):
            pass
        toks = np.zeros(B, np.int64)
        ok = np.ones(B, bool)
        errors: list = [None] * B
        lps = np.zeros(B, np.float32) if n_lp >= 0 else None
        tids = np.zeros((B, max(n_lp, 0)), np.int64) if n_lp >= 0 else None
        tlps = np.zeros((B, max(n_lp, 0)), np.float32) if n_lp >= 0 else None
        for i in range(B):
            one = self._kwargs(slots[i:i + 1])
            if n_lp >= 0:
                one["logprobs"] = n_lp
            try:
                r = sample(logits[i:i + 1], **one)
            except (ValueError, MemoryError) as e:
                ok[i] = False
                errors[i] = e
                continue
            if n_lp >= 0:
                toks[i], lps[i] = r.token_ids[0], r.logprobs[0]  # type: ignore[index]
                tids[i], tlps[i] = r.top_token_ids[0], r.top_logprobs[0]  # type: ignore[index]
            else:
                toks[i] = r[0]
        return RowSample(toks, ok, errors, lps, tids, tlps)

    def _result(self, r: Any, B: int, n_lp: int, ok: np.ndarray, errors: list) -> RowSample:
        if n_lp >= 0:
            return RowSample(np.asarray(r.token_ids), ok, errors, np.asarray(r.logprobs),
                             np.asarray(r.top_token_ids), np.asarray(r.top_logprobs))
        return RowSample(np.asarray(r), ok, errors, None, None, None)

    def _kwargs(self, slots: np.ndarray) -> dict:
        kw: dict = dict(
            temperature=self.temperature[slots], top_k=self.top_k[slots],
            top_p=self.top_p[slots], min_p=self.min_p[slots],
            repetition_penalty=self.repetition_penalty[slots],
            presence_penalty=self.presence_penalty[slots],
            frequency_penalty=self.frequency_penalty[slots],
            seed=self.seed[slots], step=self.step[slots])
        pen = self.penalized[slots]
        if pen.any():
            prompts: list = [None] * len(slots)
            outs: list = [None] * len(slots)
            for i in np.flatnonzero(pen):
                s = int(slots[i])
                p, o = int(self.prompt_len[s]), int(self.out_len[s])
                prompts[i] = self.hist[s, :p]
                outs[i] = self.hist[s, p:p + o]
            kw["prompt_token_ids"], kw["output_token_ids"] = prompts, outs
        biases = [self.logit_bias[int(s)] for s in slots]
        if any(b is not None for b in biases):
            kw["logit_bias"] = biases
        allowed = [self.allowed[int(s)] for s in slots]
        if any(a is not None for a in allowed):
            kw["allowed_token_ids"] = allowed
        return kw


def fresh_seed() -> int:
    """A 64-bit seed from OS entropy (for requests that set none)."""
    return int.from_bytes(os.urandom(8), "little")


def as_ids(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Token IDs as a fresh int64 [N] array."""
    return np.array(ids, dtype=np.int64).reshape(-1)
