"""Token histories as TokenSpans (slices of one int32 buffer) and per-row status.

TokenSpans is what an engine keeps between steps: a slot-major buffer that grows by one
token per row per step, passed as is. It must give the same tokens as the list form, match
the numpy reference, and be safe with ids the wrapper never looked at.
"""
from __future__ import annotations

import numpy as np
import pytest

from tep.kernels import RowStatus, SampledRows, SampleResult, TokenSpans, sample

try:  # tests/ may or may not become a package
    from . import reference as ref
    from .kernel_checks import assert_raises_naming, merged_chisquare
except ImportError:  # pragma: no cover
    import reference as ref
    from kernel_checks import assert_raises_naming, merged_chisquare

PENALTIES = dict(repetition_penalty=1.7, presence_penalty=0.6, frequency_penalty=0.4)


class SlotBuffer:
    """A slot-major history buffer like an engine's: row r owns ids[r*cap:(r+1)*cap]."""

    def __init__(self, B: int, cap: int):
        self.ids = np.full(B * cap, -7, np.int32)     # junk outside the live spans
        self.cap = cap
        self.starts = np.arange(B, dtype=np.int64) * cap
        self.ends = self.starts.copy()

    def append(self, toks) -> None:
        self.ids[self.ends] = toks
        self.ends += 1

    def spans(self) -> TokenSpans:
        return TokenSpans(self.ids, self.starts, self.ends)

    def lists(self) -> list[list[int]]:
        return [self.ids[a:b].tolist() for a, b in zip(self.starts, self.ends)]


def test_spans_give_the_same_tokens_as_lists_over_a_decode_loop():
    rng = np.random.default_rng(0)
    B, V, steps = 5, 700, 30
    prompts = [rng.integers(0, V, int(rng.integers(0, 20))).tolist() for _ in range(B)]
    pbuf = np.concatenate([np.asarray(p, np.int32) for p in prompts])
    plen = np.array([len(p) for p in prompts])
    pends = np.cumsum(plen)
    prompt_spans = TokenSpans(pbuf, pends - plen, pends)
    out = SlotBuffer(B, steps)
    for step in range(steps):
        x = (rng.standard_normal((B, V)) * 2).astype(np.float32)
        kw = dict(seed=np.arange(B) + 11, step=step, top_k=50, top_p=0.95, logprobs=2,
                  **PENALTIES)
        a = sample(x, prompt_token_ids=prompt_spans, output_token_ids=out.spans(), **kw)
        b = sample(x, prompt_token_ids=prompts, output_token_ids=out.lists(), **kw)
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_array_equal(a.top_token_ids, b.top_token_ids)
        out.append(a.token_ids.astype(np.int32))


def test_spans_match_the_reference_processing_greedy():
    rng = np.random.default_rng(1)
    V = 300
    for trial in range(40):
        x = (rng.standard_normal(V) * 2).astype(np.float32)
        hist = rng.integers(0, 40, 30).astype(np.int32)      # repeats: counts matter
        p = rng.integers(0, 40, 10).astype(np.int32)
        buf = np.concatenate([p, hist])
        got = sample(x[None], temperature=0.0,
                     prompt_token_ids=TokenSpans(buf, [0], [p.size]),
                     output_token_ids=TokenSpans(buf, [p.size], [buf.size]), **PENALTIES)
        want = ref.greedy(x, prompt_token_ids=p, output_token_ids=hist, **PENALTIES)
        assert got[0] == want, trial


def test_spans_distribution_chi_square_against_the_reference():
    rng = np.random.default_rng(2)
    V, n = 40, 40000
    x = (rng.standard_normal(V)).astype(np.float32)
    hist = np.array([3, 3, 3, 7, 7, 11, 30, 30], np.int32)
    probs = ref.distribution(x, output_token_ids=hist, top_k=20, **PENALTIES)
    # n rows that all point at the same span of one buffer
    spans = TokenSpans(hist, np.zeros(n, np.int64), np.full(n, hist.size, np.int64))
    toks = sample(np.broadcast_to(x, (n, V)).copy(), output_token_ids=spans, top_k=20,
                  seed=5, step=np.arange(n), **PENALTIES)
    counts = np.bincount(toks, minlength=V)
    assert counts[probs == 0].sum() == 0
    assert merged_chisquare(counts, probs) > 1e-3


def test_out_of_range_ids_in_spans_are_skipped():
    """The wrapper checks spans in O(B), not the ids; the kernel skips ids outside [0, V)."""
    rng = np.random.default_rng(3)
    V = 200
    x = (rng.standard_normal((4, V)) * 2).astype(np.float32)
    good = rng.integers(0, V, 25).astype(np.int32)
    junk = np.array([-1, V, V + 1, 2**31 - 1, -2**31], np.int32)
    dirty = np.concatenate([good[:10], junk, good[10:], junk])
    kw = dict(seed=4, step=9, temperature=0.7, logprobs=3, **PENALTIES)
    clean = sample(x, output_token_ids=TokenSpans(good, [0] * 4, [25] * 4), **kw)
    got = sample(x, output_token_ids=TokenSpans(dirty, [0] * 4, [dirty.size] * 4), **kw)
    np.testing.assert_array_equal(got.token_ids, clean.token_ids)
    # greedy identity with the reference over the valid ids only
    g = sample(x, temperature=0.0, prompt_token_ids=TokenSpans(dirty, [0] * 4, [dirty.size] * 4),
               repetition_penalty=3.0)
    for r in range(4):
        assert g[r] == ref.greedy(x[r], prompt_token_ids=good, repetition_penalty=3.0)


def test_lists_still_refuse_out_of_range_ids():
    x = np.zeros(10, np.float32)
    assert_raises_naming(lambda: sample(x, output_token_ids=[10], presence_penalty=1.0),
                         "output_token_ids", ValueError)


def test_empty_spans_and_empty_buffer():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    e = TokenSpans(np.zeros(0, np.int32), [0, 0], [0, 0])
    np.testing.assert_array_equal(sample(x, temperature=0, output_token_ids=e,
                                         presence_penalty=5.0), [2, 2])
    # a zero-length span of a non-empty buffer
    s = TokenSpans(np.array([2, 2], np.int32), [1, 0], [1, 2])
    np.testing.assert_array_equal(
        sample(x, temperature=0, output_token_ids=s, presence_penalty=5.0), [2, 1])


@pytest.mark.parametrize("spans,exc", [
    (TokenSpans(np.zeros(4, np.int64), [0], [1]), TypeError),          # int64 ids
    (TokenSpans(np.zeros((2, 2), np.int32), [0], [1]), TypeError),     # 2-D ids
    (TokenSpans(np.zeros(8, np.int32)[::2], [0], [1]), ValueError),    # not contiguous
    (TokenSpans(np.zeros(4, np.int32), [2], [1]), ValueError),         # start > end
    (TokenSpans(np.zeros(4, np.int32), [-1], [1]), ValueError),        # start < 0
    (TokenSpans(np.zeros(4, np.int32), [0], [5]), ValueError),         # end > len(ids)
    (TokenSpans(np.zeros(4, np.int32), [0, 0], [1, 1]), ValueError),   # B mismatch
    (TokenSpans(np.zeros(4, np.int32), [0.0], [1.0]), TypeError),      # float bounds
    (TokenSpans(np.zeros(4, np.int32), np.array([2**63], np.uint64),
                np.array([2**63], np.uint64)), ValueError),
])
def test_span_validation(spans, exc):
    x = np.zeros((1, 5), np.float32)
    for name in ("prompt_token_ids", "output_token_ids"):
        assert_raises_naming(lambda: sample(x, **{name: spans}, repetition_penalty=1.5),
                             name, exc)


# ---- per-row status ---------------------------------------------------------------------

def _mixed_batch():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 50)).astype(np.float32)
    x[1] = np.nan                       # no finite value
    x[2, 7] = np.inf                    # +inf
    x[3, :10] = -np.inf                 # allowed set keeps only -inf tokens
    allowed = [None, None, None, list(range(10)), None]
    return x, allowed


def test_row_status_reports_each_row_and_keeps_the_batch():
    x, allowed = _mixed_batch()
    out = sample(x, allowed_token_ids=allowed, seed=np.arange(5), top_p=0.9,
                 row_status=True)
    assert isinstance(out, SampledRows) and out.logprobs is None
    assert out.status.dtype == np.int32
    np.testing.assert_array_equal(out.status, [RowStatus.OK, RowStatus.NO_FINITE,
                                               RowStatus.POS_INF, RowStatus.MASKED_ALL,
                                               RowStatus.OK])
    np.testing.assert_array_equal(out.token_ids[1:4], [-1, -1, -1])
    # good rows draw what they draw alone (row independence survives failed neighbours)
    for r in (0, 4):
        assert out.token_ids[r] == sample(x[r], seed=r, top_p=0.9)


def test_without_row_status_the_first_bad_row_raises():
    x, allowed = _mixed_batch()
    with pytest.raises(ValueError, match="row 1 has no finite value"):
        sample(x, allowed_token_ids=allowed, seed=0)
    with pytest.raises(ValueError, match="row 1 has finite values, but allowed_token_ids"):
        sample(x[[0, 3]], allowed_token_ids=[None, allowed[3]], seed=0)
    with pytest.raises(ValueError, match="holds \\+inf"):
        sample(x[2], seed=0)


def test_row_status_with_logprobs_marks_failed_rows():
    x, allowed = _mixed_batch()
    out = sample(x, allowed_token_ids=allowed, seed=1, logprobs=2, row_status=True)
    lp = out.logprobs
    assert isinstance(lp, SampleResult)
    bad = out.status != 0
    assert np.isnan(lp.logprobs[bad]).all() and (lp.ranks[bad] == 0).all()
    assert (lp.top_token_ids[bad] == -1).all() and np.isnan(lp.top_logprobs[bad]).all()
    assert np.isfinite(lp.logprobs[~bad]).all() and (lp.ranks[~bad] >= 1).all()
    assert lp.token_ids is out.token_ids


def test_row_status_one_row_and_argument_errors_still_raise():
    x = np.array([np.nan, np.nan], np.float32)
    out = sample(x, row_status=True)
    assert out == SampledRows(-1, int(RowStatus.NO_FINITE), None)
    ok = sample(np.array([0.0, 1.0], np.float32), temperature=0, row_status=True)
    assert ok == SampledRows(1, 0, None)
    # caller errors are not row data: they raise as before
    assert_raises_naming(lambda: sample(x, top_p=2.0, row_status=True), "top_p", ValueError)
    assert_raises_naming(lambda: sample(x, row_status="yes"), "row_status", TypeError)
