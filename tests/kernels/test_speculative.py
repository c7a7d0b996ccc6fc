"""Exact-match draft verification (tep.kernels.verify).

The property: for any knobs, verifying K drafts against K + 1 logits rows emits exactly
the tokens that sampling those rows one step at a time (steps step..step+K, the output
history growing by each emitted token) would, stopping at the first draft that differs.
Checked against running tep.kernels.sample step by step with the same seeds (hypothesis
over knobs, V up to 128k, K up to 16), and against a numpy reference for greedy rows.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tep.kernels import RowStatus, sample, verify

from support import reference as ref
from support.kernel_checks import assert_raises_naming


def stepwise(logits, start, drafts, *, output=(), step=0, logprobs=None, **kw):
    """The reference: sample row start + j at step + j with the emitted tokens appended to
    the output history; stop at the first sample that differs from its draft."""
    out, lps = list(output), []
    emitted = []
    for j in range(len(drafts) + 1):
        r = sample(logits[start + j], step=step + j, output_token_ids=out,
                   logprobs=logprobs, **kw)
        tok = int(r.token_ids) if logprobs is not None else int(r)
        if logprobs is not None:
            lps.append((float(r.logprobs), r.top_token_ids.tolist()))
        emitted.append(tok)
        out.append(tok)
        if j == len(drafts) or tok != drafts[j]:
            break
    return emitted, lps


KNOBS = st.fixed_dictionaries({
    "temperature": st.sampled_from([0.0, 0.3, 0.8, 1.0, 1.7]),
    "top_k": st.sampled_from([0, 1, 5, 40]),
    "top_p": st.sampled_from([1.0, 0.9, 0.5]),
    "min_p": st.sampled_from([0.0, 0.05]),
    "repetition_penalty": st.sampled_from([1.0, 1.3]),
    "presence_penalty": st.sampled_from([0.0, 0.5]),
    "frequency_penalty": st.sampled_from([0.0, -0.4, 0.7]),
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(knobs=KNOBS, V=st.sampled_from([5, 97, 1000, 49152, 131072]),
       ks=st.lists(st.integers(0, 16), min_size=1, max_size=3),
       corrupt=st.lists(st.integers(0, 17), min_size=3, max_size=3),
       seed=st.integers(0, 2**64 - 1), step=st.integers(0, 1000),
       bias=st.booleans(), lp=st.sampled_from([None, 0, 3]), data_seed=st.integers(0, 99))
def test_verify_equals_sampling_step_by_step(knobs, V, ks, corrupt, seed, step, bias, lp,
                                             data_seed):
    if max(ks) == 0:
        ks = ks[:-1] + [1]
    if V * (sum(ks) + len(ks)) > 6_000_000:      # bounded memory and time per example
        ks = [min(k, 3) for k in ks]
    rng = np.random.default_rng(data_seed)
    B = len(ks)
    rows = sum(k + 1 for k in ks)
    # peaked rows (a few tokens hold most mass), so stepwise drafts are often accepted
    logits = (rng.standard_normal((rows, V)) * 3).astype(np.float32)
    starts = np.concatenate(([0], np.cumsum([k + 1 for k in ks])[:-1]))
    histories = [rng.integers(0, V, int(rng.integers(0, 12))).tolist() for _ in range(B)]
    prompts = [rng.integers(0, V, int(rng.integers(0, 8))).tolist() for _ in range(B)]
    biases = [{int(rng.integers(0, V)): 5.0} if bias else None for _ in range(B)]
    seeds = [(seed + 7919 * r) % 2**64 for r in range(B)]
    # drafts: the stepwise samples themselves, then one position changed (or none)
    drafts = []
    for r, k in enumerate(ks):
        kw = dict(knobs, seed=seeds[r], prompt_token_ids=prompts[r], logit_bias=biases[r])
        d = []
        out = list(histories[r])
        for j in range(k):
            t = int(sample(logits[starts[r] + j], step=step + j, output_token_ids=out, **kw))
            d.append(t)
            out.append(t)
        c = corrupt[r % 3]
        if c < k:
            d[c] = (d[c] + 1 + int(rng.integers(0, V - 1))) % V if V > 1 else d[c]
        drafts.append(d)
    res = verify(logits, drafts, seed=seeds, step=step, output_token_ids=histories,
                 prompt_token_ids=prompts, logit_bias=biases, logprobs=lp, **knobs)
    for r, k in enumerate(ks):
        kw = dict(knobs, seed=seeds[r], prompt_token_ids=prompts[r], logit_bias=biases[r])
        want, lps = stepwise(logits, starts[r], drafts[r], output=histories[r], step=step,
                             logprobs=lp, **kw)
        n = int(res.n_tokens[r])
        assert res.token_ids[r, :n].tolist() == want, (r, k, drafts[r])
        assert (res.token_ids[r, n:] == -1).all()
        if lp is not None:
            for j, (l, top) in enumerate(lps):
                assert res.logprobs[r, j] == np.float32(l)
                assert res.top_token_ids[r, j].tolist() == top
    assert (res.status == 0).all()


def test_greedy_acceptance_matches_numpy():
    rng = np.random.default_rng(3)
    V, K = 300, 6
    for trial in range(30):
        logits = rng.standard_normal((K + 1, V)).astype(np.float32)
        target = [ref.greedy(row) for row in logits]
        cut = int(rng.integers(0, K + 1))          # drafts right up to cut, then wrong
        drafts = target[:K]
        if cut < K:
            drafts = drafts[:cut] + [(target[cut] + 1) % V] + drafts[cut + 1:]
        res = verify(logits, [drafts], temperature=0.0, seed=trial)
        n = cut + 1 if cut < K else K + 1
        assert int(res.n_tokens[0]) == n
        assert res.token_ids[0, :n].tolist() == target[:n]


def test_rows_without_drafts_sample_like_sample():
    rng = np.random.default_rng(5)
    V = 400
    logits = rng.standard_normal((1 + 4 + 1, V)).astype(np.float32)
    res = verify(logits, [[], [1, 2, 3], []], seed=[1, 2, 3], step=[10, 20, 30],
                 temperature=0.9)
    assert res.n_tokens[0] == 1 and res.n_tokens[2] == 1
    assert res.token_ids[0, 0] == sample(logits[0], seed=1, step=10, temperature=0.9)
    assert res.token_ids[2, 0] == sample(logits[5], seed=3, step=30, temperature=0.9)


def test_bitmask_rows_apply_per_position():
    V = 64
    logits = np.zeros((3, V), np.float32)
    logits[:, 10] = 5.0
    mask = np.full((3, 2), -1, np.int32)
    mask[1, 0] &= ~(1 << 10)                        # position 1 forbids token 10
    res = verify(logits, [[10, 10]], temperature=0.0, token_bitmask=mask)
    assert res.token_ids[0].tolist()[:2] == [10, 0]
    assert int(res.n_tokens[0]) == 2


def test_bad_input_is_a_clear_error():
    V = 50
    x = np.zeros((3, V), np.float32)
    assert_raises_naming(lambda: verify(x[:1], [[]]), "K = 0")
    assert_raises_naming(lambda: verify(x[:1], np.zeros((1, 0), np.int64)), "K = 0")
    assert_raises_naming(lambda: verify(x, [[3, V]]), "outside the vocabulary")
    assert_raises_naming(lambda: verify(x, [[-1, 2]]), "outside the vocabulary")
    assert_raises_naming(lambda: verify(x, [[1]]), "sum(n_draft + 1)")
    assert_raises_naming(lambda: verify(x, [[1, 2]], temperature=-1), "temperature")
    assert_raises_naming(lambda: verify(x.astype(np.float64), [[1, 2]]), "float32")
    assert_raises_naming(lambda: verify(x, [[1.5, 2]]), "integer")
    assert_raises_naming(lambda: verify(x, [list(range(2))], token_bitmask=np.zeros((1, 2), np.int32)),
                         "token_bitmask")
    nan = x.copy()
    nan[1] = np.nan
    assert_raises_naming(lambda: verify(nan, [[0, 0]], temperature=0.0), "no finite")
    r = verify(nan, [[0, 0]], temperature=0.0, row_status=True)
    assert r.status[0] == RowStatus.NO_FINITE and r.n_tokens[0] == 1   # the token before
    assert verify(x, [[0, 0]], temperature=0.0).n_tokens[0] == 3       # still works


# ---- rejection sampling ----------------------------------------------------------------------

from tep.kernels import verify_rejection  # noqa: E402
from support.kernel_checks import merged_chisquare  # noqa: E402


def _softmax(x, T):
    z = x.astype(np.float64) / T
    e = np.exp(z - z.max())
    return e / e.sum()


@pytest.mark.parametrize("T", [0.7, 1.0])
def test_rejection_sampling_emits_the_target_distribution(T):
    """Chi-square: with drafts drawn from a different distribution q, the first emitted
    token is distributed as p_0 and the second (when there is one) as p_1."""
    rng = np.random.default_rng(int(T * 10))
    V, K, n = 12, 2, 40_000
    rows = rng.standard_normal((K + 1, V)).astype(np.float32) * 1.5
    p = [_softmax(r, T) for r in rows]
    q = [_softmax(rng.standard_normal(V).astype(np.float32), 1.0) for _ in range(K)]
    drafts = np.stack([rng.choice(V, size=n, p=q[j]) for j in range(K)], axis=1)
    logits = np.ascontiguousarray(np.tile(rows, (n, 1)))
    probs = np.ascontiguousarray(np.tile(np.stack(q).astype(np.float32), (n, 1)))
    res = verify_rejection(logits, drafts, probs, temperature=T,
                           seed=np.arange(n, dtype=np.uint64) * 7 + 1, step=5)
    first = np.bincount(res.token_ids[:, 0], minlength=V)
    assert merged_chisquare(first, p[0]) > 1e-3
    two = res.n_tokens >= 2
    second = np.bincount(res.token_ids[two, 1], minlength=V)
    assert merged_chisquare(second, p[1]) > 1e-3
    # drafts are accepted at the rate sum_x min(p, q) (the theory), within noise
    want = np.minimum(p[0], q[0]).sum()
    accepted0 = np.mean(res.n_tokens >= 2)
    assert abs(accepted0 - want) < 0.02, (accepted0, want)


def test_rejection_sampling_bad_input():
    V = 6
    x = np.zeros((3, V), np.float32)
    q = np.full((2, V), 1 / V, np.float32)
    assert_raises_naming(lambda: verify_rejection(x, [[1, 2]], q[:1]), "draft_probs")
    assert_raises_naming(lambda: verify_rejection(x, [[1, 2]], q * 2), "sums to")
    z = q.copy()
    z[0] = 0
    z[0, 3] = 1
    assert_raises_naming(lambda: verify_rejection(x, [[1, 2]], z), "probability 0")
    assert_raises_naming(lambda: verify_rejection(x, [[1, 9]], q), "outside the vocabulary")
    nan = x.copy()
    nan[0] = np.nan
    assert_raises_naming(lambda: verify_rejection(nan, [[1, 2]], q), "no finite")
    r = verify_rejection(x, [[1, 2]], q, seed=3)
    assert 1 <= r.n_tokens[0] <= 3
