"""Extreme but valid floats and huge integers: each knob is checked in float32 (the kernel's
precision), the kernel never indexes an empty candidate set, and edits saturate instead of
overflowing. See docs/SAMPLING.md for the policy these tests pin down.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tep._kernels import sampling as _k
from tep.kernels import SampleResult, sample

try:  # tests/ may or may not become a package
    from . import kernel_fuzz
    from .kernel_checks import assert_raises_naming
except ImportError:  # pragma: no cover
    import kernel_fuzz
    from kernel_checks import assert_raises_naming

F32_TINY = float(np.finfo(np.float32).tiny)
F32_MAX = float(np.finfo(np.float32).max)
# top_p values that are positive in float64 but 0 or denormal in float32
TINY_TOP_P = [5e-324, 1e-300, 1e-46, 1e-45, 1e-40]


def _row(seed=4, V=257):
    return (np.random.default_rng(seed).standard_normal(V) * 3).astype(np.float32)


def test_reported_crash_top_p_zero_in_float32_with_top_k_and_logprobs():
    """The report, verbatim, in a child process: it died with SIGBUS before the fix."""
    code = ("import numpy as np; from tep.kernels import sample; "
            "x=(np.random.default_rng(4).standard_normal(257)*3).astype(np.float32); "
            "r=sample(x, top_k=5, top_p=1e-300, seed=0, logprobs=5); "
            "print(r.token_ids, int(np.argmax(x)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"rc={r.returncode} {r.stderr[-2000:]}"
    tok, best = map(int, r.stdout.split())
    assert tok == best


@pytest.mark.parametrize("top_p", TINY_TOP_P)
@pytest.mark.parametrize("filters", [dict(top_k=5), dict(min_p=0.1), dict(top_k=3, min_p=0.01),
                                     dict()])
def test_top_p_below_float32_normal_keeps_the_top_token(top_p, filters):
    """Before the fix, top_k/min_p with such a top_p returned ids outside [0, V)."""
    x = _row()
    best = int(np.argmax(x))
    for seed in range(20):
        assert sample(x, top_p=top_p, seed=seed, **filters) == best
        assert sample(x[None], top_p=[top_p], seed=seed, **filters)[0] == best


@pytest.mark.parametrize("top_p", TINY_TOP_P)
def test_top_p_below_float32_normal_respects_allowed_ids(top_p):
    x = _row()
    allowed = [3, 9, 200]
    best = allowed[int(np.argmax(x[allowed]))]
    for seed in range(20):
        assert sample(x, top_p=top_p, top_k=5, seed=seed, allowed_token_ids=allowed) == best


def test_tiny_top_p_draws_among_ties_like_the_smallest_normal():
    """A top_p that is 0 in float32 is raised to the smallest normal float32: it keeps the
    top token and its exact ties, and draws the same token as that value does."""
    x = np.zeros(64, np.float32)
    x[[5, 17, 40]] = 2.0
    seen = set()
    for seed in range(200):
        a = sample(x, top_p=1e-300, top_k=10, seed=seed)
        assert a == sample(x, top_p=F32_TINY, top_k=10, seed=seed)
        seen.add(a)
    assert seen == {5, 17, 40}


def test_kernel_entry_with_top_p_zero_falls_back_to_the_argmax():
    """The compiled entry trusts its arguments; top_p = 0 there must still give a kept
    token (the kernel clamps top_p and never indexes an empty candidate set)."""
    for seed in range(50):
        x = _row(seed, 257)
        best = int(np.argmax(x))
        for k in (0, 1, 5, 300):
            assert _k.sample_one(x, 1.0, k, 0.0, 0.0, seed, 0) == best
            assert _k.sample_one(x, 1.0, k, float("nan"), 0.1, seed, 0) in range(257)
        assert _k.sample_one(x, 1.0, 5, 0.5, float("nan"), seed, 0) in range(257)
        assert _k.sample_one(x, float("nan"), 5, 0.5, 0.1, seed, 0) in range(257)


@pytest.mark.parametrize("value", [5e-324, 1e-300, 1e-40, 1e-45, 1e39, 1e300])
def test_repetition_penalty_outside_normal_float32_is_a_value_error(value):
    """1e-300 used to reach the kernel as 0 and fail as 'row holds +inf'."""
    x = _row()
    for kw in (dict(repetition_penalty=value), dict(repetition_penalty=[value])):
        xx = x if isinstance(kw["repetition_penalty"], float) else x[None]
        err = assert_raises_naming(lambda: sample(xx, prompt_token_ids=[1, 2] if xx.ndim == 1
                                                  else [[1, 2]], **kw),
                                   "repetition_penalty", ValueError)
        assert "float32" in str(err)


def test_repetition_penalty_smallest_normal_float32_is_accepted():
    x = _row()
    x[7] = 1.0
    # 1.0 / 1.18e-38 saturates at FLT_MAX: token 7 wins and nothing overflows
    assert sample(x, repetition_penalty=F32_TINY, prompt_token_ids=[7], temperature=0) == 7


@pytest.mark.parametrize("name,value", [("temperature", 1e39), ("temperature", 3.5e38),
                                        ("presence_penalty", 1e39),
                                        ("frequency_penalty", -1e300)])
def test_float_knobs_overflowing_float32_are_value_errors(name, value):
    """temperature 1e39 was accepted and became inf in the kernel."""
    x = _row()
    for v, xx in ((value, x), ([value, 1.0 if name == "temperature" else 0.0],
                               np.stack([x, x]))):
        err = assert_raises_naming(lambda: sample(xx, output_token_ids=[3] if xx.ndim == 1
                                                  else [[3], [3]], **{name: v}),
                                   name, ValueError)
        assert "float32" in str(err)


def test_greedy_threshold_is_compared_in_float32():
    x = _row(9, 5000)
    t32 = float(np.float32(1e-5))
    below = float(np.nextafter(np.float32(t32), np.float32(0)))
    best = int(np.argmax(x))
    # below the float32 threshold: greedy on both entry points
    assert {sample(x, temperature=below, seed=s) for s in range(5)} == {best}
    assert {int(sample(x, temperature=below, seed=s, logprobs=0).token_ids)
            for s in range(5)} == {best}
    # the float32 threshold itself samples (T = 1e-5 on logits ~ N(0, 9): still the argmax
    # almost surely, so compare both entry points draw for draw instead)
    for s in range(5):
        assert sample(x, temperature=t32, seed=s) == \
            sample(x, temperature=t32, seed=s, logprobs=0).token_ids


@pytest.mark.parametrize("k", [2**62, 2**62 + 1, 2**63 - 1, 2**63, 2**64, 2**100,
                               np.uint64(2**64 - 1), np.int64(2**62)])
def test_huge_top_k_is_off(k):
    """top_k >= V is off however large; 2**62 used to be refused with a wrong message."""
    x = _row(2, 3000)
    for seed in range(5):
        want = sample(x, seed=seed)
        assert sample(x, top_k=k, seed=seed) == want
        assert sample(x, top_k=k, seed=seed, logprobs=0).token_ids == want
    rows = np.stack([x, x])
    want = sample(rows, seed=3)
    for ks in ([k, k], np.array([2**64 - 1, 2**63], np.uint64), [2**70, 0],
               np.array([2**70, 2**63], dtype=object)):
        np.testing.assert_array_equal(sample(rows, top_k=ks, seed=3), want)


@pytest.mark.parametrize("n", [2**31, 2**31 + 5, 2**40, 2**70])
def test_n_threads_beyond_int_is_a_value_error(n):
    """2**31 raised OverflowError from the compiled signature."""
    x = np.stack([_row(), _row(5)])
    for kw in (dict(), dict(logprobs=1), dict(top_k=3)):
        assert_raises_naming(lambda: sample(x, n_threads=n, **kw), "n_threads", ValueError)
        assert_raises_naming(lambda: sample(x[0], n_threads=n, **kw), "n_threads", ValueError)


def test_more_threads_than_rows_is_fine():
    x = np.stack([_row(), _row(5)])
    want = sample(x, seed=1, top_p=0.9, n_threads=1)
    np.testing.assert_array_equal(sample(x, seed=1, top_p=0.9, n_threads=100000), want)


def test_penalties_saturate_instead_of_overflowing():
    x = _row()
    x[3] = 1e10
    # 1e10 / 1e-30 overflows float32: saturates at FLT_MAX, token 3 stays the argmax
    assert sample(x, repetition_penalty=1e-30, prompt_token_ids=[3], temperature=0) == 3
    # -3e38 * count 2 = -inf (a +inf logit before): saturates at FLT_MAX
    assert sample(x, frequency_penalty=-3e38, output_token_ids=[5, 5], temperature=0) == 5
    # a penalty never masks: every token pushed to -3e38 - 3e38 stays finite (-FLT_MAX)
    y = np.full(4, -3e38, np.float32)
    tok = sample(y, presence_penalty=3e38, output_token_ids=[0, 1, 2, 3], seed=2)
    assert 0 <= tok < 4


def test_edits_never_revive_or_hide_non_finite_logits():
    x = np.array([np.nan, -np.inf, 1.0, np.inf], np.float32)
    # +inf stays +inf under a -100 bias: still the row error it was
    with pytest.raises(ValueError, match=r"\+inf"):
        sample(x, logit_bias={3: -100.0}, seed=0)
    # masking the +inf token away leaves token 2, whatever bias the NaN/-inf tokens get
    for seed in range(10):
        assert sample(x, allowed_token_ids=[0, 1, 2], logit_bias={0: 100.0, 1: 100.0},
                      seed=seed) == 2


def test_extreme_float_fuzz_in_process():
    """Every knob subset with edge values (tests/kernel_fuzz.py); the same fuzz runs under
    AddressSanitizer in test_kernel_asan.py."""
    assert kernel_fuzz.run(800, seed=1) == 800


def test_logprobs_of_a_token_stay_raw_under_extreme_edits():
    x = _row()
    r = sample(x, logit_bias={0: 100.0}, repetition_penalty=F32_TINY, prompt_token_ids=[1],
               logprobs=3, seed=0)
    assert isinstance(r, SampleResult)
    ref = x.astype(np.float64) - np.log(np.exp(x.astype(np.float64)).sum())
    np.testing.assert_allclose(r.logprobs, ref[r.token_ids], rtol=1e-5, atol=1e-5)
