"""Assertions shared by the kernel test modules."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare


def assert_raises_naming(fn, names, exc=(ValueError, TypeError)):
    """``fn()`` raises ``exc`` and the message names one of ``names`` (the bad argument)."""
    if isinstance(names, str):
        names = (names,)
    with pytest.raises(exc) as ei:
        fn()
    msg = str(ei.value)
    assert any(n in msg for n in names), f"message {msg!r} names none of {names}"
    return ei.value


def merged_chisquare(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square p-value of ``counts`` against ``probs``, merging expected < 5 bins.

    Bins are sorted by expected count and merged from the smallest up until each has >= 5;
    a small remainder goes into the last (largest) bin. Zero-probability tokens are excluded
    here (callers assert they were never drawn).
    """
    n = counts.sum()
    nz = probs > 0
    e = probs[nz] * n
    o = counts[nz].astype(np.float64)
    order = np.argsort(e, kind="stable")
    e, o = e[order], o[order]
    be, bo = [], []
    acc_e = acc_o = 0.0
    for ei, oi in zip(e, o):
        acc_e += ei
        acc_o += oi
        if acc_e >= 5:
            be.append(acc_e)
            bo.append(acc_o)
            acc_e = acc_o = 0.0
    if acc_e > 0 or acc_o > 0:
        if be:
            be[-1] += acc_e
            bo[-1] += acc_o
        else:
            be.append(acc_e)
            bo.append(acc_o)
    if len(be) < 2:
        return 1.0
    return float(chisquare(np.array(bo), np.array(be)).pvalue)
