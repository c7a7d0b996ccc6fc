"""Speculative-decoding verification: the validating wrapper over tep._kernels.speculative.

A sequence proposes K draft tokens; the target model scores them in one forward, which
gives K + 1 logits rows for it (row j: after the sequence plus drafts 0..j-1).
:func:`verify` samples each row exactly as :func:`tep.kernels.sample` would at step
``step + j`` (same knobs, edits and Philox (seed, step) draw; penalties see the accepted
drafts in the output history) and accepts the drafts while they equal those samples. It
returns the accepted drafts plus one token of the target's own: the first mismatch's
sample, or the bonus token after K accepted drafts.

The property this buys: a seeded request's tokens are the same with and without
speculation, at every temperature and knob combination - provided the model's logits for
a position do not depend on how many tokens the forward held.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from tep._kernels import speculative as _k
from tep.kernels.sampling import (_FLOAT_KNOBS, _NO_MASK, STATUS_MESSAGES,
                                  RowStatus, TokenSpans, _bitmask, _check_logprobs,
                                  _check_row_status, _float_knob, _int_knob, _logits_2d,
                                  _row_args, _seeds, _threads)

__all__ = ["verify", "verify_rejection", "Verified", "MAX_DRAFT_TOKENS"]

MAX_DRAFT_TOKENS = 64       # K per sequence; a verify forward holds K + 1 rows of it
_BAD_DRAFT = 5


class Verified(NamedTuple):
    """What :func:`verify` returns for B sequences with at most K drafts each.

    token_ids: int64 [B, K + 1]; row r's first ``n_tokens[r]`` entries are its emitted
        tokens (accepted drafts, then the target's own token), -1 after them.
    n_tokens: int64 [B], 1..n_draft[r] + 1 (accepted drafts = n_tokens - 1); with
        ``row_status=True`` a failed row counts the tokens before its failing position.
    status: int32 [B] :class:`tep.kernels.RowStatus` codes (0 = ok).
    logprobs, ranks: float32 / int64 [B, K + 1], top_token_ids int64 and top_logprobs
        float32 [B, K + 1, n]: the raw target logprobs of each emitted token (as
        ``sample(..., logprobs=n)`` gives them), or None when not asked for.
    """

    token_ids: np.ndarray
    n_tokens: np.ndarray
    status: np.ndarray
    logprobs: np.ndarray | None
    ranks: np.ndarray | None
    top_token_ids: np.ndarray | None
    top_logprobs: np.ndarray | None


def _drafts(value: Any, n_draft: Any, V: int) -> tuple[np.ndarray, np.ndarray]:
    """(drafts int32 [B, K], n_draft int64 [B]) from a 2-D array (+ optional per-row
    counts) or a list of B id sequences."""
    if isinstance(value, np.ndarray) and value.ndim == 2:
        if value.dtype.kind not in "iu" or value.dtype == np.bool_:
            raise TypeError(f"draft_token_ids must hold integer token ids, got dtype "
                            f"{value.dtype}")
        B, K = value.shape
        if n_draft is None:
            n = np.full(B, K, np.int64)
        else:
            n = _int_knob("n_draft", n_draft, B, 0, K, np.int64)
        used = np.arange(K)[None, :] < n[:, None]
        d = value
    else:
        if n_draft is not None:
            raise ValueError("n_draft goes with a 2-D draft_token_ids array; a list of "
                             "sequences gives its lengths itself")
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple,
                                                                              np.ndarray)):
            raise TypeError(f"draft_token_ids must be an int array [B, K] or a list of B "
                            f"token-id sequences, got {type(value).__name__}")
        rows = []
        for seq in value:
            a = np.asarray(seq)
            if a.size and (a.dtype.kind not in "iu" or a.dtype == np.bool_ or a.ndim != 1):
                raise TypeError(f"draft_token_ids: each row must be a 1-D sequence of "
                                f"integer token ids, got {a.dtype} {a.shape}")
            rows.append(a.astype(np.int64).reshape(-1))
        B = len(rows)
        n = np.array([r.size for r in rows], np.int64)
        K = int(n.max()) if B else 0
        d = np.zeros((B, max(K, 1)), np.int64)
        for r, a in enumerate(rows):
            d[r, :a.size] = a
        used = np.arange(d.shape[1])[None, :] < n[:, None]
    if K < 1:
        raise ValueError("draft_token_ids holds no draft token (K = 0): verify needs K >= 1 "
                         "(sample the rows with tep.kernels.sample instead)")
    if K > MAX_DRAFT_TOKENS:
        raise ValueError(f"at most {MAX_DRAFT_TOKENS} draft tokens per sequence, got {K}")
    if B and used.any():
        bad = used & ((d < 0) | (d >= V))
        if bad.any():
            r, j = (int(i[0]) for i in np.nonzero(bad))
            raise ValueError(f"draft_token_ids[{r}][{j}] = {int(d[r, j])} is outside the "
                             f"vocabulary [0, {V})")
    return np.ascontiguousarray(np.where(used, d, 0), np.int32), n


def _layout(logits: Any, draft_token_ids: Any, n_draft: Any
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Checked (logits [N, V], drafts int32 [B, K], n_draft [B], each sequence's first
    logits row [B]) for :func:`verify` and :func:`verify_rejection`."""
    x, one = _logits_2d(logits)
    if one:
        raise ValueError("logits must be [N, V]: K + 1 rows per sequence")
    N, V = x.shape
    drafts, nd = _drafts(draft_token_ids, n_draft, V)
    B = drafts.shape[0]
    rows = nd + 1
    if int(rows.sum()) != N:
        raise ValueError(f"logits has {N} rows; the drafts need sum(n_draft + 1) = "
                         f"{int(rows.sum())} (K + 1 rows per sequence)")
    row_start = np.zeros(B, np.int64)
    if B > 1:
        np.cumsum(rows[:-1], out=row_start[1:])
    return x, drafts, nd, row_start


def verify(logits: np.ndarray, draft_token_ids: Any, *, n_draft: Any = None,
           temperature: float | Sequence[float] = 1.0, top_k: int | Sequence[int] = 0,
           top_p: float | Sequence[float] = 1.0, min_p: float | Sequence[float] = 0.0,
           repetition_penalty: float | Sequence[float] = 1.0,
           presence_penalty: float | Sequence[float] = 0.0,
           frequency_penalty: float | Sequence[float] = 0.0,
           prompt_token_ids: Sequence | TokenSpans | None = None,
           output_token_ids: Sequence | TokenSpans | None = None,
           logit_bias: Sequence[Mapping[int, float] | None] | None = None,
           allowed_token_ids: Sequence | None = None,
           seed: int | Sequence[int] | None = None, step: int | Sequence[int] = 0,
           token_bitmask: np.ndarray | None = None, logprobs: int | None = None,
           n_threads: int | None = None, row_status: bool = False) -> Verified:
    """Exact-match verification of B sequences' draft tokens.

    ``draft_token_ids``: an integer array [B, K] (with ``n_draft`` [B] giving how many of
    each row are used, default all K) or a list of B token-id sequences; K (the longest)
    must be in [1, 64], a row may have 0 drafts. ``logits``: float32 [N, V] with
    N = sum(n_draft + 1), each sequence's n_draft[r] + 1 rows contiguous and in sequence
    order. The knobs, histories (``output_token_ids`` = the output before the drafts),
    ``logit_bias``, ``allowed_token_ids``, ``seed`` and ``step`` (the step of the first
    row) are per sequence, as in :func:`tep.kernels.sample`; ``token_bitmask`` is int32
    [N, W], one row per logits row. ``logprobs=n`` adds each emitted token's raw logprob
    and the top n. A row with no finite logit (NaN counts as -inf) raises ``ValueError``
    unless ``row_status=True`` (then it gets a status and the tokens before it). Returns a
    :class:`Verified`.
    """
    x, drafts, nd, row_start = _layout(logits, draft_token_ids, n_draft)
    N, V = x.shape
    B, K = drafts.shape
    _check_row_status(row_status)
    _check_logprobs(logprobs, V)
    knobs, sd, st, pr, ou, al, bi, b_vals = _row_args(
        B, V, False, MAX_DRAFT_TOKENS, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
        prompt_token_ids=prompt_token_ids, output_token_ids=output_token_ids,
        allowed_token_ids=allowed_token_ids, logit_bias=logit_bias, seed=seed, step=step)
    mask = _NO_MASK if token_bitmask is None else _bitmask(token_bitmask, N, V, False)
    nt = _threads(n_threads, B, V)
    n_top = int(logprobs or 0)
    want_lp = logprobs is not None
    out_len = ou.lengths
    max_out = (int(out_len.max()) if B else 0) + K
    max_hist = (int((pr.lengths + out_len).max()) if B else 0) + K
    need_work = bool(al.present.any() or bi.ends[-1:].any() or max_hist)

    tokens = np.full((B, K + 1), -1, np.int64)
    count = np.zeros(B, np.int64)
    status = np.zeros(B, np.int32)
    W = K + 1
    if want_lp:
        lps, ranks = np.full((B, W), np.nan, np.float32), np.zeros((B, W), np.int64)
        top_ids = np.full((B, W, n_top), -1, np.int64)
        top_lps = np.full((B, W, n_top), np.nan, np.float32)
    else:
        lps, ranks = np.zeros((1, 1), np.float32), np.zeros((1, 1), np.int64)
        top_ids, top_lps = np.zeros((1, 1, 0), np.int64), np.zeros((1, 1, 0), np.float32)
    if B:
        _k.verify_batch(x, row_start, nd, drafts, knobs, sd, st, pr.ids, pr.starts, pr.ends,
                        ou.ids, ou.starts, ou.ends, bi.ids, b_vals, bi.starts, bi.ends,
                        al.ids, al.starts, al.ends, al.present, mask,
                        token_bitmask is not None, n_top, want_lp, need_work, max_hist,
                        max_out, nt, tokens, count, status, lps, ranks, top_ids, top_lps)
        bad = np.flatnonzero(status)
        if bad.size:
            r, code = int(bad[0]), int(status[bad[0]])
            if code == RowStatus.NO_MEMORY:
                raise MemoryError(f"verify: scratch allocation failed for row {r}")
            if not row_status:
                what = STATUS_MESSAGES.get(code, "has a draft outside the vocabulary"
                                           if code == _BAD_DRAFT else f"failed ({code})")
                raise ValueError(f"logits of sequence {r} at draft position "
                                 f"{int(count[r])}: the row {what}")
        past = np.arange(W)[None, :] >= count[:, None]
        tokens[past] = -1
    if not want_lp:
        return Verified(tokens, count, status, None, None, None, None)
    return Verified(tokens, count, status, lps, ranks, top_ids, top_lps)


def verify_rejection(logits: np.ndarray, draft_token_ids: Any, draft_probs: np.ndarray, *,
                     n_draft: Any = None, temperature: float | Sequence[float] = 1.0,
                     seed: int | Sequence[int] | None = None, step: int | Sequence[int] = 0,
                     n_threads: int | None = None, row_status: bool = False) -> Verified:
    """Speculative (rejection) sampling of B sequences' drafts (Leviathan et al. 2023,
    Chen et al. 2023): draft j, drawn from the draft distribution q_j, is accepted with
    probability min(1, p_j(d) / q_j(d)) where p_j = softmax(logits_j / temperature); the
    first rejected position samples the normalised residual max(0, p_j - q_j), and after
    K acceptances a bonus token samples p_K. The emitted tokens are distributed as the
    target's own samples - but a seeded output is not the one exact verification (or no
    speculation) gives. Only temperature shapes p here (no top-k/top-p/min-p, penalties,
    bias or masks: use :func:`verify` for those).

    ``logits``/``draft_token_ids``/``n_draft`` as in :func:`verify`; ``draft_probs``:
    float32 [M, V], M = sum(n_draft), the draft distribution of each draft in order
    (rows finite, >= 0, summing to 1 within 1e-3, giving its own draft a positive
    probability). Returns a :class:`Verified` without logprobs.
    """
    x, drafts, nd, row_start = _layout(logits, draft_token_ids, n_draft)
    N, V = x.shape
    B, K = drafts.shape
    M = int(nd.sum())
    if not isinstance(draft_probs, np.ndarray) or draft_probs.dtype != np.float32:
        raise TypeError("draft_probs must be a float32 numpy array [sum(n_draft), V]")
    if draft_probs.shape != (M, V):
        raise ValueError(f"draft_probs must have shape ({M}, {V}) (one row per draft), got "
                         f"{draft_probs.shape}")
    q = np.ascontiguousarray(draft_probs)
    if M:
        if not np.isfinite(q).all() or (q < 0).any():
            raise ValueError("draft_probs must be finite and >= 0")
        sums = q.sum(axis=1, dtype=np.float64)
        if (np.abs(sums - 1.0) > 1e-3).any():
            r = int(np.flatnonzero(np.abs(sums - 1.0) > 1e-3)[0])
            raise ValueError(f"draft_probs row {r} sums to {sums[r]:.6g}, not 1")
    q_start = np.zeros(B, np.int64)
    if B > 1:
        np.cumsum(nd[:-1], out=q_start[1:])
    for r in range(B):
        for j in range(int(nd[r])):
            if q[q_start[r] + j, drafts[r, j]] <= 0:
                raise ValueError(f"draft_token_ids[{r}][{j}] = {int(drafts[r, j])} has "
                                 f"probability 0 under its draft_probs row")
    temp = _float_knob(_FLOAT_KNOBS[0], temperature, B).astype(np.float32)
    sd = _seeds(seed, B)
    sd = np.broadcast_to(sd, (B,)).copy() if sd.shape[0] == 1 else sd
    st = _int_knob("step", step, B, 0, 2**64 - 1 - MAX_DRAFT_TOKENS, np.uint64)
    tokens = np.full((B, K + 1), -1, np.int64)
    count = np.zeros(B, np.int64)
    status = np.zeros(B, np.int32)
    if B:
        _k.rejection_batch(x, row_start, nd, drafts, q if M else np.zeros((1, V), np.float32),
                           q_start, temp, sd, st, _threads(n_threads, B, V), tokens, count,
                           status)
        bad = np.flatnonzero(status)
        if bad.size:
            r, code = int(bad[0]), int(status[bad[0]])
            if code == RowStatus.NO_MEMORY:
                raise MemoryError(f"verify_rejection: scratch allocation failed for row {r}")
            if not row_status:
                raise ValueError(f"logits of sequence {r} at draft position {int(count[r])}: "
                                 f"the row {STATUS_MESSAGES.get(code, f'failed ({code})')}")
        tokens[np.arange(K + 1)[None, :] >= count[:, None]] = -1
    return Verified(tokens, count, status, None, None, None, None)
