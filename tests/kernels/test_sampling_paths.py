"""Chi-square checks aimed at the kernel's internal paths on multi-block rows.

The whole-row draw is rejection sampling from the block-max envelope with an exact
fallback after 256 rejections, and top_p alone brackets its threshold from a sample. These
rows are built so each path (and the fallback) is taken many times; the reference is the
plain float64 softmax over the kept tokens.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from tep._kernels import sampling as _k
from tep.kernels import sample

N = 100_000


def _probs(row: np.ndarray, T: float, top_p: float = 1.0) -> np.ndarray:
    x = row.astype(np.float64)
    x[np.isnan(x)] = -np.inf
    z = (x - x.max()) / T
    p = np.exp(z)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-x, kind="stable")
        above = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
        keep = np.zeros(x.size, bool)
        keep[order[above < top_p]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


def _chi2(tokens: np.ndarray, p: np.ndarray) -> float:
    counts = np.bincount(tokens, minlength=p.size)
    assert counts[p == 0].sum() == 0, "drew a token of probability 0"
    e, o = p[p > 0] * tokens.size, counts[p > 0]
    order = np.argsort(e)
    e, o = e[order], o[order]
    # merge the rarest tokens until each bin expects >= 5
    ce, co = np.cumsum(e), np.cumsum(o)
    cuts = np.searchsorted(ce, np.arange(5.0, ce[-1], 5.0))
    cuts = np.unique(np.concatenate([cuts, [e.size - 1]]))
    be, bo = np.diff(np.concatenate([[0.0], ce[cuts]])), np.diff(np.concatenate([[0], co[cuts]]))
    return float(chisquare(bo, be * bo.sum() / be.sum()).pvalue)


def _row(kind: str, V: int = 640) -> np.ndarray:
    rng = np.random.default_rng({"outliers": 1, "normal": 2, "masked": 3}[kind])
    if kind == "outliers":
        # one outlier per 64-token block: the envelope accepts about 1 trial in 64,
        # so a few percent of draws exhaust the 256 trials and take the exact fallback
        row = np.full(V, -6.0, np.float32)
        row[::64] = 4.0 + rng.standard_normal(V // 64).astype(np.float32)
        row[5::64] = -1.0
        return row
    row = (rng.standard_normal(V) * 1.5).astype(np.float32)
    if kind == "masked":
        row[rng.choice(V, V // 4, replace=False)] = -np.inf
        row[rng.choice(V, 10, replace=False)] = np.nan
    return row


@pytest.mark.parametrize("kind", ["outliers", "normal", "masked"])
@pytest.mark.parametrize("T", [1.0, 0.6])
def test_full_vocabulary_draw_matches_softmax(kind, T):
    row = _row(kind)
    toks = sample(np.tile(row, (N, 1)), temperature=T, seed=17, step=np.arange(N))
    assert _chi2(toks, _probs(row, T)) > 1e-3


@pytest.mark.parametrize("kind", ["outliers", "normal", "masked"])
@pytest.mark.parametrize("top_p", [0.5, 0.9])
def test_top_p_alone_matches_reference(kind, top_p):
    row = _row(kind, V=4096)
    p = _probs(row, 1.0, top_p)
    toks = sample(np.tile(row, (N, 1)), top_p=top_p, seed=23, step=np.arange(N))
    assert _chi2(toks, p) > 1e-3


def _skewed_row(direction: str, V: int = 32768) -> np.ndarray:
    """A row whose strided top-p sample (every (V // TOP_P_SAMPLE_SIZE)-th token) is
    unrepresentative.

    "up": the sampled tokens sit lower than the rest, so the sample puts the threshold too
    low and the kernel must move its bracket up; "down": the opposite."""
    rng = np.random.default_rng({"up": 5, "down": 6}[direction])
    row = rng.standard_normal(V).astype(np.float32)
    sampled = np.zeros(V, bool)
    sampled[:: V // _k.TOP_P_SAMPLE_SIZE] = True
    row[sampled if direction == "down" else ~sampled] += 1.5
    return row


@pytest.mark.parametrize("direction", ["up", "down"])
def test_top_p_bracket_recovers_when_the_sample_misjudges(direction):
    row = _skewed_row(direction)
    p = _probs(row, 1.0, 0.9)
    n = 40_000
    toks = np.array([sample(row, top_p=0.9, seed=29, step=i) for i in range(n)])
    assert _chi2(toks, p) > 1e-3


def _peaked_row(p_top: float, V: int = 4096, seed: int = 7) -> np.ndarray:
    """A multi-block row whose argmax holds probability ``p_top`` at T = 1 (the rest
    spread over every block)."""
    rng = np.random.default_rng(seed)
    rest = rng.standard_normal(V).astype(np.float64)
    rest[1234] = -np.inf
    w = np.exp(rest)
    x = np.log(w / w.sum() * (1.0 - p_top))
    x[1234] = np.log(p_top)
    return x.astype(np.float32)


@pytest.mark.parametrize("p_top,top_p", [(0.97, 0.95), (0.9501, 0.95), (0.6, 0.55),
                                         (0.999, 0.9)])
def test_top_token_alone_holding_top_p_is_always_drawn(p_top, top_p):
    """A row whose top token alone holds top_p of the mass keeps only that token (the
    kernel's shortcut for peaked rows), on both one-row entries and the batch path."""
    row = _peaked_row(p_top)
    assert _probs(row, 1.0, top_p)[1234] == 1.0            # the reference agrees
    for step in range(300):
        assert sample(row, top_p=top_p, seed=3, step=step) == 1234
        assert _k.sample_one(row, 1.0, 0, top_p, 0.0, 3, step, None) == 1234
    toks = sample(np.tile(row, (300, 1)), top_p=top_p, seed=3, step=np.arange(300),
                  logit_bias=[{7: 0.0}] * 300)
    assert (toks == 1234).all()


@pytest.mark.parametrize("p_top,top_p", [(0.94, 0.95), (0.45, 0.5), (0.3, 0.9)])
def test_top_token_short_of_top_p_still_samples_the_kept_set(p_top, top_p):
    """Just below (and at p <= 1/2, where ties could exist) the shortcut must not fire:
    the draw follows the reference over the whole kept set."""
    row = _peaked_row(p_top)
    p = _probs(row, 1.0, top_p)
    assert (p > 0).sum() > 1
    n = 20_000
    toks = sample(np.tile(row, (n, 1)), top_p=top_p, seed=31, step=np.arange(n))
    assert _chi2(toks, p) > 1e-3


def test_one_row_entry_with_logit_bias_equals_the_batch_path():
    """The one-row entry's bias (the engine's lean path) is the batch path's bias:
    same tokens for the same (seed, step), ids outside [0, V) skipped, values clamped."""
    rng = np.random.default_rng(11)
    V = 3000
    for case in range(60):
        row = (rng.standard_normal(V) * rng.uniform(0.5, 4)).astype(np.float32)
        ids = rng.choice(V, 5, replace=False).astype(np.int32)
        vals = rng.uniform(-150, 150, 5).astype(np.float32)
        T = float(rng.choice([0.0, 0.7, 1.0, 1.5]))
        top_p = float(rng.choice([1.0, 0.9, 0.5]))
        top_k = int(rng.choice([0, 5, 50]))
        bias = {int(i): float(v) for i, v in zip(ids, vals)}
        for step in range(5):
            want = sample(row, temperature=T, top_p=top_p, top_k=top_k, seed=case,
                          step=step, logit_bias=bias)
            got = _k.sample_one(row, T, top_k, top_p, 0.0, case, step, None, ids, vals)
            assert got == want, (case, step)
    # the kernel never reads outside the row for an id it is handed unchecked
    row = rng.standard_normal(V).astype(np.float32)
    ids = np.array([-5, V, V + 100, 3], np.int32)
    vals = np.array([100, 100, 100, 100], np.float32)
    assert _k.sample_one(row, 0.0, 0, 1.0, 0.0, 1, 0, None, ids, vals) == 3
