"""Interleaved median timing for the benchmark scripts.

Every case runs once per repeat, in turn, so drift in machine load (this box has 2 shared
cores) hits all cases of a group alike; ratios inside one group are what the reports quote.
Cheap calls are looped ``n_inner`` times per sample (calibrated so one sample lasts about
``sample_s``) because a lone microsecond call is below the noise of ``perf_counter``.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

__all__ = ["interleaved", "calibrate"]


def calibrate(fn: Callable[[], object], sample_s: float, max_inner: int = 10_000) -> int:
    """How many back-to-back calls of ``fn`` make one sample of about ``sample_s`` seconds."""
    fn()  # warm-up: page faults, lazy imports, caches
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    if one <= 0:
        return max_inner
    return max(1, min(max_inner, math.ceil(sample_s / one)))


def interleaved(cases: dict[str, Callable[[], object]], *, min_repeats: int = 5,
                max_repeats: int = 31, budget_s: float = 5.0,
                sample_s: float = 0.003) -> dict[str, dict[str, float]]:
    """Median seconds per call of each case, cases interleaved within every repeat.

    Runs at least ``min_repeats`` and at most ``max_repeats`` repeats, stopping after
    ``budget_s`` seconds of wall time once ``min_repeats`` are done.

    Returns ``{name: {"median_s", "min_s", "max_s", "repeats", "n_inner"}}`` (seconds per
    single call).
    """
    inner = {k: calibrate(fn, sample_s) for k, fn in cases.items()}
    samples: dict[str, list[float]] = {k: [] for k in cases}
    start = time.perf_counter()
    for rep in range(max_repeats):
        for name, fn in cases.items():
            n = inner[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
        if rep + 1 >= min_repeats and time.perf_counter() - start > budget_s:
            break
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v),
                "repeats": len(v), "n_inner": inner[k]} for k, v in samples.items()}
