"""Token sampling from logits: the validating wrapper over tep._kernels.sampling.

Semantics (docs/SAMPLING.md has the full policy), per row, in this order:

1. raw logprobs are the log_softmax of the logits as given (NaN as -inf);
2. NaN is -inf; a row with no finite logit (or holding +inf) raises ``ValueError`` (or
   gets a status with ``row_status=True``);
3. ``allowed_token_ids`` and ``token_bitmask`` mask every other token to -inf, then
   ``logit_bias`` (clamped to [-100, 100]) is added; edits of finite logits saturate at
   +-FLT_MAX and never touch non-finite ones;
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

Knobs are checked in float32, the kernel's precision (see ``sample``). The kernel guards
every index it computes: ids outside [0, V) are skipped, and an empty candidate set falls
back to the row's argmax instead of being read.
"""
from __future__ import annotations

import enum
import math
import numbers
import os
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from tep._kernels import sampling as _k

__all__ = ["sample", "SampleResult", "SampledRows", "TokenSpans", "RowStatus", "log_softmax",
           "apply_token_bitmask", "RowKnobs", "prepare_row", "PreparedBatch",
           "prepare_batch", "sample_prepared"]

_F32 = np.dtype(np.float32)
_I32 = np.dtype(np.int32)
_NUM = (float, int)
_EMPTY_I32 = np.zeros(1, np.int32)    # id arrays hold >= 1 element (kernel ABI)
_EMPTY_F32 = np.zeros(1, np.float32)
_NO_LP, _NO_RANK = np.zeros(1, np.float32), np.zeros(1, np.int64)
_NO_TOP_IDS, _NO_TOP_LPS = np.zeros((1, 0), np.int64), np.zeros((1, 0), np.float32)
MAX_LOGPROBS = 20
MAX_THREADS = 2**31 - 1               # OpenMP takes a C int; rows never use more than B
MAX_VOCAB = 2**31 - 1                 # token ids are int32 in the kernel
_PARALLEL_MIN_WORK = 1 << 17          # B*V below this stays on one thread
# The kernel computes in float32: knobs are checked (and rounded) in that precision.
F32_MAX = float(np.finfo(np.float32).max)     # 3.4028235e+38
F32_TINY = float(np.finfo(np.float32).tiny)   # 1.1754944e-38, the smallest normal float32
_F32_OVERFLOW = F32_MAX + 2.0**103            # float64 values from here on round to inf


class RowStatus(enum.IntEnum):
    """Per-row outcome of :func:`sample` (``row_status=True``); 0 is success."""

    OK = 0
    NO_FINITE = 1      # the row has no finite logit (NaN counts as -inf)
    POS_INF = 2        # the row holds +inf
    NO_MEMORY = 3      # scratch allocation failed (never a data error: sample raises)
    MASKED_ALL = 4     # finite logits exist, but allowed_token_ids / token_bitmask keep none


STATUS_MESSAGES = {
    RowStatus.NO_FINITE: "has no finite value (NaN counts as -inf)",
    RowStatus.POS_INF: "holds +inf",
    RowStatus.NO_MEMORY: "could not get scratch memory",
    RowStatus.MASKED_ALL: ("has finite values, but allowed_token_ids / token_bitmask "
                           "allow none of them"),
}


class SampleResult(NamedTuple):
    """What ``sample(..., logprobs=n)`` returns; "raw" = before any processing.

    For [B, V] logits: token_ids int64[B], logprobs float32[B] (raw logprob of the chosen
    token), ranks int64[B] (1 = most likely raw logit), top_token_ids int64[B, n] and
    top_logprobs float32[B, n] (the n most likely raw tokens, descending, ties by lower id).
    For [V] logits the leading B axis is dropped (ints/floats and [n] arrays).
    With ``row_status=True`` a failed row has token -1, logprob NaN, rank 0, top ids -1
    and top logprobs NaN.
    """

    token_ids: Any
    logprobs: Any
    ranks: Any
    top_token_ids: np.ndarray
    top_logprobs: np.ndarray


class SampledRows(NamedTuple):
    """What ``sample(..., row_status=True)`` returns: one outcome per row, never an
    exception for a row's data.

    token_ids: int64[B] (``int`` for [V] logits), -1 where status != 0.
    status: int32[B] (``int`` for [V] logits), :class:`RowStatus` codes; 0 = ok.
    logprobs: the :class:`SampleResult` when ``logprobs=n`` was asked for, else None.
    """

    token_ids: Any
    status: Any
    logprobs: SampleResult | None


class TokenSpans(NamedTuple):
    """Per-row token histories as slices of one flat buffer, for callers (an engine) that
    keep histories between steps instead of rebuilding lists.

    ids: int32 [N], C-contiguous (int32 only: the kernel's id type, so nothing is copied).
    starts, ends: integer [B]; row r's tokens are ``ids[starts[r]:ends[r]]``.
    ``sample`` checks ``0 <= starts <= ends <= N`` (O(B)) but not the ids themselves
    (O(N)): the kernel skips any id outside [0, V) when it reads it.
    """

    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray


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
    if x.shape[1] > MAX_VOCAB:
        raise ValueError(f"{name}: vocabulary size {x.shape[1]} exceeds {MAX_VOCAB} "
                         f"(token ids are int32)")
    return np.ascontiguousarray(x), one


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (numbers.Number, np.generic)) and not isinstance(v, (bool, np.bool_))


class _FloatKnob(NamedTuple):
    """A float knob's valid range (float64 bounds, open or closed) and what happens to a
    value that is valid in float64 but not a normal float32 (the kernel's precision):
    "finite" rejects values that overflow float32; "normal" also rejects values that round
    to 0 or a denormal; "floor" raises those to the smallest normal float32."""

    name: str
    lo: float
    hi: float
    lo_open: bool
    hi_open: bool
    f32: str


# the kernel's knob-matrix row order (top_k, row 1, is handled on its own)
_FLOAT_KNOBS = (_FloatKnob("temperature", 0.0, math.inf, False, True, "finite"),
                _FloatKnob("top_p", 0.0, 1.0, True, False, "floor"),
                _FloatKnob("min_p", 0.0, 1.0, False, False, "finite"),
                _FloatKnob("repetition_penalty", 0.0, math.inf, True, True, "normal"),
                _FloatKnob("presence_penalty", -math.inf, math.inf, True, True, "finite"),
                _FloatKnob("frequency_penalty", -math.inf, math.inf, True, True, "finite"))


def _range_text(k: _FloatKnob) -> str:
    return f"{'(' if k.lo_open else '['}{k.lo}, {k.hi}{')' if k.hi_open else ']'}"


def _float_values(k: _FloatKnob, arr: np.ndarray) -> np.ndarray:
    """arr (float64, any shape) checked against k and rounded to float32, as float64."""
    bad = ~np.isfinite(arr) | (arr <= k.lo if k.lo_open else arr < k.lo) \
        | (arr >= k.hi if k.hi_open else arr > k.hi)
    if bad.any():
        v = arr[bad].flat[0]
        raise ValueError(f"{k.name} must be finite and in {_range_text(k)}, got {v}")
    with np.errstate(over="ignore", under="ignore"):
        f = arr.astype(np.float32)
    mag = np.abs(f)
    if (mag > F32_MAX).any():
        v = arr[mag > F32_MAX].flat[0]
        raise ValueError(f"{k.name} = {v} overflows float32, the precision the kernel "
                         f"computes in: |{k.name}| must be <= {F32_MAX:.8g}")
    small = (mag < F32_TINY) & (arr != 0)
    if small.any():
        if k.f32 == "normal":
            v = arr[small].flat[0]
            raise ValueError(f"{k.name} = {v} is below float32's normal range: {k.name} "
                             f"must be in [{F32_TINY:.8g}, {F32_MAX:.8g}] (the kernel "
                             f"computes in float32)")
        if k.f32 == "floor":
            f = np.where(small, np.float32(F32_TINY), f)
    return f.astype(np.float64)


def _float_knob(k: _FloatKnob, value: Any, B: int) -> np.ndarray:
    """A float knob (scalar or one per row) as float64[B] holding float32 values."""
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (str, bytes)):
        raise TypeError(f"{k.name} must be a number or one number per row, got {value!r}")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{k.name} must be a number or one number per row, "
                        f"got {value!r}") from None
    if np.iscomplexobj(np.asarray(value)):
        raise TypeError(f"{k.name} must be real, got {value!r}")
    if arr.ndim == 0:
        arr = np.full(B, arr, np.float64)
    elif arr.shape != (B,):
        raise ValueError(f"{k.name} must be a scalar or have one value per row ({B}), "
                         f"got shape {arr.shape}")
    return _float_values(k, arr)


def _float_scalar(k: _FloatKnob, v: Any) -> float:
    """One scalar knob, checked like _float_values (same messages) without numpy arrays:
    a decode loop pays this per knob per call."""
    if type(v) not in (float, int) and (isinstance(v, (bool, np.bool_))
                                        or not isinstance(v, numbers.Real)):
        raise TypeError(f"{k.name} must be a number or one number per row, got {v!r}")
    try:
        f = float(v)
    except OverflowError:      # an int beyond float64
        raise ValueError(f"{k.name} must be finite and in {_range_text(k)}, got {v}") from None
    if not math.isfinite(f) or (f <= k.lo if k.lo_open else f < k.lo) \
            or (f >= k.hi if k.hi_open else f > k.hi):
        raise ValueError(f"{k.name} must be finite and in {_range_text(k)}, got {v}")
    if abs(f) < _F32_OVERFLOW and (f == 0.0 or F32_TINY <= abs(f) <= F32_MAX):
        return float(np.float32(f))           # the common case: a normal float32
    return float(_float_values(k, np.array([f]))[0])


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
    if arr.dtype == object and arr.ndim == 1 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))
            for v in arr):
        vals = [int(v) for v in arr]               # Python ints beyond int64
        bad = [v for v in vals if not lo <= v <= hi]
        if bad:
            raise ValueError(f"{name} must be in [{lo}, {hi}], got {bad[0]}")
        arr = np.array(vals, dtype)
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


_TOP_K_BIG = 2**63 - 1      # any top_k >= V is off; larger values are clamped here first


def _top_k(value: Any, B: int, V: int):
    """top_k as float64 (scalar or [B]): 0 = off for -1, 0 and anything >= V, however large."""
    if _is_scalar(value):
        if not isinstance(value, numbers.Integral):
            raise TypeError(f"top_k must be an integer, got {value!r}")
        tk = int(value)
        if tk < -1:
            raise ValueError(f"top_k must be >= -1 (0, -1 or >= V = off), got {tk}")
        return float(tk if 0 < tk < V else 0)
    if isinstance(value, np.ndarray) and value.dtype == np.uint64:
        value = np.minimum(value, np.uint64(_TOP_K_BIG)).astype(np.int64)
    elif isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray)
                                               and value.dtype == object):
        value = [min(int(v), _TOP_K_BIG) if isinstance(v, numbers.Integral)
                 and not isinstance(v, (bool, np.bool_)) else v for v in list(value)]
    k = _int_knob("top_k", value, B, -1, _TOP_K_BIG, np.int64)
    return np.where((k > 0) & (k < V), k, 0).astype(np.float64)


def _knob_matrix(B: int, V: int, values: dict) -> np.ndarray:
    """float64 [7, 1] when every knob is a scalar, else [7, B] (the kernel's layout)."""
    tk = values["top_k"]
    if _is_scalar(tk) and all(_is_scalar(values[k.name]) for k in _FLOAT_KNOBS):
        col = [_float_scalar(k, values[k.name]) for k in _FLOAT_KNOBS]
        col.insert(1, _top_k(tk, B, V))
        return np.array(col, np.float64).reshape(7, 1)
    out = np.empty((7, B), np.float64)
    for i, k in zip((0, 2, 3, 4, 5, 6), _FLOAT_KNOBS):
        out[i] = _float_knob(k, values[k.name], B)
    out[1] = _top_k(tk, B, V)
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
        return np.zeros(0, np.int32)
    if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must hold integer token IDs, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name}: each entry must be a 1-D sequence of token IDs, "
                         f"got shape {arr.shape}")
    if arr.min() < 0 or arr.max() >= V:
        bad = arr[(arr < 0) | (arr >= V)][0]
        raise ValueError(f"{name} holds token ID {bad} outside [0, {V})")
    return arr.astype(np.int32, copy=False)


class _Ragged(NamedTuple):
    """One ragged kernel input: row r's items are ids[starts[r]:ends[r]]."""

    ids: np.ndarray          # int32 [N >= 1]
    starts: np.ndarray       # int64 [B]
    ends: np.ndarray         # int64 [B]
    present: np.ndarray      # uint8 [B]: the row gave a list (None = absent)

    @property
    def lengths(self) -> np.ndarray:
        return self.ends - self.starts


def _from_offsets(ids: np.ndarray, offsets: np.ndarray, present: np.ndarray) -> _Ragged:
    return _Ragged(ids if ids.size else _EMPTY_I32, offsets[:-1], offsets[1:], present)


def _spans(name: str, sp: TokenSpans, B: int) -> _Ragged:
    """A TokenSpans checked in O(B): dtypes, shapes and 0 <= starts <= ends <= len(ids)."""
    ids, starts, ends = sp
    if not isinstance(ids, np.ndarray) or ids.dtype != _I32 or ids.ndim != 1:
        raise TypeError(f"{name}: TokenSpans.ids must be a 1-D numpy int32 array, got "
                        f"{getattr(ids, 'dtype', type(ids).__name__)} "
                        f"{getattr(ids, 'shape', '')}")
    if not ids.flags.c_contiguous:
        raise ValueError(f"{name}: TokenSpans.ids must be C-contiguous")
    out = []
    for what, a in (("starts", starts), ("ends", ends)):
        a = np.asarray(a)
        if a.dtype.kind not in "iu" or a.dtype == np.bool_:
            raise TypeError(f"{name}: TokenSpans.{what} must be integers, got dtype {a.dtype}")
        if a.shape != (B,):
            raise ValueError(f"{name}: TokenSpans.{what} must have one entry per row ({B}), "
                             f"got shape {a.shape}")
        if a.dtype == np.uint64 and B and a.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{name}: TokenSpans.{what} holds {a.max()} beyond len(ids)")
        out.append(np.ascontiguousarray(a, dtype=np.int64))
    st, en = out
    bad = (st < 0) | (st > en) | (en > ids.size)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}: TokenSpans row {r} spans [{st[r]}, {en[r]}), which is not "
                         f"within 0 <= start <= end <= len(ids) = {ids.size}")
    return _Ragged(ids if ids.size else _EMPTY_I32, st, en, np.ones(B, np.uint8))


def _ragged_ids(name: str, value: Any, B: int, V: int, one: bool) -> _Ragged:
    """Per-row ID lists (or a TokenSpans) in the kernel's ragged layout."""
    if isinstance(value, TokenSpans):
        return _spans(name, value, B)
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
    ids = np.concatenate(parts) if offsets[-1] else _EMPTY_I32
    return _from_offsets(ids, offsets, present)


def _ragged_bias(value: Any, B: int, V: int, one: bool) -> tuple[_Ragged, np.ndarray]:
    """(ragged token ids, float32 values beside them) for per-row logit_bias dicts."""
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
    present = np.zeros(B, np.uint8)
    if not ids:
        return _from_offsets(_EMPTY_I32, offsets, present), _EMPTY_F32
    # values beyond float32 become +-inf here; the kernel clamps them to +-100 first
    with np.errstate(over="ignore"):
        fv = np.asarray(vals, np.float32)
    return _from_offsets(np.asarray(ids, np.int32), offsets, present), fv


_NO_MASK = np.zeros((1, 1), np.uint32)


def _bitmask(value: Any, B: int, V: int, one: bool) -> np.ndarray:
    """token_bitmask checked (int32 [B, W >= ceil(V/32)]) and viewed as uint32 words."""
    W = (V + 31) // 32
    if not isinstance(value, np.ndarray):
        raise ValueError(f"token_bitmask must be a numpy int32 array [B, ceil(V/32)], "
                         f"got {type(value).__name__}")
    if value.dtype not in (np.dtype(np.int32), np.dtype(np.uint32)):
        raise ValueError(f"token_bitmask must have dtype int32 (bit j allows token j), "
                         f"got {value.dtype}")
    m = value[None, :] if one and value.ndim == 1 else value
    if m.ndim != 2 or m.shape[0] != B:
        raise ValueError(f"token_bitmask must have shape [{B}, >= {W}] for logits with "
                         f"B = {B}, V = {V}; got {value.shape}")
    if m.shape[1] < W:
        raise ValueError(f"token_bitmask has {m.shape[1]} words per row; V = {V} needs "
                         f"at least ceil(V/32) = {W}")
    if B == 0:
        return _NO_MASK
    return np.ascontiguousarray(m).view(np.uint32)


def _seeds(seed: Any, B: int) -> np.ndarray:
    if seed is None:
        return np.frombuffer(os.urandom(8 * max(B, 1)), np.uint64)[:B].copy()
    if isinstance(seed, (bool, np.bool_)):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if isinstance(seed, numbers.Integral):
        if not 0 <= int(seed) < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {int(seed)}")
        return np.array([int(seed)], np.uint64)      # one value for every row
    # a list of Python ints mixing values past int64 with small ones becomes float64 in
    # numpy (uint64 + int64 promote to float): read such lists as objects, exactly
    arr = np.asarray(seed, dtype=object) if isinstance(seed, (list, tuple)) and any(
        isinstance(s, numbers.Integral) and not isinstance(s, (bool, np.bool_))
        and int(s) >= 2**63 for s in seed) else np.asarray(seed)
    if arr.dtype == object:
        arr = np.asarray([_seeds(int(s) if isinstance(s, numbers.Integral) else s, 1)[0]
                          for s in seed], np.uint64)
    return _int_knob("seed", arr, B, 0, 2**64 - 1, np.uint64)


def _check_logprobs(logprobs: Any, V: int) -> None:
    """``logprobs``: None or an integer in [0, min(MAX_LOGPROBS, V)]."""
    if logprobs is None:
        return
    if isinstance(logprobs, (bool, np.bool_)) or not isinstance(logprobs, numbers.Integral):
        raise TypeError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], "
                        f"got {logprobs!r}")
    if not 0 <= logprobs <= MAX_LOGPROBS:
        raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}")
    if logprobs > V:
        raise ValueError(f"logprobs ({logprobs}) exceeds the vocabulary size {V}")


def _steps(step: Any, B: int, headroom: int = 0) -> np.ndarray:
    """``step`` as uint64 [1] (one for every row) or [B]; each value must leave
    ``headroom`` further steps below 2**64 (speculative verification samples step + j)."""
    top = 2**64 - headroom
    if isinstance(step, numbers.Integral) and not isinstance(step, (bool, np.bool_)):
        if not 0 <= int(step) < top:
            bound = "2**64" if headroom == 0 else f"2**64 - {headroom}"
            raise ValueError(f"step must be in [0, {bound}), got {int(step)}")
        return np.array([int(step)], np.uint64)
    return _int_knob("step", step, B, 0, top - 1, np.uint64)


def _threads(n_threads: Any, B: int, V: int) -> int:
    if n_threads is None:
        if B < 2 or B * V < _PARALLEL_MIN_WORK:
            return 1
        return max(1, min(B, _k.max_threads()))
    if isinstance(n_threads, (bool, np.bool_)) or not isinstance(n_threads, numbers.Integral):
        raise TypeError(f"n_threads must be a positive integer or None, got {n_threads!r}")
    if not 1 <= n_threads <= MAX_THREADS:
        raise ValueError(f"n_threads must be in [1, {MAX_THREADS}], got {n_threads}")
    return int(min(n_threads, max(B, 1)))     # more threads than rows would idle


def _status_error(status: np.ndarray) -> Exception | None:
    """The exception for the first failed row of status, or None."""
    bad = np.flatnonzero(status)
    if bad.size == 0:
        return None
    r, st = int(bad[0]), int(status[bad[0]])
    if st == RowStatus.NO_MEMORY:
        return MemoryError(f"sample: scratch allocation failed for row {r}")
    what = STATUS_MESSAGES.get(st, f"failed with status {st}")  # type: ignore[call-overload]
    return ValueError(f"logits: row {r} {what}")


def _raise_status(status: np.ndarray) -> None:
    err = _status_error(status)
    if err is not None:
        raise err


# ---- public API --------------------------------------------------------------------------

def _check_row_status(row_status: Any) -> None:
    if not isinstance(row_status, (bool, np.bool_)):
        raise TypeError(f"row_status must be a bool, got {row_status!r}")


def _row_args(B: int, V: int, one: bool, headroom: int, *, temperature: Any, top_k: Any,
              top_p: Any, min_p: Any, repetition_penalty: Any, presence_penalty: Any,
              frequency_penalty: Any, prompt_token_ids: Any, output_token_ids: Any,
              allowed_token_ids: Any, logit_bias: Any, seed: Any, step: Any) -> tuple:
    """The checked per-row arguments shared by :func:`sample` and
    :func:`tep.kernels.verify`: (knob matrix, seeds, steps, prompt, output and allowed
    spans, bias spans, bias values). ``headroom``: steps a row may take past ``step``."""
    knobs = _knob_matrix(B, V, dict(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty))
    sd, st = _seeds(seed, B), _steps(step, B, headroom)
    pr = _ragged_ids("prompt_token_ids", prompt_token_ids, B, V, one)
    ou = _ragged_ids("output_token_ids", output_token_ids, B, V, one)
    al = _ragged_ids("allowed_token_ids", allowed_token_ids, B, V, one)
    bi, b_vals = _ragged_bias(logit_bias, B, V, one)
    return knobs, sd, st, pr, ou, al, bi, b_vals


def sample(logits: np.ndarray, *, temperature: float | Sequence[float] = 1.0,
           top_k: int | Sequence[int] = 0, top_p: float | Sequence[float] = 1.0,
           min_p: float | Sequence[float] = 0.0,
           repetition_penalty: float | Sequence[float] = 1.0,
           presence_penalty: float | Sequence[float] = 0.0,
           frequency_penalty: float | Sequence[float] = 0.0,
           prompt_token_ids: Sequence | TokenSpans | None = None,
           output_token_ids: Sequence | TokenSpans | None = None,
           logit_bias: Mapping[int, float] | Sequence[Mapping[int, float] | None] | None = None,
           allowed_token_ids: Sequence | None = None,
           seed: int | Sequence[int] | None = None, step: int | Sequence[int] = 0,
           token_bitmask: np.ndarray | None = None,
           logprobs: int | None = None, n_threads: int | None = None,
           row_status: bool = False):
    """Sample one token ID per row of ``logits`` (float32 ``[B, V]`` or ``[V]``).

    Knobs (``temperature``, ``top_k``, ``top_p``, ``min_p``, the three penalties, ``seed``,
    ``step``) are scalars or one value per row. ``prompt_token_ids``, ``output_token_ids``
    and ``allowed_token_ids`` are a sequence of IDs for ``[V]`` logits, or a list of B such
    sequences (None = empty / unrestricted); ``prompt_token_ids`` and ``output_token_ids``
    may also be a :class:`TokenSpans` (row r = ``ids[starts[r]:ends[r]]``, checked in O(B);
    ids outside [0, V) are skipped by the kernel). ``logit_bias`` is a ``{token_id: bias}``
    dict, or a list of B of them. ``token_bitmask`` (structured output) is int32
    ``[B, W]`` (``[W]`` or ``[1, W]`` for ``[V]`` logits) with W >= ceil(V / 32): bit
    ``j % 32`` of word ``j // 32`` allows token j (the llguidance / xgrammar layout; bits
    past V are ignored); it is applied with ``allowed_token_ids`` before bias and penalties,
    inside the kernel's pass over the row, and a row whose words are all ones costs nothing
    more. ``top_k`` 0 or -1 (or >= V, however large) is off;
    ``top_p`` in (0, 1]; ``min_p`` in [0, 1]; ``seed=None`` draws fresh OS entropy per row.

    Float knobs are checked in float32, the kernel's precision: a value that overflows
    float32 is a ``ValueError``; a ``repetition_penalty`` below the smallest normal float32
    (1.1754944e-38) is a ``ValueError``; a ``top_p`` below it is raised to it (which keeps
    the most likely token and its ties, as any top_p below that token's probability does);
    a ``min_p`` that rounds to 0 is off. ``temperature`` is greedy when its float32 value
    is below float32(1e-5).

    Returns the token IDs (``int`` for ``[V]``, ``int64[B]`` for ``[B, V]``), or with
    ``logprobs=n`` (0 <= n <= 20) a :class:`SampleResult` that adds raw logprobs, ranks and
    the top-n tokens (always the raw model logprobs, before any mask). A row with no finite
    logit, holding +inf, or whose allowed set / bitmask keeps no finite logit raises ``ValueError`` — unless ``row_status=True``: then the call returns
    a :class:`SampledRows` (tokens, an int32 :class:`RowStatus` per row, the SampleResult or
    None) and failed rows get token -1 instead of failing the batch. The kernel releases
    the GIL; rows run on ``n_threads`` threads (None = automatic, at most B are used).
    Invalid arguments raise ``TypeError``/``ValueError`` naming the argument.
    """
    # Scalar knobs that are all in range, no penalties, nothing sparse, no logprobs: the
    # kernel needs no per-row arrays. Checked with plain comparisons because a decode loop
    # calls this once per token and the kernel itself takes microseconds.
    plain = (logprobs is None and prompt_token_ids is None and output_token_ids is None
             and logit_bias is None and allowed_token_ids is None and row_status is False
             and type(temperature) in _NUM and type(top_k) is int and type(top_p) in _NUM
             and type(min_p) in _NUM and type(step) is int
             and type(repetition_penalty) in _NUM and type(presence_penalty) in _NUM
             and type(frequency_penalty) in _NUM
             and repetition_penalty == 1.0 and presence_penalty == 0.0
             and frequency_penalty == 0.0
             and 0.0 <= temperature <= F32_MAX and F32_TINY <= top_p <= 1.0
             and 0.0 <= min_p <= 1.0 and -1 <= top_k and 0 <= step < 2**64
             and (n_threads is None or (type(n_threads) is int
                                        and 1 <= n_threads <= MAX_THREADS)))
    # One row, as [V] or [1, V] (a decode loop with batch 1): straight to the one-row entry.
    if (plain and type(logits) is np.ndarray and logits.dtype == _F32
            and logits.flags.c_contiguous and 0 < logits.size <= MAX_VOCAB
            and (logits.ndim == 1 or (logits.ndim == 2 and logits.shape[0] == 1))
            and (seed is None or (type(seed) is int and 0 <= seed < 2**64))):
        s = int.from_bytes(os.urandom(8), "little") if seed is None else seed
        row = logits if logits.ndim == 1 else logits[0]
        mrow = None if token_bitmask is None else \
            _bitmask(token_bitmask, 1, row.size, logits.ndim == 1)[0]
        # top_k >= V is off in the kernel: clamp what int64 cannot hold
        tok = _k.sample_one(row, temperature, min(max(top_k, 0), _TOP_K_BIG), top_p, min_p,
                            s, step, mrow)
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
        mask = None if token_bitmask is None else _bitmask(token_bitmask, B, V, one)
        if B:
            _k.sample_rows(x, temperature, min(max(top_k, 0), _TOP_K_BIG), top_p, min_p, sd,
                           step, nt, tokens, status, mask)
        _raise_status(status)
        return int(tokens[0]) if one else tokens
    _check_row_status(row_status)
    _check_logprobs(logprobs, V)
    knobs, sd, st, pr, ou, al, bi, b_vals = _row_args(
        B, V, one, 0, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, prompt_token_ids=prompt_token_ids,
        output_token_ids=output_token_ids, allowed_token_ids=allowed_token_ids,
        logit_bias=logit_bias, seed=seed, step=step)
    mask = _NO_MASK if token_bitmask is None else _bitmask(token_bitmask, B, V, one)
    nt = _threads(n_threads, B, V)

    n_top = int(logprobs or 0)
    want_lp = logprobs is not None
    max_hist = int((pr.lengths + ou.lengths).max()) if B else 0
    need_work = bool(al.present.any() or bi.ends[-1:].any() or max_hist)

    tokens = np.empty(B, np.int64)
    status = np.zeros(B, np.int32)
    if want_lp:
        lps, ranks = np.empty(B, np.float32), np.empty(B, np.int64)
        top_ids, top_lps = np.empty((B, n_top), np.int64), np.empty((B, n_top), np.float32)
    else:  # never written by the kernel
        lps, ranks, top_ids, top_lps = _NO_LP, _NO_RANK, _NO_TOP_IDS, _NO_TOP_LPS
    if B:
        _k.sample_batch(x, knobs, sd, st, pr.ids, pr.starts, pr.ends, ou.ids, ou.starts,
                        ou.ends, bi.ids, b_vals, bi.starts, bi.ends, al.ids, al.starts,
                        al.ends, al.present, mask, token_bitmask is not None, n_top,
                        want_lp, need_work, max_hist, nt,
                        tokens, status, lps, ranks, top_ids, top_lps)
        err = _status_error(status)
        if err is not None and (not row_status or isinstance(err, MemoryError)):
            raise err
        if err is not None and want_lp:
            failed = status != 0
            lps[failed], ranks[failed] = np.nan, 0
            top_ids[failed], top_lps[failed] = -1, np.nan
    result: Any
    if not want_lp:
        result = None
    elif one:
        result = SampleResult(int(tokens[0]), float(lps[0]), int(ranks[0]), top_ids[0], top_lps[0])
    else:
        result = SampleResult(tokens, lps, ranks, top_ids, top_lps)
    if row_status:
        if one:
            return SampledRows(int(tokens[0]), int(status[0]), result)
        return SampledRows(tokens, status, result)
    if result is not None:
        return result
    return int(tokens[0]) if one else tokens


def apply_token_bitmask(logits: np.ndarray, bitmask: np.ndarray, *,
                        n_threads: int | None = None) -> None:
    """Set ``logits[r, j] = -inf`` in place wherever bit j of ``bitmask[r]`` is clear.

    For backends that sample elsewhere. ``logits``: writeable C-contiguous float32 ``[B, V]``
    (or ``[V]``); ``bitmask``: int32 ``[B, W]`` (``[W]`` / ``[1, W]`` for ``[V]``) with
    W >= ceil(V / 32), bit ``j % 32`` of word ``j // 32`` allowing token j - the layout
    llguidance and xgrammar fill. Bits past V are ignored; allowed logits are neither read
    nor written. Rows run on ``n_threads`` threads (None = automatic). Returns None.
    """
    x, one = _logits_2d(logits)
    if x is not logits and not (one and x.base is logits):
        raise ValueError("logits must be C-contiguous to be masked in place")
    if not logits.flags.writeable:
        raise ValueError("logits must be writeable to be masked in place")
    B, V = x.shape
    mask = _bitmask(bitmask, B, V, one)
    if B:
        _k.apply_bitmask_batch(x, mask, _threads(n_threads, B, V))


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


# ---- validate once, sample many times (an engine's persistent rows) ------------------------

class RowKnobs(NamedTuple):
    """One row's sampling arguments, validated once by :func:`prepare_row`.

    knobs: float64 [7], the kernel's knob column (temperature, top_k (0 = off), top_p,
        min_p, repetition, presence, frequency), values already rounded to float32.
    bias_ids: int32 [n], bias_values: float32 [n] (n = 0: no bias).
    allowed: int32 [m] allowed token ids, or None (every token).
    """

    knobs: np.ndarray
    bias_ids: np.ndarray
    bias_values: np.ndarray
    allowed: np.ndarray | None

    @property
    def penalized(self) -> bool:
        k = self.knobs
        return bool(k[4] != 1.0 or k[5] != 0.0 or k[6] != 0.0)


def prepare_row(vocab_size: int, *, temperature: Any = 1.0, top_k: Any = 0, top_p: Any = 1.0,
                min_p: Any = 0.0, repetition_penalty: Any = 1.0, presence_penalty: Any = 0.0,
                frequency_penalty: Any = 0.0, logit_bias: Mapping[int, float] | None = None,
                allowed_token_ids: Sequence[int] | None = None) -> RowKnobs:
    """Validate one row's knobs exactly as :func:`sample` does (same errors) for a
    vocabulary of ``vocab_size`` tokens, once; :func:`sample_prepared` then takes them
    every step without looking at them again."""
    V = int(vocab_size)
    knobs = _knob_matrix(1, V, dict(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty))[:, 0].copy()
    bi, bv = _ragged_bias(logit_bias, 1, V, True)
    n = int(bi.ends[0] - bi.starts[0])
    ids = bi.ids[:n].copy() if n else np.zeros(0, np.int32)
    vals = bv[:n].copy() if n else np.zeros(0, np.float32)
    allowed = None
    if allowed_token_ids is not None:
        al = _ragged_ids("allowed_token_ids", [allowed_token_ids], 1, V, False)
        allowed = al.ids[:int(al.ends[0])].copy()
    return RowKnobs(knobs, ids, vals, allowed)


class PreparedBatch(NamedTuple):
    """The per-batch arguments of :func:`sample_prepared` that stay the same while the
    same rows run (gathered once by :func:`prepare_batch`)."""

    knobs: np.ndarray        # float64 [7, B], C-contiguous
    seeds: np.ndarray        # uint64 [B]
    bias: _Ragged
    bias_values: np.ndarray
    allowed: _Ragged
    sparse: bool             # any bias or allowed set


def prepare_batch(rows: Sequence[RowKnobs], seeds: np.ndarray) -> PreparedBatch:
    """B prepared rows (and their uint64 seeds) in the kernel's batch layout."""
    B = len(rows)
    knobs = np.ascontiguousarray(np.stack([r.knobs for r in rows], axis=1)) if B else \
        np.zeros((7, 0), np.float64)
    off = np.zeros(B + 1, np.int64)
    aoff = np.zeros(B + 1, np.int64)
    present = np.zeros(B, np.uint8)
    for i, r in enumerate(rows):
        off[i + 1] = off[i] + r.bias_ids.shape[0]
        if r.allowed is not None:
            present[i] = 1
            aoff[i + 1] = aoff[i] + r.allowed.shape[0]
        else:
            aoff[i + 1] = aoff[i]
    b_ids = np.concatenate([r.bias_ids for r in rows]) if off[-1] else _EMPTY_I32
    b_vals = np.concatenate([r.bias_values for r in rows]) if off[-1] else _EMPTY_F32
    a_ids = np.concatenate([r.allowed for r in rows if r.allowed is not None]) \
        if aoff[-1] else _EMPTY_I32
    seeds = np.ascontiguousarray(seeds, np.uint64)
    if seeds.shape != (B,):
        raise ValueError(f"seeds must be uint64 [{B}], got shape {seeds.shape}")
    return PreparedBatch(knobs, seeds, _from_offsets(b_ids, off, np.ones(B, np.uint8)),
                         b_vals, _from_offsets(a_ids, aoff, present),
                         bool(off[-1] or present.any()))


_NO_SPANS_CACHE: dict = {}


def _no_spans(B: int) -> _Ragged:
    r = _NO_SPANS_CACHE.get(B)
    if r is None:
        z = np.zeros(B, np.int64)
        r = _NO_SPANS_CACHE[B] = _Ragged(_EMPTY_I32, z, z, np.zeros(B, np.uint8))
    return r


def sample_prepared(logits: np.ndarray, batch: PreparedBatch, steps: np.ndarray, *,
                    prompt_token_ids: TokenSpans | None = None,
                    output_token_ids: TokenSpans | None = None,
                    token_bitmask: np.ndarray | None = None, logprobs: int | None = None,
                    n_threads: int = 1) -> SampledRows:
    """:func:`sample` (with ``row_status=True``) for rows whose knobs were validated by
    :func:`prepare_row`: only shapes and dtypes are checked here (O(1), TokenSpans O(B)),
    never the values. ``logits``: C-contiguous float32 [B, V]; ``steps``: uint64 [B]."""
    if (not isinstance(logits, np.ndarray) or logits.dtype != _F32 or logits.ndim != 2
            or not logits.flags.c_contiguous):
        raise TypeError("logits must be a C-contiguous float32 [B, V] array")
    B, V = logits.shape
    if batch.knobs.shape != (7, B) or batch.seeds.shape != (B,):
        raise ValueError(f"the prepared batch holds {batch.knobs.shape[1]} rows, logits {B}")
    if not isinstance(steps, np.ndarray) or steps.dtype != np.uint64 or steps.shape != (B,):
        raise TypeError(f"steps must be uint64 [{B}]")
    pr = _no_spans(B) if prompt_token_ids is None else _spans("prompt_token_ids",
                                                               prompt_token_ids, B)
    ou = _no_spans(B) if output_token_ids is None else _spans("output_token_ids",
                                                               output_token_ids, B)
    mask = _NO_MASK if token_bitmask is None else _bitmask(token_bitmask, B, V, False)
    n_top = int(logprobs or 0)
    want_lp = logprobs is not None
    max_hist = int((pr.lengths + ou.lengths).max()) if B and (
        prompt_token_ids is not None or output_token_ids is not None) else 0
    need_work = bool(batch.sparse or max_hist)
    tokens = np.empty(B, np.int64)
    status = np.zeros(B, np.int32)
    if want_lp:
        lps, ranks = np.empty(B, np.float32), np.empty(B, np.int64)
        top_ids, top_lps = np.empty((B, n_top), np.int64), np.empty((B, n_top), np.float32)
    else:
        lps, ranks, top_ids, top_lps = _NO_LP, _NO_RANK, _NO_TOP_IDS, _NO_TOP_LPS
    if B:
        _k.sample_batch(logits, batch.knobs, batch.seeds, steps, pr.ids, pr.starts, pr.ends,
                        ou.ids, ou.starts, ou.ends, batch.bias.ids, batch.bias_values,
                        batch.bias.starts, batch.bias.ends, batch.allowed.ids,
                        batch.allowed.starts, batch.allowed.ends, batch.allowed.present,
                        mask, token_bitmask is not None, n_top, want_lp, need_work, max_hist,
                        max(1, min(int(n_threads), B)), tokens, status, lps, ranks, top_ids,
                        top_lps)
        if (status == RowStatus.NO_MEMORY).any():
            raise MemoryError("sample: scratch allocation failed")
        if want_lp and status.any():
            failed = status != 0
            lps[failed], ranks[failed] = np.nan, 0
            top_ids[failed], top_lps[failed] = -1, np.nan
    res = SampleResult(tokens, lps, ranks, top_ids, top_lps) if want_lp else None
    return SampledRows(tokens, status, res)
