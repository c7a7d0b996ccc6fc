"""Grammar bitmasks (structured output): ``sample(..., token_bitmask=...)`` and the
standalone ``apply_token_bitmask``, against a numpy reference of the layout llguidance and
xgrammar fill (int32 [B, ceil(V/32)], bit j % 32 of word j // 32 allows token j).
"""
from __future__ import annotations

import numpy as np
import pytest

from tep._kernels import sampling as _k
from tep.kernels import RowStatus, apply_token_bitmask, sample

try:  # tests/ may or may not become a package
    from . import reference as ref
    from .kernel_checks import assert_raises_naming, merged_chisquare
except ImportError:  # pragma: no cover
    import reference as ref
    from kernel_checks import assert_raises_naming, merged_chisquare


def allowed_of(bitmask: np.ndarray, V: int) -> np.ndarray:
    """bool [B, V] from the words, by unpacking little-endian bytes (independent of the
    kernel's word/bit arithmetic)."""
    m = np.atleast_2d(bitmask)
    bits = np.unpackbits(np.ascontiguousarray(m).view(np.uint8), axis=1, bitorder="little")
    return bits[:, :V].astype(bool)


def make_mask(rng, B: int, V: int, p: float = 0.3, extra_words: int = 0) -> np.ndarray:
    """Random words with runs of all-ones / all-zero words and junk bits past V."""
    W = (V + 31) // 32 + extra_words
    bits = rng.random((B, W * 32)) < p
    words = np.packbits(bits, axis=1, bitorder="little").view(np.int32).copy()
    kind = rng.integers(0, 4, (B, W))
    words[kind == 0] = -1
    words[kind == 1] = 0
    return words


@pytest.fixture(params=["simd", "scalar"])
def simd_path(request):
    """Each test once per row-primitive path (AVX2 when the CPU has it, and portable C)."""
    if request.param == "scalar":
        _k.simd_init(False)
    elif _k.simd_level() == 0:
        pytest.skip("this CPU has no AVX2+FMA: only the portable path exists here")
    try:
        yield request.param
    finally:
        _k.simd_init(True)


# ---- standalone ---------------------------------------------------------------------------

@pytest.mark.parametrize("V", [1, 7, 31, 32, 33, 63, 64, 65, 1000, 49159])
def test_apply_token_bitmask_matches_numpy(V, simd_path):
    rng = np.random.default_rng(V)
    for B, extra in ((1, 0), (3, 0), (4, 2)):
        x = rng.standard_normal((B, V)).astype(np.float32)
        x[0, :: max(1, V // 5)] = np.nan
        mask = make_mask(rng, B, V, extra_words=extra)
        allowed = allowed_of(mask, V)
        want = np.where(allowed, x, -np.inf)
        y = x.copy()
        assert apply_token_bitmask(y, mask, n_threads=2 if B > 1 else None) is None
        np.testing.assert_array_equal(y, want)       # NaN where allowed stays NaN
        one = x[0].copy()
        apply_token_bitmask(one, mask[0])
        np.testing.assert_array_equal(one, want[0])


def test_apply_token_bitmask_ignores_bits_past_v():
    V = 40
    x = np.zeros(V, np.float32)
    mask = np.array([-1, 0x00FF], np.int32)          # tokens 32..39 allowed
    mask_junk = np.array([-1, -1], np.int32)          # bits 40..63 set: ignored
    y, z = x.copy(), x.copy()
    apply_token_bitmask(y, mask)
    apply_token_bitmask(z, mask_junk)
    assert np.isfinite(y).all() and np.isfinite(z).all()
    mask[1] = 0x7F                                    # token 39 now disallowed
    apply_token_bitmask(y, mask)
    assert y[39] == -np.inf and np.isfinite(y[:39]).all()


@pytest.mark.parametrize("bad", [
    np.zeros((2, 2), np.int64), np.zeros((2, 8), np.uint8), np.zeros((2, 2), np.float32),
    np.zeros((2, 1), np.int32),             # shorter than ceil(40/32) = 2
    np.zeros((3, 2), np.int32),             # wrong B
    np.zeros(2, np.int32),                  # 1-D for [B, V]
    [[-1, -1], [-1, -1]],                   # not an array
])
def test_bad_bitmask_is_a_value_error(bad):
    x = np.zeros((2, 40), np.float32)
    assert_raises_naming(lambda: apply_token_bitmask(x, bad), "token_bitmask", ValueError)
    assert_raises_naming(lambda: sample(x, token_bitmask=bad), "token_bitmask", ValueError)


def test_apply_token_bitmask_needs_writeable_contiguous_logits():
    mask = np.full((2, 2), -1, np.int32)
    x = np.zeros((2, 80), np.float32)[:, ::2]
    with pytest.raises(ValueError, match="contiguous"):
        apply_token_bitmask(x, mask)
    y = np.zeros((2, 40), np.float32)
    y.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        apply_token_bitmask(y, mask)


# ---- fused into sample ------------------------------------------------------------------

def test_masked_greedy_equals_reference_with_every_edit(simd_path):
    rng = np.random.default_rng(1)
    V, B = 300, 6
    for trial in range(30):
        x = (rng.standard_normal((B, V)) * 2).astype(np.float32)
        mask = make_mask(rng, B, V, p=0.5)
        allowed = allowed_of(mask, V)
        ids = [sorted(rng.choice(V, 120, replace=False).tolist()) for _ in range(B)]
        bias = [{int(t): float(rng.uniform(-3, 3)) for t in rng.integers(0, V, 5)}
                for _ in range(B)]
        hist = [rng.integers(0, V, 12).tolist() for _ in range(B)]
        kw = dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2)
        got = sample(x, temperature=0.0, token_bitmask=mask, allowed_token_ids=ids,
                     logit_bias=bias, output_token_ids=hist, row_status=True, **kw)
        for r in range(B):
            both = sorted(set(ids[r]) & set(np.flatnonzero(allowed[r]).tolist()))
            if not both:
                assert got.status[r] == RowStatus.MASKED_ALL and got.token_ids[r] == -1
                continue
            want = ref.greedy(x[r], allowed_token_ids=both, logit_bias=bias[r],
                              output_token_ids=hist[r], **kw)
            assert got.status[r] == 0 and got.token_ids[r] == want, (trial, r)


@pytest.mark.parametrize("knobs", [dict(), dict(top_k=8), dict(top_p=0.8), dict(min_p=0.05),
                                   dict(top_k=20, top_p=0.9, temperature=0.7),
                                   dict(presence_penalty=1.0, logit_bias={3: 2.0})])
def test_masked_sampling_is_the_renormalised_reference(knobs, simd_path):
    """Chi-square: the mask acts exactly as allowed_token_ids = the allowed bits."""
    rng = np.random.default_rng(2)
    V, n = 70, 30000
    x = rng.standard_normal(V).astype(np.float32)
    mask = make_mask(rng, 1, V, p=0.6)
    allowed = np.flatnonzero(allowed_of(mask, V)[0]).tolist()
    hist = [3, 3, 5] if "presence_penalty" in knobs else None
    probs = ref.distribution(x, allowed_token_ids=allowed, output_token_ids=hist, **knobs)
    rows = np.broadcast_to(x, (n, V)).copy()
    bias = [knobs["logit_bias"]] * n if "logit_bias" in knobs else None
    kw = {k: v for k, v in knobs.items() if k != "logit_bias"}
    toks = sample(rows, token_bitmask=np.repeat(mask, n, 0), seed=9, step=np.arange(n),
                  logit_bias=bias, output_token_ids=[hist] * n if hist else None, **kw)
    counts = np.bincount(toks, minlength=V)
    assert counts[probs == 0].sum() == 0
    assert merged_chisquare(counts, probs) > 1e-3


@pytest.mark.parametrize("knobs", [dict(), dict(top_p=0.9), dict(top_k=50)])
def test_large_vocab_whole_row_paths_respect_the_mask(knobs, simd_path):
    """V = 49152: the envelope draw and the top-p bracket path run on the masked row."""
    rng = np.random.default_rng(3)
    V, B = 49152, 64
    x = (rng.standard_normal((B, V)) * 2).astype(np.float32)
    mask = make_mask(rng, B, V, p=0.4)
    allowed = allowed_of(mask, V)
    toks = sample(x, token_bitmask=mask, seed=np.arange(B), **knobs)
    assert allowed[np.arange(B), toks].all()
    # the same draw as allowed_token_ids with the same set (one definition of masking)
    ids = [np.flatnonzero(a) for a in allowed]
    np.testing.assert_array_equal(
        sample(x, allowed_token_ids=ids, seed=np.arange(B), **knobs), toks)


def test_all_ones_rows_sample_exactly_as_without_a_mask():
    rng = np.random.default_rng(4)
    V, B = 5000, 8
    x = rng.standard_normal((B, V)).astype(np.float32)
    mask = make_mask(rng, B, V)
    mask[::2] = -1                                   # unconstrained rows of a mixed batch
    kw = dict(seed=np.arange(B), step=3, top_p=0.95, logprobs=3)
    got = sample(x, token_bitmask=mask, **kw)
    free = sample(x, **kw)
    np.testing.assert_array_equal(got.token_ids[::2], free.token_ids[::2])
    allowed = allowed_of(mask, V)
    assert allowed[np.arange(B), got.token_ids].all()


def test_logprobs_stay_raw_under_a_mask():
    rng = np.random.default_rng(5)
    V = 500
    x = rng.standard_normal((3, V)).astype(np.float32)
    mask = make_mask(rng, 3, V, p=0.2)
    r = sample(x, token_bitmask=mask, logprobs=5, seed=1)
    raw = ref.log_softmax(x)
    for b in range(3):
        lp, rank, top_ids, top_lps = ref.raw_logprob_info(x[b], int(r.token_ids[b]), 5)
        np.testing.assert_allclose(r.logprobs[b], raw[b, r.token_ids[b]], atol=1e-5)
        assert r.ranks[b] == rank
        np.testing.assert_array_equal(r.top_token_ids[b], top_ids)   # unmasked top tokens


def test_mask_allowing_nothing_is_a_row_error():
    x = np.random.default_rng(6).standard_normal((3, 100)).astype(np.float32)
    mask = np.full((3, 4), -1, np.int32)
    mask[1] = 0                                       # nothing allowed
    mask[2] = 0
    mask[2, 0] = 1                                    # only token 0, whose logit is -inf
    x[2, 0] = -np.inf
    out = sample(x, token_bitmask=mask, seed=0, row_status=True)
    np.testing.assert_array_equal(out.status, [0, RowStatus.MASKED_ALL, RowStatus.MASKED_ALL])
    np.testing.assert_array_equal(out.token_ids[1:], [-1, -1])
    with pytest.raises(ValueError, match="row 1 .*token_bitmask"):
        sample(x, token_bitmask=mask, seed=0)
    with pytest.raises(ValueError, match="token_bitmask"):
        sample(x[1], token_bitmask=mask[1], temperature=0)


def test_one_row_forms():
    x = np.arange(40, dtype=np.float32)
    mask = np.array([0b1000, 0], np.int32)            # only token 3
    assert sample(x, token_bitmask=mask, temperature=0) == 3
    assert sample(x, token_bitmask=mask[None], seed=1) == 3
    assert sample(x[None], token_bitmask=mask[None], seed=1)[0] == 3


@pytest.mark.parametrize("knobs", [dict(temperature=0.0), dict(), dict(top_p=0.7),
                                   dict(top_k=5), dict(min_p=0.2, temperature=0.5)])
def test_every_entry_point_draws_the_same_masked_token(knobs, simd_path):
    """One-row fast path, shared-knob rows, the full batch path (logprobs forces it) and
    allowed_token_ids with the same set all give the same token for the same seed."""
    rng = np.random.default_rng(7)
    V = 3000
    for trial in range(25):
        x = (rng.standard_normal(V) * 2).astype(np.float32)
        mask = make_mask(rng, 1, V, p=float(rng.choice([0.02, 0.5, 0.95])))
        ids = np.flatnonzero(allowed_of(mask, V)[0])
        if ids.size == 0 or not np.isfinite(x[ids]).any():
            continue
        a = sample(x, token_bitmask=mask[0], seed=trial, **knobs)
        b = sample(x[None], token_bitmask=mask, seed=trial, **knobs)[0]
        c = sample(x, token_bitmask=mask[0], seed=trial, logprobs=0, **knobs).token_ids
        d = sample(x, allowed_token_ids=ids, seed=trial, **knobs)
        assert a == b == c == d, (trial, a, b, c, d)
        assert a in set(ids.tolist())
