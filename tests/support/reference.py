"""Plain-numpy float64 reference for tep.kernels, written from the contract.

Written from the semantics in docs/SAMPLING.md and :func:`tep.kernels.pool`'s docstring,
independently of the Cython kernels. Everything here is deliberately naive:
float64, full sorts, Python loops over rows. It is a test oracle, not a fast path.

Single-row sampling helpers take the same keyword names as ``tep.kernels.sample`` (scalar,
one-row forms) so tests can pass one ``knobs`` dict to both.
"""
from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence

import numpy as np

GREEDY_TEMPERATURE = 1e-5  # temperature < this -> greedy
BIAS_CLAMP = 100.0
NORM_EPS = 1e-12

__all__ = [
    "clean_logits",
    "log_softmax",
    "process_logits",
    "greedy",
    "filter_mask",
    "support",
    "distribution",
    "raw_logprob_info",
    "knife_edge_distance",
    "pool",
]


# --------------------------------------------------------------------------- raw logits


def clean_logits(row) -> np.ndarray:
    """float64 copy of ``row`` with NaN -> -inf (docs/SAMPLING.md, step 2)."""
    x = np.array(row, dtype=np.float64, copy=True)
    x[np.isnan(x)] = -np.inf
    return x


def log_softmax(logits) -> np.ndarray:
    """Raw log-probabilities of ``logits`` ([V] or [B, V]), NaN -> -inf, float64.

    A row with no finite value yields all -inf (the kernel's ``sample`` rejects such rows;
    ``log_softmax`` behaviour for them is not part of the contract).
    """
    x = clean_logits(logits)
    one_d = x.ndim == 1
    x2 = x.reshape(1, -1) if one_d else x
    out = np.full_like(x2, -np.inf)
    for b in range(x2.shape[0]):
        r = x2[b]
        fin = np.isfinite(r)
        if not fin.any():
            continue
        m = r[fin].max()
        lse = m + np.log(np.sum(np.exp(r[fin] - m)))
        out[b] = r - lse  # -inf stays -inf
    return out[0] if one_d else out


def raw_logprob_info(row, token: int, n: int):
    """(logprob, rank, top_ids[n], top_logprobs[n]) of ``token`` under the raw logits.

    rank = 1 + number of tokens with a strictly larger raw logit (NaN counts as -inf);
    top ids: the n largest raw logits, descending, ties broken by lower id.
    """
    x = clean_logits(row)
    lp = log_softmax(x)
    rank = 1 + int(np.sum(x > x[token]))
    # lexsort: last key is primary. Primary: -x (descending), secondary: id ascending.
    order = np.lexsort((np.arange(x.size), -x))
    top = order[:n]
    return float(lp[token]), rank, top.astype(np.int64), lp[top]


# --------------------------------------------------------------------------- processing


def _ids(seq) -> list[int]:
    return [] if seq is None else [int(t) for t in seq]


def process_logits(
    row,
    *,
    allowed_token_ids: Sequence[int] | None = None,
    logit_bias: Mapping[int, float] | None = None,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    prompt_token_ids: Sequence[int] | None = None,
    output_token_ids: Sequence[int] | None = None,
    **_ignored,
) -> np.ndarray:
    """Processed logits of one row (steps 2-4): NaN -> -inf, allowed mask, clamped bias,
    repetition penalty over distinct prompt ∪ output tokens, then frequency/presence over
    output tokens. Temperature is *not* applied here. float64 [V].
    """
    x = clean_logits(row)
    V = x.size
    if allowed_token_ids is not None:
        keep = np.zeros(V, dtype=bool)
        keep[_ids(allowed_token_ids)] = True
        x[~keep] = -np.inf
    if logit_bias:
        for tok, b in logit_bias.items():
            x[int(tok)] += float(np.clip(float(b), -BIAS_CLAMP, BIAS_CLAMP))
    r = float(repetition_penalty)
    if r != 1.0:
        for t in set(_ids(prompt_token_ids)) | set(_ids(output_token_ids)):
            if x[t] > 0:
                x[t] = x[t] / r
            else:
                x[t] = x[t] * r  # -inf * r stays -inf (r > 0)
    counts = Counter(_ids(output_token_ids))
    for t, c in counts.items():
        x[t] -= float(frequency_penalty) * c + float(presence_penalty) * (c > 0)
    return x


def greedy(row, **knobs) -> int:
    """argmax of the processed logits, lowest index on ties (filters ignored)."""
    x = process_logits(row, **knobs)
    return int(np.flatnonzero(x == x.max())[0])


def _mass_strictly_above(v: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """For each token, the probability mass (softmax of ``v`` renormalised over ``keep``) of
    kept tokens with a strictly larger value. Tokens outside ``keep`` get +inf."""
    out = np.full(v.size, np.inf)
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        return out
    vals = v[idx]
    p = np.exp(vals - vals.max())
    p /= p.sum()
    order = np.argsort(-vals, kind="stable")
    sv, sp = vals[order], p[order]
    cum_before = np.concatenate(([0.0], np.cumsum(sp)[:-1]))
    # first position of each tie group in the descending order
    first = np.searchsorted(-sv, -sv, side="left")
    out[idx[order]] = cum_before[first]
    return out


def filter_mask(
    processed: np.ndarray,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> np.ndarray:
    """Boolean [V]: tokens kept by min_p -> top_k -> top_p on the tempered distribution,
    each over the survivors of the previous. Only tokens with finite processed logit can be
    kept (the others have probability 0). Non-greedy temperatures only.
    """
    assert temperature >= GREEDY_TEMPERATURE
    v = processed / float(temperature)
    keep = np.isfinite(v)
    vmax = v[keep].max()

    # min_p: p_i >= min_p * p_max  <=>  exp(v_i - v_max) >= min_p
    if min_p > 0:
        keep &= np.exp(v - vmax) >= min_p

    # top_k: keep every survivor whose value >= the k-th largest surviving value.
    V = v.size
    if 0 < top_k < V:
        vals = np.sort(v[keep])[::-1]
        if vals.size > top_k:
            kth = vals[top_k - 1]
            keep &= v >= kth

    # top_p: keep i iff mass (renormalised over survivors) strictly more likely than i < top_p.
    if top_p < 1.0:
        keep = keep & (_mass_strictly_above(v, keep) < top_p)
    return keep


def distribution(row, **knobs) -> np.ndarray:
    """The renormalised sampling distribution (float64 [V]) of one row under ``knobs``.

    Greedy temperatures give a one-hot vector on ``greedy(row, **knobs)``.
    """
    x = process_logits(row, **knobs)
    T = float(knobs.get("temperature", 1.0))
    if T < GREEDY_TEMPERATURE:
        p = np.zeros(x.size)
        p[greedy(row, **knobs)] = 1.0
        return p
    keep = filter_mask(
        x,
        temperature=T,
        top_k=int(knobs.get("top_k", 0)),
        top_p=float(knobs.get("top_p", 1.0)),
        min_p=float(knobs.get("min_p", 0.0)),
    )
    v = x / T
    p = np.zeros(x.size)
    p[keep] = np.exp(v[keep] - v[keep].max())
    return p / p.sum()


def support(row, **knobs) -> set[int]:
    """Token IDs with non-zero reference probability."""
    return set(np.flatnonzero(distribution(row, **knobs) > 0).tolist())


def knife_edge_distance(row, **knobs) -> float:
    """How far ``row`` is from a float knife edge of the min_p / top_p thresholds.

    Returns the minimum over kept-or-candidate tokens of |ratio - min_p| (min_p active) and
    |cumulative mass strictly above - top_p| (top_p active). Support tests require this to
    be > 1e-4 so float32 vs float64 rounding cannot flip membership.
    """
    x = process_logits(row, **knobs)
    T = float(knobs.get("temperature", 1.0))
    if T < GREEDY_TEMPERATURE:
        return np.inf
    top_k = int(knobs.get("top_k", 0))
    top_p = float(knobs.get("top_p", 1.0))
    min_p = float(knobs.get("min_p", 0.0))
    v = x / T
    fin = np.isfinite(v)
    vmax = v[fin].max()
    dist = np.inf
    if min_p > 0:
        ratios = np.exp(v[fin] - vmax)
        dist = min(dist, float(np.min(np.abs(ratios - min_p))))
    if top_p < 1.0:
        keep = filter_mask(x, temperature=T, top_k=top_k, top_p=1.0, min_p=min_p)
        mass = _mass_strictly_above(v, keep)[keep]
        dist = min(dist, float(np.min(np.abs(mass - top_p))))
    return dist


# --------------------------------------------------------------------------- pooling


def _sequences(hidden, offsets, lengths, mask) -> list[np.ndarray]:
    """Per-sequence float64 [n_b, D] views of the valid tokens (padded positions unread)."""
    h = np.asarray(hidden)
    given = sum(a is not None for a in (offsets, lengths, mask))
    assert given == 1, "exactly one of offsets/lengths/mask"
    seqs = []
    if offsets is not None:
        off = np.asarray(offsets, dtype=np.int64)
        for b in range(off.size - 1):
            seqs.append(h[off[b]:off[b + 1]].astype(np.float64))
    elif lengths is not None:
        for b, n in enumerate(np.asarray(lengths, dtype=np.int64)):
            seqs.append(h[b, :n].astype(np.float64))
    else:
        m = np.asarray(mask).astype(bool)
        for b in range(m.shape[0]):
            seqs.append(h[b][m[b]].astype(np.float64))
    return seqs


def _l2(x: np.ndarray) -> np.ndarray:
    return x / max(float(np.linalg.norm(x)), NORM_EPS)


def pool(
    hidden,
    *,
    offsets=None,
    lengths=None,
    mask=None,
    mode: str = "mean",
    normalize: bool = False,
    dimensions: int | None = None,
) -> np.ndarray:
    """Reference pooling, float64 [B, D'] (D' = dimensions or D).

    Empty sequence -> zero vector for every mode. normalize: x / max(||x||, 1e-12).
    dimensions: truncate to the first d components, then L2-normalise (always).
    """
    h = np.asarray(hidden)
    D = h.shape[-1]
    seqs = _sequences(hidden, offsets, lengths, mask)
    out_d = D if dimensions is None else int(dimensions)
    out = np.zeros((len(seqs), out_d))
    for b, s in enumerate(seqs):
        if s.shape[0] == 0:
            x = np.zeros(D)
        elif mode == "mean":
            x = s.mean(axis=0)
        elif mode == "sum":
            x = s.sum(axis=0)
        elif mode == "max":
            x = s.max(axis=0)
        elif mode == "cls":
            x = s[0].copy()
        elif mode == "last":
            x = s[-1].copy()
        else:
            raise ValueError(mode)
        if normalize:
            x = _l2(x)
        if dimensions is not None:
            x = _l2(x[:out_d])
        out[b] = x
    return out
