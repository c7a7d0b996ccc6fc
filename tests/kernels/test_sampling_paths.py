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
    """A row whose strided top-p sample (every (V // 8192)-th token) is unrepresentative.

    "up": the sampled tokens sit lower than the rest, so the sample puts the threshold too
    low and the kernel must move its bracket up; "down": the opposite."""
    rng = np.random.default_rng({"up": 5, "down": 6}[direction])
    row = rng.standard_normal(V).astype(np.float32)
    sampled = np.zeros(V, bool)
    sampled[:: V // 8192] = True
    row[sampled if direction == "down" else ~sampled] += 1.5
    return row


@pytest.mark.parametrize("direction", ["up", "down"])
def test_top_p_bracket_recovers_when_the_sample_misjudges(direction):
    row = _skewed_row(direction)
    p = _probs(row, 1.0, 0.9)
    n = 40_000
    toks = np.array([sample(row, top_p=0.9, seed=29, step=i) for i in range(n)])
    assert _chi2(toks, p) > 1e-3
