"""tep.kernels.sample / log_softmax against the plain-numpy reference (tests/support/reference.py).

Exact tests (greedy, processed logits, support sets, tie policies, raw logprobs), the
statistical chi-square tests, reproducibility and bad input. Everything uses fixed seeds so
results are deterministic; the seeds were not chosen to make anything pass.
"""
from __future__ import annotations

import numpy as np
import pytest

from tep.kernels import SampleResult, log_softmax, sample

from support import reference as ref
from support.kernel_checks import assert_raises_naming, merged_chisquare

ID_ARGS = ("prompt_token_ids", "output_token_ids", "allowed_token_ids")
ROW_ARGS = ID_ARGS + ("logit_bias",)


# --------------------------------------------------------------------------- helpers


def batch_knobs(knobs: dict, n: int) -> dict:
    """Scalar single-row knobs -> the [B, V] form: histories/bias become lists of n entries."""
    out = {}
    for k, v in knobs.items():
        out[k] = [v] * n if k in ROW_ARGS and v is not None else v
    return out


def draw(row, n: int, seed: int, *, broadcast: bool = False, **knobs) -> np.ndarray:
    """n draws of one row in ONE batched call, step = 0..n-1, fixed seed."""
    row = np.asarray(row, dtype=np.float32)
    logits = np.broadcast_to(row, (n, row.size)) if broadcast else np.tile(row, (n, 1))
    toks = sample(logits, seed=seed, step=np.arange(n), **batch_knobs(knobs, n))
    toks = np.asarray(toks)
    assert toks.shape == (n,)
    assert toks.dtype == np.int64
    return toks


def make_row(rng: np.random.Generator, V: int, scale: float = 1.0, margin: float = 1e-3,
             **knobs) -> np.ndarray:
    """Random float32 logits whose min_p / top_p thresholds are not on a float knife edge
    (see reference.knife_edge_distance). Redraws until that holds (deterministic per rng)."""
    for _ in range(1000):
        row = (rng.standard_normal(V) * scale).astype(np.float32)
        if ref.knife_edge_distance(row, **knobs) > margin:
            return row
    raise AssertionError("could not build a row away from the knife edge")


def check_support(row, knobs, n=20000, seed=1234, min_seen_p=1e-3):
    """Every draw is in the reference support, and every support token with p > min_seen_p
    was drawn at least once (expected count >= 20, miss chance < e^-20)."""
    p = ref.distribution(row, **knobs)
    toks = draw(row, n, seed, **knobs)
    drawn = set(np.unique(toks).tolist())
    sup = set(np.flatnonzero(p > 0).tolist())
    outside = drawn - sup
    assert not outside, f"drew tokens outside the reference support: {sorted(outside)[:20]}"
    must = set(np.flatnonzero(p > min_seen_p).tolist())
    missing = must - drawn
    assert not missing, f"support tokens never drawn: {sorted(missing)[:20]}"
    return toks


# --------------------------------------------------------------------------- reference self-check


def test_reference_top_p_matches_bruteforce():
    rng = np.random.default_rng(0)
    for _ in range(50):
        v = np.round(rng.standard_normal(30), 1)  # many ties
        keep = rng.random(30) < 0.8
        keep[np.argmax(v)] = True
        p = np.where(keep, np.exp(v - v[keep].max()), 0.0)
        p /= p.sum()
        fast = ref._mass_strictly_above(v, keep)
        for i in range(30):
            if keep[i]:
                assert fast[i] == pytest.approx(p[keep & (v > v[i])].sum(), abs=1e-12)


# --------------------------------------------------------------------------- greedy


def test_greedy_is_argmax_lowest_index_on_ties():
    rng = np.random.default_rng(1)
    logits = rng.integers(-3, 4, size=(64, 50)).astype(np.float32)  # lots of ties at the max
    for T in (0.0, 1e-6, 9.9e-6):
        toks = sample(logits, temperature=T, seed=0, step=np.arange(64))
        expected = [int(np.flatnonzero(r == r.max())[0]) for r in logits]
        np.testing.assert_array_equal(toks, expected)


def test_greedy_ignores_filters_and_step():
    row = np.array([0.1, 2.0, 2.0, -1.0, 1.9], dtype=np.float32)
    for step in range(20):
        t = sample(row, temperature=0.0, top_k=1, top_p=1e-6, min_p=1.0, seed=step, step=step)
        assert t == 1


def test_greedy_threshold_is_1e_5():
    # Two tokens tied at the max: greedy always picks index 0; at T = 1e-5 (not greedy)
    # the tie is sampled, so both appear.
    row = np.array([5.0, 5.0, -3.0], dtype=np.float32)
    g = draw(row, 2000, 7, temperature=9.99e-6)
    assert set(g.tolist()) == {0}
    s = draw(row, 2000, 7, temperature=1e-5)
    assert set(s.tolist()) == {0, 1}


def test_greedy_nan_is_minus_inf():
    row = np.array([np.nan, 1.0, np.nan, 3.0, -np.inf, np.nan], dtype=np.float32)
    assert sample(row, temperature=0.0) == 3
    row2 = np.array([np.nan, -5.0, np.nan], dtype=np.float32)
    assert sample(row2, temperature=0.0) == 1


def test_return_types_1d_and_2d():
    row = np.zeros(10, dtype=np.float32)
    t = sample(row, seed=0)
    assert type(t) is int  # contract: ``int`` for [V] input
    tb = sample(np.zeros((3, 10), dtype=np.float32), seed=0)
    assert isinstance(tb, np.ndarray) and tb.dtype == np.int64 and tb.shape == (3,)
    r = sample(row, seed=0, logprobs=2)
    assert isinstance(r, SampleResult)
    assert type(r.token_ids) is int
    assert isinstance(r.logprobs, float)
    rb = sample(np.zeros((3, 10), dtype=np.float32), seed=0, logprobs=2)
    assert rb.token_ids.shape == (3,) and rb.token_ids.dtype == np.int64
    assert rb.logprobs.shape == (3,) and rb.logprobs.dtype == np.float32
    assert rb.ranks.shape == (3,) and rb.ranks.dtype == np.int64
    assert rb.top_token_ids.shape == (3, 2) and rb.top_token_ids.dtype == np.int64
    assert rb.top_logprobs.shape == (3, 2) and rb.top_logprobs.dtype == np.float32


# --------------------------------------------------------------------------- processed logits


PROCESS_CASES = {
    "bias": dict(logit_bias={0: 1.5, 3: -2.25, 5: 500.0, 6: -1e9, 7: 100.0, 8: -0.0}),
    "repetition_pos_neg": dict(repetition_penalty=1.7, prompt_token_ids=[0, 1, 2, 2, 2],
                               output_token_ids=[3, 4, 4, 1]),
    "repetition_below_1": dict(repetition_penalty=0.6, prompt_token_ids=[0, 2, 5],
                               output_token_ids=[1, 7]),
    "freq_presence": dict(frequency_penalty=0.35, presence_penalty=0.8,
                          prompt_token_ids=[0, 1, 2],  # prompt tokens: no freq/presence
                          output_token_ids=[3, 3, 3, 4, 5, 5, 9]),
    "negative_freq_presence": dict(frequency_penalty=-0.5, presence_penalty=-1.25,
                                   output_token_ids=[2, 2, 6]),
    "bias_then_repetition": dict(logit_bias={1: 5.0, 2: -3.0, 4: 2.0}, repetition_penalty=2.0,
                                 prompt_token_ids=[1, 2, 4]),
    "everything": dict(logit_bias={0: 3.0, 3: -1.0, 8: 7.5}, repetition_penalty=1.3,
                       frequency_penalty=0.2, presence_penalty=0.4,
                       prompt_token_ids=[0, 1, 2, 8], output_token_ids=[2, 3, 3, 8, 8, 8],
                       allowed_token_ids=[0, 1, 2, 3, 4, 8, 9, 10]),
    "allowed_mask_beats_bias": dict(allowed_token_ids=[1, 4, 10], logit_bias={0: 100.0, 4: 1.0}),
}


@pytest.mark.parametrize("case", sorted(PROCESS_CASES))
def test_processed_logits_equal_reference_via_greedy_probe(case):
    """Observe each processed logit x[t] through greedy: a row where only t and a probe
    token p (unaffected by any knob, p > t) are competitive picks t iff x[t] >= c (the probe
    value). Probing at c = ref - tol and ref + tol pins x[t] to within tol of the reference.
    """
    knobs = PROCESS_CASES[case]
    V = 11  # tokens 0..9 are targets; 10 is the probe (allowed, never in histories or bias)
    probe = V - 1
    raw = np.array([2.5, -1.5, 0.75, -0.3, 1.2, 3.1, -2.2, 0.0, -0.9, 1.8, 0.0], dtype=np.float32)
    proc = ref.process_logits(raw, **knobs)
    assert proc[probe] == raw[probe]
    rows, expect = [], []
    for t in range(V - 1):
        base = np.full(V, -1e4, dtype=np.float32)  # far below anything bias can reach
        base[t] = raw[t]
        if np.isfinite(proc[t]):
            tol = 1e-4 + 1e-5 * abs(proc[t])
            for c, want in ((proc[t] - tol, t), (proc[t] + tol, probe)):
                r = base.copy()
                r[probe] = c
                rows.append(r)
                expect.append(want)
        else:  # masked: the probe wins even far below
            r = base.copy()
            r[probe] = -1e3
            rows.append(r)
            expect.append(probe)
    logits = np.stack(rows)
    toks = sample(logits, temperature=0.0, seed=0, **batch_knobs(knobs, len(rows)))
    bad = [(i, int(a), b) for i, (a, b) in enumerate(zip(toks, expect)) if a != b]
    assert not bad, f"(row, got, want) mismatches; reference processed = {proc}: {bad}"


def test_processed_logits_per_row_knobs():
    """Per-row penalties/bias in one batch: greedy on each row matches the reference, and the
    cases are built so that the winner flips iff the row's knobs are applied."""
    raw = np.array([1.0, 0.9, -0.5, 0.2], dtype=np.float32)
    rows_knobs = [
        dict(),                                                   # 0 wins
        dict(repetition_penalty=1.5, prompt_token_ids=[0]),       # 1.0/1.5 < 0.9 -> 1
        dict(presence_penalty=0.5, output_token_ids=[0, 1]),      # 0.5, 0.4 -> 0
        dict(frequency_penalty=0.3, output_token_ids=[0, 0, 1]),  # 0.4, 0.6 -> 1
        dict(logit_bias={2: 1.6}),                                # 1.1 -> 2
        dict(logit_bias={3: 0.79}),                               # 0.99 -> 0
        dict(allowed_token_ids=[2, 3]),                           # 3
        dict(repetition_penalty=3.0, output_token_ids=[0, 1]),    # 0.333, 0.3 vs 0.2 -> 0
    ]
    B = len(rows_knobs)
    logits = np.tile(raw, (B, 1))
    kw = {}
    for name in ROW_ARGS:
        kw[name] = [k.get(name) for k in rows_knobs]
    for name, default in (("repetition_penalty", 1.0), ("presence_penalty", 0.0),
                          ("frequency_penalty", 0.0)):
        kw[name] = np.array([k.get(name, default) for k in rows_knobs])
    toks = sample(logits, temperature=0.0, **kw)
    expected = [ref.greedy(raw, **k) for k in rows_knobs]
    np.testing.assert_array_equal(toks, expected)
    assert expected == [0, 1, 0, 1, 2, 0, 3, 0]


# --------------------------------------------------------------------------- support sets

SUPPORT_KNOBS = [
    dict(top_k=1),
    dict(top_k=5),
    dict(top_k=17, temperature=0.6),
    dict(top_p=0.5),
    dict(top_p=0.9, temperature=1.4),
    dict(top_p=0.05),
    dict(min_p=0.1),
    dict(min_p=0.3, temperature=0.5),
    dict(min_p=0.02, top_k=12),
    dict(top_k=20, top_p=0.7),
    dict(min_p=0.05, top_p=0.8),
    dict(min_p=0.05, top_k=40, top_p=0.95, temperature=0.8),
    dict(top_k=8, top_p=0.6, repetition_penalty=1.5, logit_bias={3: 2.0, 4: -2.0},
         prompt_token_ids=[0, 1, 2, 3], output_token_ids=[5, 5, 6],
         frequency_penalty=0.3, presence_penalty=0.2),
    dict(top_p=0.75, allowed_token_ids=list(range(0, 100, 3))),
    # fewer survivors than k (masked tokens are not survivors), and k among the survivors
    dict(top_k=20, allowed_token_ids=list(range(0, 100, 10))),
    dict(top_k=4, allowed_token_ids=list(range(0, 100, 10))),
    dict(top_k=30, min_p=0.2),
]


@pytest.mark.parametrize("knobs", SUPPORT_KNOBS, ids=lambda k: ",".join(sorted(k)))
@pytest.mark.parametrize("row_seed", [0, 1])
def test_support_equals_reference(knobs, row_seed):
    rng = np.random.default_rng(100 + row_seed)
    row = make_row(rng, 100, scale=1.5, **knobs)
    check_support(row, knobs, n=20000, seed=99 + row_seed)


def test_support_large_vocab_fast_path():
    """Large V (the 'never sort the vocabulary' path): draws stay in the reference support."""
    rng = np.random.default_rng(5)
    V = 32000
    for knobs in (dict(top_k=40, top_p=0.95, min_p=0.05, temperature=0.8),
                  dict(top_p=0.3),
                  dict(top_k=1000, temperature=1.0),
                  dict(min_p=0.2)):
        row = make_row(rng, V, scale=3.0, **knobs)
        p = ref.distribution(row, **knobs)
        sup = set(np.flatnonzero(p > 0).tolist())
        drawn = set()
        for chunk in range(8):  # 8 x 250 rows keeps memory at ~32 MB
            steps = np.arange(chunk * 250, (chunk + 1) * 250)
            toks = sample(np.tile(row, (250, 1)), seed=3, step=steps, **knobs)
            drawn |= set(np.asarray(toks).tolist())
        assert drawn <= sup, sorted(drawn - sup)[:10]
        assert set(np.flatnonzero(p > 1e-2).tolist()) <= drawn


def test_large_vocab_heavy_ties_fast_path():
    """Large V with integer-valued logits (thousands of ties): the k-th value and the top_p
    boundary fall inside big tie groups. Draws stay in the reference support and the mass per
    tie group passes a chi-square test."""
    rng = np.random.default_rng(3)
    V = 32000
    row = np.floor(rng.standard_normal(V) * 2).astype(np.float32)
    for knobs in (dict(top_k=50), dict(top_p=0.3), dict(top_k=50, top_p=0.5), dict(min_p=0.3),
                  dict(top_k=1), dict(top_p=0.05, temperature=0.7), dict(top_k=2000, top_p=0.9)):
        assert ref.knife_edge_distance(row, **knobs) > 1e-3
        p = ref.distribution(row, **knobs)
        toks = np.concatenate([
            np.asarray(sample(np.tile(row, (500, 1)), seed=5,
                              step=np.arange(i * 500, (i + 1) * 500), **knobs))
            for i in range(4)])
        assert np.all(p[toks] > 0), knobs
        vals = np.unique(row[p > 0])
        counts = np.array([np.sum(row[toks] == v) for v in vals])
        probs = np.array([p[row == v].sum() for v in vals])
        assert merged_chisquare(counts, probs) > 1e-3, knobs


# ----------------------------------------------------------------------- tie policies


def test_top_k_keeps_all_ties_at_kth_value():
    row = np.array([3.0, 2.0, 2.0, 2.0, 1.0, 0.5], dtype=np.float32)
    for k, want in ((1, {0}), (2, {0, 1, 2, 3}), (3, {0, 1, 2, 3}), (4, {0, 1, 2, 3}),
                    (5, {0, 1, 2, 3, 4})):
        assert ref.support(row, top_k=k) == want
        toks = draw(row, 5000, 11, top_k=k)
        assert set(toks.tolist()) == want, k


def test_top_k_ties_at_the_max():
    row = np.array([1.0, 4.0, 0.0, 4.0, 4.0], dtype=np.float32)
    toks = draw(row, 3000, 12, top_k=1)
    assert set(toks.tolist()) == {1, 3, 4}


def test_top_p_boundary_ties_kept():
    # p0 > each tied p; mass strictly above the tied group = p0 < top_p, so all three tied
    # tokens are kept although p0 + p1 > top_p. Token 4 has mass above = p0 + 3 p1 > top_p.
    row = np.array([2.0, 1.0, 1.0, 1.0, 0.0], dtype=np.float32)
    p = np.exp(row - row.max())
    p /= p.sum()
    top_p = p[0] + 0.5 * p[1]
    assert ref.support(row, top_p=top_p) == {0, 1, 2, 3}
    toks = draw(row, 5000, 13, top_p=top_p)
    assert set(toks.tolist()) == {0, 1, 2, 3}


def test_top_p_tiny_keeps_all_most_likely_ties():
    row = np.array([0.0, 2.0, 2.0, 1.0], dtype=np.float32)
    toks = draw(row, 3000, 14, top_p=1e-9)
    assert set(toks.tolist()) == {1, 2}
    toks = draw(np.array([0.0, 2.0, 1.9], dtype=np.float32), 3000, 14, top_p=1e-9)
    assert set(toks.tolist()) == {1}


def test_top_p_renormalises_over_top_k_survivors():
    # p ~ [.4,.3,.1,.1,.1]; after top_k=2 the renormalised masses are [4/7, 3/7], so with
    # top_p=0.5 token 1 (mass above 0.571 >= 0.5) is dropped. Without renormalisation it'd stay.
    row = np.log(np.array([0.4, 0.3, 0.1, 0.1, 0.1])).astype(np.float32)
    assert ref.support(row, top_k=2, top_p=0.5) == {0}
    assert ref.support(row, top_p=0.5) == {0, 1}
    toks = draw(row, 3000, 15, top_k=2, top_p=0.5)
    assert set(toks.tolist()) == {0}
    toks = draw(row, 3000, 15, top_p=0.5)
    assert set(toks.tolist()) == {0, 1}


def test_top_p_renormalises_over_min_p_survivors():
    # min_p=0.3 keeps [.4, .3, .2] -> renormalised [4/9, 3/9, 2/9]; top_p=0.75: token 2 has
    # mass above 7/9=0.778 >= 0.75 -> dropped. Un-renormalised mass above = 0.7 < 0.75 -> kept.
    row = np.log(np.array([0.4, 0.3, 0.2, 0.05, 0.05])).astype(np.float32)
    assert ref.support(row, min_p=0.3, top_p=0.75) == {0, 1}
    toks = draw(row, 3000, 16, min_p=0.3, top_p=0.75)
    assert set(toks.tolist()) == {0, 1}


def test_min_p_one_keeps_only_max_ties():
    row = np.array([1.0, 3.0, 3.0, 2.999, -1.0], dtype=np.float32)
    toks = draw(row, 3000, 17, min_p=1.0)
    assert set(toks.tolist()) == {1, 2}


def test_min_p_zero_and_top_p_one_and_top_k_off_keep_everything():
    row = np.linspace(-2, 2, 12).astype(np.float32)
    for knobs in (dict(min_p=0.0), dict(top_p=1.0), dict(top_k=0), dict(top_k=-1),
                  dict(top_k=12), dict(top_k=1000)):
        check_support(row, knobs, n=20000, seed=18)


def test_temperature_applies_before_min_p():
    # min_p is on the tempered distribution: ratio exp(-1/T). T=1 -> 0.368 (< .5 dropped),
    # T=2 -> 0.607 (kept).
    row = np.array([1.0, 0.0, -5.0], dtype=np.float32)
    assert set(draw(row, 3000, 19, min_p=0.5, temperature=1.0).tolist()) == {0}
    assert set(draw(row, 3000, 19, min_p=0.5, temperature=2.0).tolist()) == {0, 1}


def test_huge_logits_do_not_overflow_under_temperature():
    # float32 logits / T can exceed float32 range; the result must still be the reference's.
    row = np.array([3e38, -3e38, 0.0], dtype=np.float32)
    assert set(draw(row, 500, 21, temperature=0.5).tolist()) == {0}
    row = np.array([1e38, 1e38, -1e38], dtype=np.float32)
    for knobs in (dict(temperature=0.01), dict(temperature=0.01, top_p=0.5),
                  dict(temperature=0.01, min_p=0.5, top_k=1)):
        assert ref.support(row, **knobs) == {0, 1}
        assert set(draw(row, 500, 21, **knobs).tolist()) == {0, 1}


def test_nan_and_minus_inf_never_drawn():
    row = np.array([np.nan, 0.0, -np.inf, 0.5, np.nan, -0.5, -np.inf], dtype=np.float32)
    toks = draw(row, 5000, 20)
    assert set(toks.tolist()) == {1, 3, 5}


# ----------------------------------------------------------------------- statistical tests

N_STAT = 100_000

STAT_CASES = {
    "plain_T1": (50, 1.0, dict()),
    "T0.7": (50, 1.0, dict(temperature=0.7)),
    "top_k": (60, 1.0, dict(top_k=15)),
    "top_p": (60, 1.2, dict(top_p=0.8)),
    "min_p": (60, 1.2, dict(min_p=0.1)),
    "chain": (200, 1.0, dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)),
    "penalties_bias": (40, 1.0, dict(repetition_penalty=1.3, presence_penalty=0.4,
                                     frequency_penalty=0.25,
                                     prompt_token_ids=[0, 1, 2, 3, 4, 5],
                                     output_token_ids=[4, 5, 5, 6, 7, 7, 7],
                                     logit_bias={8: 1.5, 9: -1.0, 11: -500.0})),
    "allowed": (80, 1.0, dict(allowed_token_ids=[1, 2, 3, 5, 8, 13, 21, 34, 55, 79])),
    "chain_penalties_allowed": (120, 1.0, dict(temperature=0.9, top_k=30, top_p=0.9, min_p=0.02,
                                               repetition_penalty=1.2, presence_penalty=0.3,
                                               prompt_token_ids=list(range(0, 120, 7)),
                                               output_token_ids=[1, 1, 2, 3],
                                               logit_bias={5: 2.0, 6: -3.0},
                                               allowed_token_ids=list(range(0, 120, 2)))),
}


@pytest.mark.parametrize("case", sorted(STAT_CASES))
def test_chi_square(case):
    V, scale, knobs = STAT_CASES[case]
    rng = np.random.default_rng(sorted(STAT_CASES).index(case))
    row = make_row(rng, V, scale=scale, **knobs)
    p = ref.distribution(row, **knobs)
    toks = draw(row, N_STAT, seed=2024, broadcast=(case == "T0.7"), **knobs)
    assert toks.min() >= 0 and toks.max() < V
    counts = np.bincount(toks, minlength=V)
    assert counts[p == 0].sum() == 0, f"drew zero-probability tokens {np.flatnonzero((p == 0) & (counts > 0))}"
    pval = merged_chisquare(counts, p)
    assert pval > 1e-3, f"chi-square p={pval:.3g}"


# ----------------------------------------------------------------------- raw logprobs


def _check_logprobs(logits, res, n):
    logits = np.atleast_2d(logits)
    toks = np.atleast_1d(res.token_ids)
    for b in range(logits.shape[0]):
        lp, rank, top_ids, top_lps = ref.raw_logprob_info(logits[b], int(toks[b]), n)
        np.testing.assert_allclose(np.atleast_1d(res.logprobs)[b], lp, rtol=1e-5, atol=1e-6)
        assert np.atleast_1d(res.ranks)[b] == rank
        np.testing.assert_array_equal(np.atleast_2d(res.top_token_ids)[b], top_ids)
        np.testing.assert_allclose(np.atleast_2d(res.top_logprobs)[b], top_lps, rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("n", [0, 1, 5, 20])
def test_raw_logprobs_rank_top_n(n):
    rng = np.random.default_rng(30 + n)
    logits = (rng.standard_normal((16, 300)) * 3).astype(np.float32)
    logits[2, ::7] = np.nan
    logits[3, 10:200] = -np.inf
    logits[4] = np.round(logits[4])  # ties everywhere: top-n ties by lower id, rank semantics
    res = sample(logits, seed=1, step=np.arange(16), logprobs=n)
    assert res.top_token_ids.shape == (16, n) and res.top_logprobs.shape == (16, n)
    _check_logprobs(logits, res, n)


def test_logprobs_are_raw_not_processed():
    rng = np.random.default_rng(40)
    logits = (rng.standard_normal((8, 64)) * 2).astype(np.float32)
    knobs = dict(temperature=0.5, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.4,
                 presence_penalty=0.5, frequency_penalty=0.5,
                 prompt_token_ids=[[1, 2, 3]] * 8, output_token_ids=[[4, 4, 5]] * 8,
                 logit_bias=[{6: 5.0, 7: -5.0}] * 8, allowed_token_ids=[list(range(40))] * 8)
    res = sample(logits, seed=2, step=np.arange(8), logprobs=5, **knobs)
    _check_logprobs(logits, res, 5)
    # greedy with logprobs too
    res = sample(logits, temperature=0.0, logprobs=3, logit_bias=[{63: 100.0}] * 8)
    np.testing.assert_array_equal(res.token_ids, np.full(8, 63))
    _check_logprobs(logits, res, 3)


def test_logprobs_1d():
    row = np.array([0.5, 2.0, 2.0, -1.0, np.nan], dtype=np.float32)
    res = sample(row, seed=3, logprobs=4)
    lp, rank, top_ids, top_lps = ref.raw_logprob_info(row, res.token_ids, 4)
    assert res.logprobs == pytest.approx(lp, rel=1e-5)
    assert res.ranks == rank
    np.testing.assert_array_equal(res.top_token_ids, top_ids)
    np.testing.assert_allclose(res.top_logprobs, top_lps, rtol=1e-5)
    assert list(top_ids) == [1, 2, 0, 3]


def test_logprobs_do_not_change_the_draw():
    rng = np.random.default_rng(41)
    logits = rng.standard_normal((32, 100)).astype(np.float32)
    a = sample(logits, seed=9, step=np.arange(32), top_p=0.9)
    b = sample(logits, seed=9, step=np.arange(32), top_p=0.9, logprobs=7).token_ids
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(37,), (5, 37), (3, 1), (1, 1000)])
def test_log_softmax_matches_reference(shape):
    rng = np.random.default_rng(50)
    x = (rng.standard_normal(shape) * 5).astype(np.float32)
    if x.size > 3:
        x.flat[1] = np.nan
        x.flat[2] = -np.inf
    out = log_softmax(x)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, ref.log_softmax(x), rtol=1e-5, atol=1e-6)


def test_log_softmax_readonly_noncontiguous():
    rng = np.random.default_rng(51)
    big = rng.standard_normal((6, 40)).astype(np.float32)
    x = big[::2, ::3]
    x.flags.writeable = False
    np.testing.assert_allclose(log_softmax(x), ref.log_softmax(x), rtol=1e-5, atol=1e-6)
    out = log_softmax(np.zeros((0, 7), dtype=np.float32))
    assert out.shape == (0, 7)


# ----------------------------------------------------------------------- reproducibility


def test_row_alone_equals_row_in_batch_any_position_any_threads():
    rng = np.random.default_rng(60)
    B, V = 64, 8192  # large enough that n_threads=None may go parallel
    logits = (rng.standard_normal((B, V)) * 2).astype(np.float32)
    seeds = rng.integers(0, 2**63, size=B, dtype=np.uint64)
    steps = rng.integers(0, 10_000, size=B)
    knobs = dict(temperature=0.9, top_k=50, top_p=0.9, min_p=0.01)
    batch = {nt: np.asarray(sample(logits, seed=seeds, step=steps, n_threads=nt, **knobs))
             for nt in (None, 1, 2)}
    np.testing.assert_array_equal(batch[None], batch[1])
    np.testing.assert_array_equal(batch[1], batch[2])
    for b in (0, 17, 63):
        alone = sample(logits[b], seed=int(seeds[b]), step=int(steps[b]), **knobs)
        assert alone == batch[1][b]
    # the same row moved to another position (rolled batch)
    rolled = np.roll(logits, 5, axis=0)
    out = sample(rolled, seed=np.roll(seeds, 5), step=np.roll(steps, 5), n_threads=2, **knobs)
    np.testing.assert_array_equal(np.roll(out, -5), batch[1])


def test_same_seed_step_same_token_in_every_row():
    """The draw is keyed only on (seed, step): identical rows give identical tokens."""
    row = np.zeros(1000, dtype=np.float32)
    toks = sample(np.tile(row, (64, 1)), seed=5, step=3)
    assert len(set(np.asarray(toks).tolist())) == 1
    assert sample(row, seed=5, step=3) == toks[0]


def test_different_seeds_different_streams():
    row = np.zeros(1000, dtype=np.float32)
    a = draw(row, 1000, seed=1)
    b = draw(row, 1000, seed=2)
    assert np.mean(a != b) > 0.9
    # per-row seeds, same step
    toks = sample(np.tile(row, (64, 1)), seed=np.arange(64), step=0)
    assert len(set(np.asarray(toks).tolist())) > 40
    # different steps, same seed
    assert len(set(draw(row, 64, seed=1).tolist())) > 40


def test_seed_none_varies():
    row = np.zeros(1000, dtype=np.float32)
    single = {sample(row, seed=None, step=0) for _ in range(10)}
    assert len(single) > 1
    toks = sample(np.tile(row, (64, 1)), seed=None, step=0)
    assert len(set(np.asarray(toks).tolist())) > 40  # fresh entropy per row


def test_seed_range():
    row = np.zeros(10, dtype=np.float32)
    sample(row, seed=0)
    sample(row, seed=2**64 - 1)
    sample(np.zeros((2, 10), dtype=np.float32), seed=np.array([0, 2**64 - 1], dtype=np.uint64))
    assert_raises_naming(lambda: sample(row, seed=2**64), "seed")
    assert_raises_naming(lambda: sample(row, seed=-1), "seed")


def test_per_row_knobs_equal_single_row_calls():
    rng = np.random.default_rng(70)
    B, V = 8, 200
    logits = (rng.standard_normal((B, V)) * 2).astype(np.float32)
    kw = dict(temperature=np.array([0.0, 0.5, 1.0, 1.5, 0.8, 1.0, 0.7, 1.2]),
              top_k=[0, 5, -1, 40, 10, 0, 3, 200],
              top_p=[1.0, 0.9, 0.5, 0.95, 1.0, 0.3, 1.0, 0.99],
              min_p=[0.0, 0.0, 0.1, 0.05, 0.2, 0.0, 0.0, 0.01],
              repetition_penalty=[1.0, 1.2, 1.0, 1.5, 1.0, 0.8, 1.0, 1.1],
              presence_penalty=[0.0, 0.5, 0.0, 0.0, 1.0, 0.0, -0.5, 0.2],
              frequency_penalty=[0.0, 0.0, 0.3, 0.0, 0.5, 0.0, 0.0, 0.1],
              seed=list(range(100, 108)), step=list(range(8)),
              prompt_token_ids=[None, [1, 2], [3], [], [4, 5, 6], None, [7], [8, 9]],
              output_token_ids=[[1], None, [2, 2], [], [5, 5, 5], None, [0], [9]],
              logit_bias=[None, {1: 2.0}, {}, {3: -1.0}, None, {0: 9.0}, None, {5: 1.0}],
              allowed_token_ids=[None, None, list(range(50)), None, None, None, [0, 7, 9], None])
    out = np.asarray(sample(logits, **kw))
    for b in range(B):
        one = {k: (v[b] if not np.isscalar(v) else v) for k, v in kw.items()}
        one = {k: v for k, v in one.items() if v is not None}
        one = {k: (int(v) if k in ("top_k", "seed", "step") else v) for k, v in one.items()}
        assert sample(logits[b], **one) == out[b], b
        assert ref.distribution(logits[b], **one)[out[b]] > 0


# ----------------------------------------------------------------------- bad / odd input


def test_read_only_and_non_contiguous_logits_work():
    rng = np.random.default_rng(80)
    base = rng.standard_normal((8, 60)).astype(np.float32)
    want = np.asarray(sample(base[:, ::2].copy(), seed=1, step=np.arange(8), logprobs=3).token_ids)
    ro = base[:, ::2]
    ro.flags.writeable = False
    got = sample(ro, seed=1, step=np.arange(8), logprobs=3).token_ids
    np.testing.assert_array_equal(got, want)
    f = np.asfortranarray(base[:, ::2])
    np.testing.assert_array_equal(sample(f, seed=1, step=np.arange(8)), want)
    row_view = base[3, ::2]
    assert sample(row_view, seed=1, step=3) == want[3]
    bc = np.broadcast_to(base[0], (4, 60))
    assert set(np.asarray(sample(bc, seed=4, step=0)).tolist()) == {sample(base[0], seed=4)}


@pytest.mark.parametrize("n", [None, 0, 3])
def test_empty_batch(n):
    out = sample(np.zeros((0, 10), dtype=np.float32), seed=1, logprobs=n, top_k=3,
                 temperature=np.zeros(0), prompt_token_ids=[])
    if n is None:
        out = np.asarray(out)
        assert out.shape == (0,) and out.dtype == np.int64
    else:
        assert out.token_ids.shape == (0,)
        assert out.logprobs.shape == (0,)
        assert out.ranks.shape == (0,)
        assert out.top_token_ids.shape == (0, n)
        assert out.top_logprobs.shape == (0, n)


def test_empty_batch_per_row_empty_lists():
    """An empty batch with every knob given per row (empty sequences) works."""
    x = np.zeros((0, 10), dtype=np.float32)
    kw = {name: [] for name in SCALAR_KNOBS}
    kw.update({name: [] for name in ROW_ARGS})
    out = np.asarray(sample(x, **kw))
    assert out.shape == (0,) and out.dtype == np.int64
    for name in SCALAR_KNOBS:
        assert np.asarray(sample(x, **{name: []})).shape == (0,), name


def test_input_not_modified():
    rng = np.random.default_rng(81)
    x = rng.standard_normal((4, 50)).astype(np.float32)
    x[0, 3] = np.nan
    before = x.copy()
    sample(x, temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, repetition_penalty=1.5,
           presence_penalty=1.0, frequency_penalty=1.0, prompt_token_ids=[[1, 2]] * 4,
           output_token_ids=[[3, 3]] * 4, logit_bias=[{4: 50.0}] * 4,
           allowed_token_ids=[list(range(30))] * 4, seed=1, logprobs=3)
    np.testing.assert_array_equal(x, before)
    log_softmax(x)
    np.testing.assert_array_equal(x, before)


def test_nan_token_stays_excluded_despite_bias():
    # NaN -> -inf happens before logit_bias, so a positive bias cannot revive a NaN token
    row = np.array([np.nan, 0.0, 1.0], dtype=np.float32)
    assert set(draw(row, 300, 22, logit_bias={0: 100.0}).tolist()) == {1, 2}
    assert sample(row, temperature=0.0, logit_bias={0: 100.0}) == 2


def test_nan_rows_and_partial_nan():
    x = np.array([[np.nan, 1.0, np.nan], [0.0, np.nan, 0.0]], dtype=np.float32)
    toks = draw(x[0], 100, 1)
    assert set(toks.tolist()) == {1}
    out = sample(x, seed=0, step=np.arange(2))
    assert out[0] == 1 and out[1] in (0, 2)


@pytest.mark.parametrize("bad_row", [
    [np.nan, np.nan, np.nan],
    [-np.inf, -np.inf, -np.inf],
    [np.nan, -np.inf, np.nan],
    [0.0, np.inf, 1.0],
    [np.nan, np.inf, -np.inf],
])
def test_rows_without_finite_value_or_with_plus_inf_raise(bad_row):
    bad = np.array(bad_row, dtype=np.float32)
    assert_raises_naming(lambda: sample(bad, seed=0), "logits", ValueError)
    batch = np.array([[0.0, 1.0, 2.0], bad_row, [1.0, 1.0, 1.0]], dtype=np.float32)
    assert_raises_naming(lambda: sample(batch, seed=0), "logits", ValueError)
    assert_raises_naming(lambda: sample(batch, temperature=0.0), "logits", ValueError)
    assert_raises_naming(lambda: sample(batch, seed=0, logprobs=2), "logits", ValueError)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_, np.complex64,
                                   np.complex128, np.float64, np.float16, object])
def test_wrong_logits_dtype_is_type_error(dtype):
    x = np.zeros((2, 5)).astype(dtype)
    assert_raises_naming(lambda: sample(x, seed=0), "logits", TypeError)
    assert_raises_naming(lambda: sample(x[0], seed=0), "logits", TypeError)


def test_python_list_logits():
    # not float32 arrays: either accepted (converted) or a TypeError naming logits
    try:
        t = sample([0.0, 1.0, 2.0], temperature=0.0)
    except TypeError as e:
        assert "logits" in str(e)
    else:
        assert t == 2


@pytest.mark.parametrize("shape", [(), (2, 3, 4), (1, 1, 1, 1)])
def test_wrong_logits_rank(shape):
    x = np.zeros(shape, dtype=np.float32)
    assert_raises_naming(lambda: sample(x, seed=0), "logits")


def test_zero_vocab_rows_raise():
    assert_raises_naming(lambda: sample(np.zeros(0, dtype=np.float32)), "logits")
    assert_raises_naming(lambda: sample(np.zeros((2, 0), dtype=np.float32)), "logits")


SCALAR_KNOBS = {
    "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
    "presence_penalty": 0.0, "frequency_penalty": 0.0, "seed": 1, "step": 0,
}


@pytest.mark.parametrize("name", sorted(SCALAR_KNOBS))
@pytest.mark.parametrize("length", [2, 4, 0])
def test_per_row_knob_wrong_length(name, length):
    x = np.zeros((3, 8), dtype=np.float32)
    val = [SCALAR_KNOBS[name]] * length
    assert_raises_naming(lambda: sample(x, **{name: val}), name)
    assert_raises_naming(lambda: sample(x, **{name: np.array(val)}), name)


@pytest.mark.parametrize("name", ROW_ARGS)
@pytest.mark.parametrize("length", [2, 4])
def test_per_row_sequence_wrong_length(name, length):
    x = np.zeros((3, 8), dtype=np.float32)
    val = [None] * length
    assert_raises_naming(lambda: sample(x, seed=0, **{name: val}), name)


@pytest.mark.parametrize("name", ID_ARGS)
@pytest.mark.parametrize("bad_id", [8, 9, 1000, -1, -8])
def test_out_of_range_token_ids(name, bad_id):
    x = np.zeros((3, 8), dtype=np.float32)
    assert_raises_naming(lambda: sample(x[0], seed=0, **{name: [1, bad_id]}), name, ValueError)
    assert_raises_naming(lambda: sample(x, seed=0, **{name: [[1], None, [2, bad_id]]}), name,
                         ValueError)
    assert_raises_naming(lambda: sample(x, temperature=0.0, **{name: [[1], [bad_id], [2]]}), name,
                         ValueError)


@pytest.mark.parametrize("bad_id", [8, 100, -1])
def test_out_of_range_logit_bias_ids(bad_id):
    x = np.zeros((3, 8), dtype=np.float32)
    assert_raises_naming(lambda: sample(x[0], seed=0, logit_bias={bad_id: 1.0}), "logit_bias",
                         ValueError)
    assert_raises_naming(lambda: sample(x, seed=0, logit_bias=[None, {0: 1.0, bad_id: 1.0}, {}]),
                         "logit_bias", ValueError)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_logit_bias(value):
    x = np.zeros((2, 8), dtype=np.float32)
    assert_raises_naming(lambda: sample(x[0], logit_bias={1: value}), "logit_bias", ValueError)
    assert_raises_naming(lambda: sample(x, logit_bias=[{1: 0.5}, {2: value}]), "logit_bias",
                         ValueError)


BAD_KNOB_VALUES = [
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.1), ("top_p", np.nan), ("top_p", np.inf),
    ("top_k", -2), ("top_k", -100),
    ("min_p", -0.1), ("min_p", 1.5), ("min_p", np.nan),
    ("temperature", -1.0), ("temperature", np.nan), ("temperature", np.inf),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", np.nan),
    ("repetition_penalty", np.inf),
    ("presence_penalty", np.nan), ("presence_penalty", np.inf),
    ("frequency_penalty", np.nan), ("frequency_penalty", -np.inf),
    ("step", -1), ("seed", -5),
    ("logprobs", -1), ("logprobs", 21),
    ("n_threads", 0), ("n_threads", -1),
]


@pytest.mark.parametrize("name,value", BAD_KNOB_VALUES, ids=lambda v: str(v))
def test_bad_knob_values(name, value):
    x = np.zeros((3, 30), dtype=np.float32)
    assert_raises_naming(lambda: sample(x[0], seed=0, **{name: value}), name)
    assert_raises_naming(lambda: sample(x, seed=0, **{name: value}), name)
    if name not in ("logprobs", "n_threads"):
        # one bad entry among per-row values
        good = SCALAR_KNOBS[name]
        assert_raises_naming(lambda: sample(x, **{name: [good, value, good]}), name)


WRONG_TYPES = [
    ("prompt_token_ids", [1.5]), ("output_token_ids", [0.5, 1.0]),
    ("allowed_token_ids", ["a"]), ("prompt_token_ids", 5),
    ("logit_bias", {1.5: 1.0}), ("logit_bias", {"a": 1.0}), ("logit_bias", [1, 2]),
    ("top_k", 2.5), ("seed", 1.5), ("step", 1.5), ("logprobs", 2.5),
    ("temperature", "a"), ("top_p", "0.5"), ("seed", "1"),
]


@pytest.mark.parametrize("name,value", WRONG_TYPES, ids=lambda v: repr(v))
def test_wrong_argument_types(name, value):
    x = np.zeros(10, dtype=np.float32)
    assert_raises_naming(lambda: sample(x, **{name: value}), name)


def test_numpy_id_arrays_accepted():
    x = np.zeros((3, 10), dtype=np.float32)
    x[:, 4] = 5.0
    kw = dict(prompt_token_ids=np.array([[4, 1]] * 3, dtype=np.int32),
              output_token_ids=[np.array([4, 4]), None, np.array([], dtype=np.int64)],
              allowed_token_ids=[np.arange(10), np.array([4, 5]), None],
              logit_bias=[{np.int64(5): np.float32(1.0)}, None, {}])
    out = sample(x, temperature=0.0, repetition_penalty=2.0, frequency_penalty=1.0, **kw)
    want = [ref.greedy(x[b], repetition_penalty=2.0, frequency_penalty=1.0,
                       **{k: v[b] if k != "prompt_token_ids" else v[b].tolist()
                          for k, v in kw.items()}) for b in range(3)]
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("name,value", [("top_p", 1e-9), ("top_p", 1.0), ("top_k", 0),
                                        ("top_k", -1), ("top_k", 30), ("top_k", 31),
                                        ("min_p", 0.0), ("min_p", 1.0), ("temperature", 0.0),
                                        ("logprobs", 0), ("logprobs", 20), ("n_threads", 1),
                                        ("repetition_penalty", 1e-3), ("step", 2**40)])
def test_edge_knob_values_accepted(name, value):
    x = np.arange(30, dtype=np.float32).reshape(1, 30) / 10
    sample(x, seed=0, **{name: value})
    sample(x[0], seed=0, **{name: value})


def test_a_seed_list_mixing_values_past_int64_with_small_ones_is_read_exactly():
    # numpy turns [2**64 - 1, 5] into float64; the wrapper must keep both seeds exact
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    got = sample(x, seed=[2**64 - 1, 5], temperature=1.0)
    assert got[0] == sample(x[0], seed=2**64 - 1, temperature=1.0)
    assert got[1] == sample(x[1], seed=5, temperature=1.0)
