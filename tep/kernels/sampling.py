"""Token sampling from logits: the validating wrapper over tep._kernels.sampling.

Semantics (DESIGN.md "Sampling semantics"), per row, in this order:

1. raw logprobs are the log_softmax of the logits as given (NaN as -inf);
2. NaN is -inf; a row with no finite logit (or holding +inf) raises ``ValueError``;
3. ``allowed_token_ids`` masks every other token to -inf, then ``logit_bias`` (clamped to
   [-100, 100]) is added;
4. ``repetition_penalty`` r over the distinct tokens of prompt ∪ output (positive logits
   divided by r, others multiplied), then ``logit -= frequency_penalty*count +
   presence_penalty*(count > 0)`` over output tokens;
5. ``temperature < 1e-5`` is greedy (argmax, lowest id on ties); otherwise logits / T;
6. ``min_p`` (keep p >= min_p * p_max) -> ``top_k`` (keep every token >= the k-th largest
   value: ties at the k-th value are kept) -> ``top_p`` (keep token i iff the mass of the
   tokens strictly more likely than i is < top_p: boundary ties are kept, the most likely
   token always is), each on the tempered distribution over the previous survivors;
7. one draw from the renormalised survivors with a uniform from Philox4x32-10 keyed on
   (seed, step) only, so a row samples the same token alone, in any batch, at any position
   and on any number of threads.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from tep._kernels import sampling as _k

__all__ = ["sample", "SampleResult", "log_softmax"]

_F32 = np.dtype(np.float32)
_NUM = (float, int)
_EMPTY_I64 = np.zeros(1, np.int64)    # ragged value arrays hold >= 1 element (kernel ABI)
_EMPTY_F32 = np.zeros(1, np.float32)
_NO_LP, _NO_RANK = np.zeros(1, np.float32), np.zeros(1, np.int64)
_NO_TOP_IDS, _NO_TOP_LPS = np.zeros((1, 0), np.int64), np.zeros((1, 0), np.float32)
MAX_LOGPROBS = 20
_PARALLEL_MIN_WORK = 1 << 17          # B*V below this stays on one thread

_NO_FINITE, _POS_INF, _NO_MEMORY = 1, 2, 3


class SampleResult(NamedTuple):
    """What ``sample(..., logprobs=n)`` returns; "raw" = before any processing.

    For [B, V] logits: token_ids int64[B], logprobs float32[B] (raw logprob of the chosen
    token), ranks int64[B] (1 = most likely raw logit), top_token_ids int64[B, n] and
    top_logprobs float32[B, n] (the n most likely raw tokens, descending, ties by lower id).
    For [V] logits the leading B axis is dropped (ints/floats and [n] arrays).
    """

    token_ids: Any
    logprobs: Any
    ranks: Any
    top_token_ids: np.ndarray
    top_logprobs: np.ndarray


# ---- validation helpers -------------------------------------------------------------------

def _logits_2d(logits: Any, name: str = "logits") -> tuple[np.ndarray, bool]:
    if not isinstance(logits, np.ndarray):
        raise TypeError(f"{name} must be a numpy float32 array, got {type(logits).__name__}")
    if logits.dtype != _F32:
        raise TypeError(f"{name} must have dtype float32, got {logits.dtype}")
    if logits.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape [V] or [B, V], got shape {logits.shape}")
    one = logits.ndim == 1
    x = logits[None, :] if one else logits
    if x.shape[1] == 0:
        raise ValueError(f"{name} has an empty vocabulary axis (V = 0), shape {logits.shape}")
    return np.ascontiguousarray(x), one


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (numbers.Number, np.generic)) and not isinstance(v, (bool, np.bool_))


def _float_knob(name: str, value: Any, B: int, lo: float, hi: float, lo_open: bool,
                hi_open: bool = False) -> np.ndarray:
    """A float knob (scalar or one per row) as float32[B], checked to lie in its range."""
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a number or one number per row, got {value!r}")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number or one number per row, got {value!r}") from None
    if np.iscomplexobj(np.asarray(value)):
        raise TypeError(f"{name} must be real, got {value!r}")
    if arr.ndim == 0:
        arr = np.full(B, arr, np.float64)
    elif arr.shape != (B,):
        raise ValueError(f"{name} must be a scalar or have one value per row ({B}), "
                         f"got shape {arr.shape}")
    if arr.size:
        bad = ~np.isfinite(arr) | (arr <= lo if lo_open else arr < lo) | (arr >= hi if hi_open else arr > hi)
        if bad.any():
            v = arr[bad][0]
            lo_s = "(" if lo_open else "["
            hi_s = ")" if hi_open else "]"
            raise ValueError(f"{name} must be finite and in {lo_s}{lo}, {hi}{hi_s}, got {v}")
    return arr.astype(np.float32)


def _int_knob(name: str, value: Any, B: int, lo: int, hi: int, dtype) -> np.ndarray:
    """An integer knob (scalar or one per row) as dtype[B], checked to lie in [lo, hi]."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, numbers.Integral):
        if not lo <= int(value) <= hi:
            raise ValueError(f"{name} must be in [{lo}, {hi}], got {int(value)}")
        return np.full(B, int(value), dtype)
    arr = np.asarray(value)
    if arr.size == 0 and arr.ndim == 1:
        arr = arr.astype(dtype)                    # [] for an empty batch
    if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must be an integer or one integer per row, got dtype {arr.dtype}")
    if arr.ndim == 0:
        arr = np.full(B, arr)
    if arr.shape != (B,):
        raise ValueError(f"{name} must be a scalar or have one value per row ({B}), "
                         f"got shape {arr.shape}")
    if arr.size and (arr.min() < lo or arr.max() > hi):
        bad = arr[(arr < lo) | (arr > hi)][0]
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {bad}")
    return arr.astype(dtype)


# name, low, high, low open, high open (the order is the kernel's knob-matrix row order;
# top_k, row 1, is handled on its own)
_FLOAT_KNOBS = (("temperature", 0.0, math.inf, False, True),
                ("top_p", 0.0, 1.0, True, False),
                ("min_p", 0.0, 1.0, False, False),
                ("repetition_penalty", 0.0, math.inf, True, True),
                ("presence_penalty", -math.inf, math.inf, True, True),
                ("frequency_penalty", -math.inf, math.inf, True, True))


def _float_scalar(name: str, v: Any, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
    if type(v) not in (float, int) and (isinstance(v, (bool, np.bool_))
                                        or not isinstance(v, numbers.Real)):
        raise TypeError(f"{name} must be a number or one number per row, got {v!r}")
    f = float(v)
    if not math.isfinite(f) or (f <= lo if lo_open else f < lo) or (f >= hi if hi_open else f > hi):
        lo_s, hi_s = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be finite and in {lo_s}{lo}, {hi}{hi_s}, got {v}")
    return f


def _knob_matrix(B: int, V: int, values: dict) -> np.ndarray:
    """float64 [7, 1] when every knob is a scalar, else [7, B] (the kernel's layout)."""
    tk = values["top_k"]
    scalar = _is_scalar(tk) and all(_is_scalar(values[n]) for n, *_ in _FLOAT_KNOBS)
    if scalar:
        if not isinstance(tk, numbers.Integral):
            raise TypeError(f"top_k must be an integer, got {tk!r}")
        tk = int(tk)
        if not -1 <= tk < 2**62:
            raise ValueError(f"top_k must be >= -1 (0 or -1 = off), got {tk}")
        col = [_float_scalar(n, values[n], *spec) for n, *spec in _FLOAT_KNOBS]
        col.insert(1, float(tk if 0 < tk < V else 0))
        return np.array(col, np.float64).reshape(7, 1)
    out = np.empty((7, B), np.float64)
    for i, (n, *spec) in zip((0, 2, 3, 4, 5, 6), _FLOAT_KNOBS):
        out[i] = _float_knob(n, values[n], B, *spec)
    k = _int_knob("top_k", tk, B, -1, 2**62, np.int64)
    out[1] = np.where((k > 0) & (k < V), k, 0)
    return out


def _per_row(name: str, value: Any, B: int, one: bool) -> list:
    """A per-row argument (histories, biases, allowed sets) as a list of B entries."""
    if value is None:
        return [None] * B
    if one:
        return [value]
    if isinstance(value, Mapping) or not isinstance(value, (list, tuple, np.ndarray)):
        raise TypeError(f"{name} must be a list with one entry per row for [B, V] logits, "
                        f"got {type(value).__name__}")
    if len(value) != B:
        raise ValueError(f"{name} must have one entry per row ({B}), got {len(value)}")
    return list(value)


def _ids(name: str, seq: Any, V: int) -> np.ndarray:
    arr = np.asarray(seq)
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must hold integer token IDs, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name}: each entry must be a 1-D sequence of token IDs, "
                         f"got shape {arr.shape}")
    if arr.min() < 0 or arr.max() >= V:
        bad = arr[(arr < 0) | (arr >= V)][0]
        raise ValueError(f"{name} holds token ID {bad} outside [0, {V})")
    return arr.astype(np.int64, copy=False)


def _ragged_ids(name: str, value: Any, B: int, V: int, one: bool):
    """(values int64[>=1], offsets int64[B+1], present uint8[B]) for per-row ID lists."""
    rows = _per_row(name, value, B, one)
    parts, present = [], np.zeros(B, np.uint8)
    offsets = np.zeros(B + 1, np.int64)
    for r, seq in enumerate(rows):
        if seq is not None:
            present[r] = 1
            a = _ids(name, seq, V)
            parts.append(a)
            offsets[r + 1] = offsets[r] + a.size
        else:
            offsets[r + 1] = offsets[r]
    vals = np.concatenate(parts) if offsets[-1] else _EMPTY_I64
    return vals, offsets, present


def _ragged_bias(value: Any, B: int, V: int, one: bool):
    rows = _per_row("logit_bias", value, B, one)
    ids, vals = [], []
    offsets = np.zeros(B + 1, np.int64)
    for r, d in enumerate(rows):
        n = 0
        if d is not None:
            if not isinstance(d, Mapping):
                raise TypeError(f"logit_bias must be a dict {{token_id: bias}} per row, "
                                f"got {type(d).__name__}")
            for tok, b in d.items():
                if isinstance(tok, (bool, np.bool_)) or not isinstance(tok, numbers.Integral):
                    raise TypeError(f"logit_bias keys must be integer token IDs, got {tok!r}")
                if not 0 <= int(tok) < V:
                    raise ValueError(f"logit_bias holds token ID {int(tok)} outside [0, {V})")
                if isinstance(b, (bool, np.bool_)) or not isinstance(b, numbers.Real):
                    raise TypeError(f"logit_bias values must be numbers, got {b!r}")
                if not np.isfinite(b):
                    raise ValueError(f"logit_bias value for token {int(tok)} must be finite, got {b}")
                ids.append(int(tok))
                vals.append(float(b))
                n += 1
        offsets[r + 1] = offsets[r] + n
    if not ids:
        return _EMPTY_I64, _EMPTY_F32, offsets
    return np.asarray(ids, np.int64), np.asarray(vals, np.float32), offsets


def _seeds(seed: Any, B: int) -> np.ndarray:
    if seed is None:
        return np.frombuffer(os.urandom(8 * max(B, 1)), np.uint64)[:B].copy()
    if isinstance(seed, (bool, np.bool_)):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if isinstance(seed, numbers.Integral):
        if not 0 <= int(seed) < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {int(seed)}")
        return np.array([int(seed)], np.uint64)      # one value for every row
    arr = np.asarray(seed)
    if arr.dtype == object:
        arr = np.asarray([_seeds(int(s) if isinstance(s, numbers.Integral) else s, 1)[0]
                          for s in seed], np.uint64)
    return _int_knob("seed", arr, B, 0, 2**64 - 1, np.uint64)


def _threads(n_threads: Any, B: int, V: int) -> int:
    if n_threads is None:
        if B < 2 or B * V < _PARALLEL_MIN_WORK:
            return 1
        return max(1, min(B, _k.max_threads()))
    if isinstance(n_threads, (bool, np.bool_)) or not isinstance(n_threads, numbers.Integral):
        raise TypeError(f"n_threads must be a positive integer or None, got {n_threads!r}")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    return int(n_threads)


def _raise_status(status: np.ndarray) -> None:
    bad = np.flatnonzero(status)
    if bad.size == 0:
        return
    r, st = int(bad[0]), int(status[bad[0]])
    if st == _NO_FINITE:
        raise ValueError(f"logits: row {r} has no finite value (NaN counts as -inf; "
                         f"allowed_token_ids may have masked every finite token)")
    if st == _POS_INF:
        raise ValueError(f"logits: row {r} holds +inf (after logit edits)")
    raise MemoryError(f"sample: scratch allocation failed for row {r}")


# ---- public API --------------------------------------------------------------------------

def sample(logits: np.ndarray, *, temperature: float | Sequence[float] = 1.0,
           top_k: int | Sequence[int] = 0, top_p: float | Sequence[float] = 1.0,
           min_p: float | Sequence[float] = 0.0,
           repetition_penalty: float | Sequence[float] = 1.0,
           presence_penalty: float | Sequence[float] = 0.0,
           frequency_penalty: float | Sequence[float] = 0.0,
           prompt_token_ids: Sequence | None = None, output_token_ids: Sequence | None = None,
           logit_bias: Mapping[int, float] | Sequence[Mapping[int, float] | None] | None = None,
           allowed_token_ids: Sequence | None = None,
           seed: int | Sequence[int] | None = None, step: int | Sequence[int] = 0,
           logprobs: int | None = None, n_threads: int | None = None):
    """Sample one token ID per row of ``logits`` (float32 ``[B, V]`` or ``[V]``).

    Knobs (``temperature``, ``top_k``, ``top_p``, ``min_p``, the three penalties, ``seed``,
    ``step``) are scalars or one value per row. ``prompt_token_ids``, ``output_token_ids``
    and ``allowed_token_ids`` are a sequence of IDs for ``[V]`` logits, or a list of B such
    sequences (None = empty / unrestricted); ``logit_bias`` is a ``{token_id: bias}`` dict,
    or a list of B of them. ``top_k`` 0 or -1 (or >= V) is off; ``top_p`` in (0, 1];
    ``min_p`` in [0, 1]; ``seed=None`` draws fresh OS entropy per row.

    Returns the token IDs (``int`` for ``[V]``, ``int64[B]`` for ``[B, V]``), or with
    ``logprobs=n`` (0 <= n <= 20) a :class:`SampleResult` that adds raw logprobs, ranks and
    the top-n tokens. The kernel releases the GIL; rows run on ``n_threads`` threads
    (None = automatic). Invalid input raises ``TypeError``/``ValueError`` naming the argument.
    """
    # Scalar knobs that are all in range, no penalties, nothing sparse, no logprobs: the
    # kernel needs no per-row arrays. Checked with plain comparisons because a decode loop
    # calls this once per token and the kernel itself takes microseconds.
    plain = (logprobs is None and prompt_token_ids is None and output_token_ids is None
             and logit_bias is None and allowed_token_ids is None
             and type(temperature) in _NUM and type(top_k) is int and type(top_p) in _NUM
             and type(min_p) in _NUM and type(step) is int
             and type(repetition_penalty) in _NUM and type(presence_penalty) in _NUM
             and type(frequency_penalty) in _NUM
             and repetition_penalty == 1.0 and presence_penalty == 0.0
             and frequency_penalty == 0.0
             and 0.0 <= temperature < math.inf and 0.0 < top_p <= 1.0
             and 0.0 <= min_p <= 1.0 and -1 <= top_k < 2**62 and 0 <= step < 2**64)
    # One row, as [V] or [1, V] (a decode loop with batch 1): straight to the one-row entry.
    if (plain and type(logits) is np.ndarray and logits.dtype == _F32
            and logits.flags.c_contiguous and logits.size > 0
            and (logits.ndim == 1 or (logits.ndim == 2 and logits.shape[0] == 1))
            and (n_threads is None or (type(n_threads) is int and n_threads >= 1))
            and (seed is None or (type(seed) is int and 0 <= seed < 2**64))):
        s = int.from_bytes(os.urandom(8), "little") if seed is None else seed
        row = logits if logits.ndim == 1 else logits[0]
        tok = _k.sample_one(row, temperature, max(top_k, 0), top_p, min_p, s, step)
        if tok < 0:
            _raise_status(np.array([-tok], np.int32))
        return tok if logits.ndim == 1 else np.array([tok], np.int64)

    x, one = _logits_2d(logits)
    B, V = x.shape
    if plain:
        sd = _seeds(seed, B)
        nt = _threads(n_threads, B, V)
        tokens = np.empty(B, np.int64)
        status = np.zeros(B, np.int32)
        _k.sample_rows(x, temperature, max(top_k, 0), top_p, min_p, sd, step, nt, tokens, status)
        _raise_status(status)
        return int(tokens[0]) if one else tokens
    if logprobs is not None:
        if isinstance(logprobs, (bool, np.bool_)) or not isinstance(logprobs, numbers.Integral):
            raise TypeError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], "
                            f"got {logprobs!r}")
        if not 0 <= logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}")
        if logprobs > V:
            raise ValueError(f"logprobs ({logprobs}) exceeds the vocabulary size {V}")
    knobs = _knob_matrix(B, V, dict(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty))
    sd = _seeds(seed, B)
    if isinstance(step, numbers.Integral) and not isinstance(step, (bool, np.bool_)):
        if not 0 <= int(step) < 2**64:
            raise ValueError(f"step must be in [0, 2**64), got {int(step)}")
        st = np.array([int(step)], np.uint64)
    else:
        st = _int_knob("step", step, B, 0, 2**64 - 1, np.uint64)
    p_ids, p_off, _ = _ragged_ids("prompt_token_ids", prompt_token_ids, B, V, one)
    o_ids, o_off, _ = _ragged_ids("output_token_ids", output_token_ids, B, V, one)
    a_ids, a_off, has_a = _ragged_ids("allowed_token_ids", allowed_token_ids, B, V, one)
    b_ids, b_vals, b_off = _ragged_bias(logit_bias, B, V, one)
    nt = _threads(n_threads, B, V)

    n_top = int(logprobs or 0)
    want_lp = logprobs is not None
    hist = p_off[1:] - p_off[:-1] + o_off[1:] - o_off[:-1]
    max_hist = int(hist.max()) if B else 0
    need_work = bool(has_a.any() or b_off[-1] or max_hist)

    tokens = np.empty(B, np.int64)
    status = np.zeros(B, np.int32)
    if want_lp:
        lps, ranks = np.empty(B, np.float32), np.empty(B, np.int64)
        top_ids, top_lps = np.empty((B, n_top), np.int64), np.empty((B, n_top), np.float32)
    else:  # never written by the kernel
        lps, ranks, top_ids, top_lps = _NO_LP, _NO_RANK, _NO_TOP_IDS, _NO_TOP_LPS
    if B:
        _k.sample_batch(x, knobs, sd, st, p_ids, p_off, o_ids, o_off, b_ids, b_vals, b_off,
                        a_ids, a_off, has_a, n_top, want_lp, need_work, max_hist, nt,
                        tokens, status, lps, ranks, top_ids, top_lps)
        _raise_status(status)
    if not want_lp:
        return int(tokens[0]) if one else tokens
    if one:
        return SampleResult(int(tokens[0]), float(lps[0]), int(ranks[0]), top_ids[0], top_lps[0])
    return SampleResult(tokens, lps, ranks, top_ids, top_lps)


def log_softmax(logits: np.ndarray, *, n_threads: int | None = None) -> np.ndarray:
    """Row-wise ``logits - logsumexp(logits)`` as float32, same shape ([V] or [B, V]).

    NaN counts as -inf; a row with no finite value, or holding +inf, raises ``ValueError``.
    """
    x, one = _logits_2d(logits)
    B, V = x.shape
    out = np.empty((B, V), np.float32)
    status = np.zeros(B, np.int32)
    if B:
        _k.log_softmax_batch(x, out, status, _threads(n_threads, B, V))
        _raise_status(status)
    return out[0] if one else out
