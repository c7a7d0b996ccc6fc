"""Per-slot sampling state that lives between engine steps (vLLM v1's persistent batch).

A running sequence owns one slot ``s`` in ``[0, max_num_seqs)`` (also its model
``seq_id``). Its knobs sit in numpy arrays indexed by slot, written once when the sequence
is admitted; a step gathers the rows it samples with one fancy index per knob. Token
histories (for the penalties) sit in one slot-major int32 buffer ``hist[s, :]`` holding the
prompt then the output; a sampled token is one store, never a rebuilt list, and the
kernel reads the histories in place as :class:`tep.kernels.TokenSpans` of the flat buffer
(O(B) per step, however long the histories).

Knobs are validated once, at admission (:func:`tep.kernels.sampling.prepare_row`, the
wrapper's own checks and errors); a step hands the kernel the gathered, pre-validated
arrays (:func:`~tep.kernels.sampling.sample_prepared`), checking shapes only. A sequence
whose knobs fail validation gets that error as its row's failure at its first sample.
``sample_rows`` asks for a status per row, so a row the kernel refuses fails alone.
"""
from __future__ import annotations

import os
import time
from typing import Any, NamedTuple, Sequence

import numpy as np

from tep._kernels import sampling as _k
from tep.kernels import TokenSpans
from tep.kernels.sampling import (STATUS_MESSAGES, RowKnobs, RowStatus, _threads,
                                  prepare_batch, prepare_row, sample_prepared)

__all__ = ["RowState", "RowSample"]


class RowSample(NamedTuple):
    """What one sampling call gives for B rows.

    Attributes:
        token_ids: int64 [B].
        ok: bool [B]; False where the row could not be sampled (``errors[i]`` says why).
        errors: one entry per row, None or the exception for that row.
        logprobs: float32 [B] raw logprob of the chosen token, or None.
        top_ids: int64 [B, n], top_lps: float32 [B, n] (n = the most asked), or None.
        all_ok: every row was sampled (``ok.all()``, computed once per step).
    """

    token_ids: np.ndarray
    ok: np.ndarray
    errors: list
    logprobs: np.ndarray | None
    top_ids: np.ndarray | None
    top_lps: np.ndarray | None
    all_ok: bool


class RowState:
    """Knob arrays and token histories by slot.

    Args:
        max_slots: S, the number of slots.
        vocab_size: V (histories are checked against it once, at admission).
        hist_capacity: initial columns of the history buffer (grows by doubling).
    """

    def __init__(self, max_slots: int, vocab_size: int, hist_capacity: int = 256,
                 n_threads: int | None = None) -> None:
        S = max_slots
        self.n_threads = n_threads
        self.kernel_s = 0.0   # seconds inside tep.kernels.sample (for the overhead bench)
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
        self.last = np.zeros(S, np.int64)           # last sampled token (fed next step)
        self.pos = np.zeros(S, np.int64)            # tokens in the model's cache
        self.prompt_len = np.zeros(S, np.int64)
        self.out_len = np.zeros(S, np.int64)
        self.hist = np.zeros((S, max(1, hist_capacity)), np.int32)
        self.logit_bias: list[dict | None] = [None] * S
        self.allowed: list[np.ndarray | None] = [None] * S
        self.prepared: list[RowKnobs | None] = [None] * S
        self.invalid = np.zeros(S, bool)            # knobs failed validation at admission
        self.invalid_error: list[BaseException | None] = [None] * S
        # the one-row kernel entry's arguments of a slot it can sample (no history,
        # allowed set or logprobs): (T, top_k, top_p, min_p, seed, bias ids, bias values)
        self.one_row: list[tuple | None] = [None] * S

    # ---- admission / release
    def admit(self, slot: int, sampling: Any, seed: int, prompt: np.ndarray,
              cached: int = 0) -> None:
        """Write a new sequence's knobs into ``slot``. ``prompt`` int64 [P]; ``cached``:
        prompt tokens already in the model's cache."""
        s = sampling
        self.pos[slot] = cached
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
        try:
            self.prepared[slot] = prepare_row(
                self.vocab_size, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                min_p=s.min_p, repetition_penalty=s.repetition_penalty,
                presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                logit_bias=self.logit_bias[slot], allowed_token_ids=self.allowed[slot])
            self.invalid[slot] = False
            self.invalid_error[slot] = None
        except (TypeError, ValueError) as e:   # fails this sequence at its first sample
            self.prepared[slot] = _DEFAULT_ROWS.get(self.vocab_size) or \
                _DEFAULT_ROWS.setdefault(self.vocab_size, prepare_row(self.vocab_size))
            self.invalid[slot] = True
            self.invalid_error[slot] = e
        self.one_row[slot] = self._one_row_args(slot)

    def _one_row_args(self, slot: int) -> tuple | None:
        if self.penalized[slot] or self.allowed[slot] is not None or self.invalid[slot] \
                or self.n_logprobs[slot] >= 0:
            return None
        r = self.prepared[slot]
        k = r.knobs  # type: ignore[union-attr]
        has_bias = r.bias_ids.shape[0] > 0  # type: ignore[union-attr]
        return (float(k[0]), int(k[1]), float(k[2]), float(k[3]), int(self.seed[slot]),
                r.bias_ids if has_bias else None,  # type: ignore[union-attr]
                r.bias_values if has_bias else None)  # type: ignore[union-attr]

    def release(self, slot: int) -> None:
        """Forget ``slot``'s sparse state (the dense arrays are overwritten on admit)."""
        self.logit_bias[slot] = None
        self.allowed[slot] = None
        self.prepared[slot] = None
        self.one_row[slot] = None
        self.penalized[slot] = False
        self.invalid[slot] = False
        self.invalid_error[slot] = None

    def _reserve(self, n: int) -> None:
        cap = self.hist.shape[1]
        if n <= cap:
            return
        while cap < n:
            cap *= 2
        grown = np.zeros((self.hist.shape[0], cap), np.int32)
        grown[:, :self.hist.shape[1]] = self.hist
        self.hist = grown

    # ---- one step
    def record(self, slots: np.ndarray, tokens: np.ndarray) -> None:
        """Append the sampled ``tokens`` (int64 [B]) to their slots' histories and advance
        their steps. ``slots`` int64 [B]."""
        if slots.shape[0] == 1:
            self.record_run(int(slots[0]), (int(tokens[0]),))
            return
        self.step[slots] += 1
        self.last[slots] = tokens
        pen = self.penalized[slots]
        if pen.any():
            ps = slots[pen]
            col = self.prompt_len[ps] + self.out_len[ps]
            if int(col.max()) >= self.hist.shape[1]:
                self._reserve(int(col.max()) + 1)
            self.hist[ps, col] = tokens[pen]
            self.out_len[ps] += 1

    def rejection_ok(self, slot: int) -> bool:
        """The row's distribution is softmax(logits / T) alone (no filters, penalties,
        bias, allowed set or logprobs): rejection sampling applies to it."""
        return bool(self.top_k[slot] in (0, -1) and self.top_p[slot] >= 1.0
                    and self.min_p[slot] <= 0.0 and not self.penalized[slot]
                    and self.logit_bias[slot] is None and self.allowed[slot] is None
                    and self.n_logprobs[slot] < 0 and not self.invalid[slot])

    def record_run(self, slot: int, tokens: list) -> None:
        """Append several tokens to one slot (a verified speculative run): its step
        advances by ``len(tokens)`` and its last token is the run's last."""
        n = len(tokens)
        self.step[slot] += n
        self.last[slot] = tokens[-1]
        if self.penalized[slot]:
            col = int(self.prompt_len[slot] + self.out_len[slot])
            if col + n > self.hist.shape[1]:
                self._reserve(col + n)
            self.hist[slot, col:col + n] = tokens
            self.out_len[slot] += n

    def verify_rows(self, logits: np.ndarray, slots: np.ndarray, drafts: np.ndarray,
                    n_draft: np.ndarray, static: dict | None = None,
                    token_bitmask: np.ndarray | None = None) -> tuple[Any, list]:
        """One :func:`tep.kernels.verify` call: row i (slot ``slots[i]``) owns
        ``n_draft[i] + 1`` consecutive rows of ``logits`` and proposes ``drafts[i, :n]``.
        Returns the :class:`tep.kernels.Verified` (``row_status=True``: a row the kernel
        refuses gets a status) and one entry per row, None or the exception that row
        raised: an argument the wrapper refuses for one row (a knob valid in float64 but
        not float32) is found by verifying the rows one by one. ``token_bitmask``: int32
        [N, W], one grammar mask per logits row (structured outputs), or None."""
        from tep.kernels import verify

        B = slots.shape[0]
        n_lp = int(self.n_logprobs[slots].max()) if B else -1
        kw = self._kwargs(slots, static)
        if n_lp >= 0:
            kw["logprobs"] = n_lp
        t0 = time.perf_counter()
        try:
            r = verify(logits, drafts, n_draft=n_draft, row_status=True,
                       token_bitmask=token_bitmask, **kw)
            errors: list = [None] * B
        except ValueError:
            r, errors = self._verify_one_by_one(logits, slots, drafts, n_draft, n_lp,
                                                token_bitmask)
        self.kernel_s += time.perf_counter() - t0
        return r, errors

    def _verify_one_by_one(self, logits, slots, drafts, n_draft, n_lp,  # noqa: ANN001, ANN202
                           token_bitmask=None):
        from tep.kernels import Verified, verify

        B, K = drafts.shape
        toks = np.full((B, K + 1), -1, np.int64)
        count = np.zeros(B, np.int64)
        status = np.zeros(B, np.int32)
        W = K + 1
        n = max(n_lp, 0)
        lps = np.full((B, W), np.nan, np.float32) if n_lp >= 0 else None
        ranks = np.zeros((B, W), np.int64) if n_lp >= 0 else None
        tids = np.full((B, W, n), -1, np.int64) if n_lp >= 0 else None
        tlps = np.full((B, W, n), np.nan, np.float32) if n_lp >= 0 else None
        errors: list = [None] * B
        start = 0
        for i in range(B):
            rows = int(n_draft[i]) + 1
            one = self._kwargs(slots[i:i + 1])
            if n_lp >= 0:
                one["logprobs"] = n_lp
            try:
                bm = None if token_bitmask is None else token_bitmask[start:start + rows]
                r = verify(logits[start:start + rows], drafts[i:i + 1], n_draft=n_draft[i:i + 1],
                           row_status=True, token_bitmask=bm, **one)
            except ValueError as e:
                status[i] = -1
                errors[i] = e
            else:
                toks[i], count[i], status[i] = r.token_ids[0], r.n_tokens[0], r.status[0]
                if n_lp >= 0:
                    lps[i], ranks[i] = r.logprobs[0], r.ranks[0]   # type: ignore[index]
                    tids[i], tlps[i] = r.top_token_ids[0], r.top_logprobs[0]  # type: ignore[index]
            start += rows
        return Verified(toks, count, status, lps, ranks, tids, tlps), errors

    def sample_rows(self, logits: np.ndarray, slots: np.ndarray,
                    static: dict | None = None,
                    token_bitmask: np.ndarray | None = None) -> RowSample:
        """One kernel call for the rows of ``logits`` (C-contiguous float32 [B, V]), row i
        belonging to ``slots[i]``, on the arrays validated at admission. A row the kernel
        refuses (say, no finite logit) or whose knobs failed validation fails alone; the
        (seed, step) keying makes the other rows' tokens the same either way."""
        B = slots.shape[0]
        if B == 1 and token_bitmask is None:
            tok = self._sample_one(logits, int(slots[0]))
            if tok is not None:
                return RowSample(np.array([tok], np.int64), _ONE_OK, [None], None, None, None,
                                 True)
        n_lp = int(self.n_logprobs[slots].max()) if B else -1
        st = static if static is not None else self.static_kwargs(slots)
        prompt = output = None
        if st["_penalized"]:
            prompt, output = self._spans(slots)
        t0 = time.perf_counter()
        r = sample_prepared(logits, st["prepared"], self.step[slots],
                            prompt_token_ids=prompt, output_token_ids=output,
                            token_bitmask=token_bitmask,
                            logprobs=n_lp if n_lp >= 0 else None, n_threads=st["threads"])
        self.kernel_s += time.perf_counter() - t0
        status = r.status
        ok = status == 0
        errors: list = [None] * B
        if st["_invalid"]:
            bad = self.invalid[slots]
            ok &= ~bad
            for i in np.flatnonzero(bad).tolist():
                errors[i] = self.invalid_error[int(slots[i])]
        all_ok = bool(ok.all())
        if not all_ok:
            for i in np.flatnonzero(~ok).tolist():
                if errors[i] is None:
                    errors[i] = ValueError(f"logits: the row {_status_text(int(status[i]))}")
        lp = r.logprobs
        if lp is not None:
            return RowSample(r.token_ids, ok, errors, lp.logprobs, lp.top_token_ids,
                             lp.top_logprobs, all_ok)
        return RowSample(r.token_ids, ok, errors, None, None, None, all_ok)

    def _sample_one(self, logits: np.ndarray, s: int) -> int | None:
        """One row that needs no history, allowed set or logprobs: the kernel's one-row
        entry on the arguments kept at admission (its bias included). None when the row
        does not qualify or the kernel refuses it (the general path then reports the
        error)."""
        a = self.one_row[s]
        if a is None:
            return None
        t0 = time.perf_counter()
        tok = _k.sample_one(logits[0], a[0], a[1], a[2], a[3], a[4], int(self.step[s]), None,
                            a[5], a[6])
        self.kernel_s += time.perf_counter() - t0
        return tok if tok >= 0 else None

    def static_kwargs(self, slots: np.ndarray) -> dict:
        """The ``sample`` arguments of ``slots`` that stay the same while the same
        sequences run (knobs, seeds, biases, allowed sets): gathered once, reused by
        every decode step until a sequence joins or leaves."""
        kw: dict = dict(
            temperature=self.temperature[slots], top_k=self.top_k[slots],
            top_p=self.top_p[slots], min_p=self.min_p[slots],
            repetition_penalty=self.repetition_penalty[slots],
            presence_penalty=self.presence_penalty[slots],
            frequency_penalty=self.frequency_penalty[slots],
            seed=self.seed[slots], n_threads=self.n_threads)
        kw["prepared"] = prepare_batch([self.prepared[s] for s in slots.tolist()],
                                       self.seed[slots])
        kw["threads"] = _threads(self.n_threads, slots.shape[0], self.vocab_size)
        kw["_invalid"] = bool(self.invalid[slots].any())
        biases = [self.logit_bias[s] for s in slots.tolist()]
        if any(b is not None for b in biases):
            kw["logit_bias"] = biases
        allowed = [self.allowed[s] for s in slots.tolist()]
        if any(a is not None for a in allowed):
            kw["allowed_token_ids"] = allowed
        kw["_penalized"] = bool(self.penalized[slots].any())
        return kw

    def _spans(self, slots: np.ndarray) -> tuple[TokenSpans, TokenSpans]:
        """The histories in place: row i's prompt is hist[s, :P], its output
        hist[s, P:P+O] (empty spans for rows without penalties)."""
        cap = self.hist.shape[1]
        pen = self.penalized[slots]
        base = slots * cap
        p_end = np.where(pen, base + self.prompt_len[slots], 0)
        o_end = np.where(pen, p_end + self.out_len[slots], 0)
        flat = self.hist.reshape(-1)
        return (TokenSpans(flat, np.where(pen, base, 0), p_end),
                TokenSpans(flat, p_end, o_end))

    def _kwargs(self, slots: np.ndarray, static: dict | None = None) -> dict:
        """:func:`tep.kernels.verify` keyword arguments (validated there again)."""
        kw = dict(static if static is not None else self.static_kwargs(slots))
        for k in ("prepared", "threads", "_invalid"):
            kw.pop(k, None)
        kw["step"] = self.step[slots]
        if kw.pop("_penalized"):
            kw["prompt_token_ids"], kw["output_token_ids"] = self._spans(slots)
        return kw


_DEFAULT_ROWS: dict[int, RowKnobs] = {}
_ONE_OK = np.ones(1, bool)       # RowSample.ok of one row sampled fine (read only)
_ONE_OK.flags.writeable = False


def _status_text(code: int) -> str:
    try:
        return STATUS_MESSAGES[RowStatus(code)]
    except (ValueError, KeyError):
        return f"could not be sampled (status {code})"


def fresh_seed() -> int:
    """A 64-bit seed from OS entropy (for requests that set none)."""
    return int.from_bytes(os.urandom(8), "little")


def as_ids(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Token IDs as a fresh int64 [N] array."""
    return np.array(ids, dtype=np.int64).reshape(-1)
