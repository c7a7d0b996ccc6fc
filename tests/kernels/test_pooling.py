"""tep.kernels.pool against the plain-numpy reference (tests/support/reference.py).

Every mode x normalize x dimensions over ragged (offsets) and padded (lengths, bool mask,
int mask) layouts, empty sequences, empty batches, unread positions filled with NaN, odd
memory layouts, and bad input.
"""
from __future__ import annotations

import numpy as np
import pytest

from tep.kernels import pool

from support import reference as ref
from support.kernel_checks import assert_raises_naming

MODES = ["mean", "max", "cls", "last", "sum"]
RTOL, ATOL = 1e-5, 1e-5


def check(hidden, **kw):
    out = pool(hidden, **kw)
    want = ref.pool(hidden, **{k: v for k, v in kw.items() if k != "n_threads"})
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    assert out.shape == want.shape, (out.shape, want.shape)
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)
    return out


def ragged_case(rng, D=24):
    """Ragged hidden with empty sequences, a gap before offsets[0] and after offsets[-1];
    positions outside every sequence are NaN (they must never be read)."""
    lens = [3, 0, 1, 7, 0, 12, 2]
    start = 2
    offsets = np.concatenate(([0], np.cumsum(lens))) + start
    N = offsets[-1] + 3
    hidden = rng.standard_normal((N, D)).astype(np.float32)
    hidden[:start] = np.nan
    hidden[offsets[-1]:] = np.nan
    return hidden, offsets.astype(np.int64)


def padded_case(rng, D=24, T=9):
    lengths = np.array([3, 0, 1, 9, 5, 0, 2], dtype=np.int64)
    B = lengths.size
    hidden = rng.standard_normal((B, T, D)).astype(np.float32)
    for b, n in enumerate(lengths):
        hidden[b, n:] = np.nan  # padded positions are never read
    return hidden, lengths


def masked_case(rng, D=24, T=9):
    B = 7
    mask = rng.random((B, T)) < 0.45
    mask[1] = False                      # empty row
    mask[2] = False
    mask[2, 4] = True                    # single token in the middle
    mask[3] = True                       # full row
    mask[4] = False
    mask[4, [0, 8]] = True               # only the ends
    hidden = rng.standard_normal((B, T, D)).astype(np.float32)
    hidden[~mask] = np.nan
    return hidden, mask


LAYOUTS = ["offsets", "lengths", "mask_bool", "mask_int8", "mask_int64"]


def layout_case(layout, seed=0, D=24):
    rng = np.random.default_rng(seed)
    if layout == "offsets":
        h, off = ragged_case(rng, D)
        return h, dict(offsets=off)
    if layout == "lengths":
        h, lens = padded_case(rng, D)
        return h, dict(lengths=lens)
    h, m = masked_case(rng, D)
    dt = {"mask_bool": np.bool_, "mask_int8": np.int8, "mask_int64": np.int64}[layout]
    return h, dict(mask=m.astype(dt))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dimensions", [None, 1, 7, 24])
def test_pool_matches_reference(layout, mode, normalize, dimensions):
    h, lay = layout_case(layout)
    out = check(h, mode=mode, normalize=normalize, dimensions=dimensions, **lay)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_empty_sequences_are_zero(layout, mode):
    h, lay = layout_case(layout)
    for normalize, dims in ((False, None), (True, None), (False, 5)):
        out = pool(h, mode=mode, normalize=normalize, dimensions=dims, **lay)
        # rows 1 (and 5 for ragged/lengths) are empty in every case
        np.testing.assert_array_equal(out[1], 0.0)


def test_default_mode_is_mean():
    h, lay = layout_case("lengths")
    np.testing.assert_allclose(pool(h, **lay), ref.pool(h, mode="mean", **lay), rtol=RTOL,
                               atol=ATOL)


def test_normalized_rows_have_unit_norm():
    h, lay = layout_case("offsets", seed=3)
    out = pool(h, mode="mean", normalize=True, **lay)
    norms = np.linalg.norm(out, axis=1)
    nonempty = np.diff(lay["offsets"]) > 0
    np.testing.assert_allclose(norms[nonempty], 1.0, rtol=1e-5)
    out = pool(h, mode="sum", dimensions=4, **lay)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1)[nonempty], 1.0, rtol=1e-5)


def test_dimensions_is_truncate_then_renormalise():
    # normalising first then truncating (without renormalising) would give norm < 1
    h = np.array([[3.0, 4.0, 12.0]], dtype=np.float32)
    out = pool(h, offsets=np.array([0, 1]), mode="sum", dimensions=2)
    np.testing.assert_allclose(out, [[0.6, 0.8]], rtol=1e-6)
    out = pool(h, offsets=np.array([0, 1]), mode="sum", normalize=True, dimensions=2)
    np.testing.assert_allclose(out, [[0.6, 0.8]], rtol=1e-6)
    out = pool(h, offsets=np.array([0, 1]), mode="sum", normalize=True)
    np.testing.assert_allclose(out, [[3 / 13, 4 / 13, 12 / 13]], rtol=1e-6)


def test_tiny_norm_uses_epsilon():
    # ||x|| < 1e-12 -> divided by 1e-12, not by the norm (and no NaN for a zero vector)
    h = np.array([[1e-14, 0.0], [0.0, 0.0]], dtype=np.float32)
    out = pool(h, offsets=np.array([0, 1, 2]), mode="sum", normalize=True)
    np.testing.assert_allclose(out, ref.pool(h, offsets=[0, 1, 2], mode="sum", normalize=True),
                               rtol=1e-5)
    np.testing.assert_array_equal(out[1], 0.0)


def test_max_with_all_negative_values():
    h = -np.abs(np.random.default_rng(4).standard_normal((2, 5, 6))).astype(np.float32) - 1
    check(h, lengths=np.array([5, 2]), mode="max")
    check(h, mask=np.array([[0, 1, 0, 1, 0], [0, 0, 0, 0, 1]], dtype=bool), mode="max")


def test_ragged_empty_hidden_and_empty_batch():
    D = 8
    h0 = np.zeros((0, D), dtype=np.float32)
    for mode in MODES:
        out = pool(h0, offsets=np.array([0, 0, 0]), mode=mode)
        assert out.shape == (2, D) and out.dtype == np.float32
        np.testing.assert_array_equal(out, 0.0)
        out = pool(h0, offsets=np.array([0]), mode=mode)
        assert out.shape == (0, D)
        out = pool(np.ones((5, D), dtype=np.float32), offsets=np.array([3]), mode=mode,
                   dimensions=3)
        assert out.shape == (0, 3)


@pytest.mark.parametrize("mode", MODES)
def test_padded_empty_batch(mode):
    h = np.zeros((0, 4, 8), dtype=np.float32)
    out = pool(h, lengths=np.zeros(0, dtype=np.int64), mode=mode)
    assert out.shape == (0, 8) and out.dtype == np.float32
    out = pool(h, mask=np.zeros((0, 4), dtype=bool), mode=mode, normalize=True, dimensions=2)
    assert out.shape == (0, 2)
    # T == 0: every sequence is empty
    h = np.zeros((3, 0, 8), dtype=np.float32)
    np.testing.assert_array_equal(pool(h, lengths=np.zeros(3, dtype=np.int64), mode=mode), 0.0)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.intp, np.uint32])
def test_index_dtypes(dtype):
    h, lay = layout_case("offsets", seed=5)
    check(h, offsets=lay["offsets"].astype(dtype), mode="mean")
    h, lay = layout_case("lengths", seed=5)
    check(h, lengths=lay["lengths"].astype(dtype), mode="last")


def test_list_offsets_and_lengths():
    h, lay = layout_case("offsets", seed=6)
    check(h, offsets=lay["offsets"].tolist(), mode="sum")
    h, lay = layout_case("lengths", seed=6)
    check(h, lengths=lay["lengths"].tolist(), mode="cls")


@pytest.mark.parametrize("mode", MODES)
def test_read_only_and_non_contiguous(mode):
    rng = np.random.default_rng(7)
    big = rng.standard_normal((7, 12, 48)).astype(np.float32)
    h = big[:, ::2, ::2]  # [7, 6, 24], non-contiguous
    lengths = np.array([1, 6, 0, 3, 2, 5, 4])
    h.flags.writeable = False
    lengths.flags.writeable = False
    check(h, lengths=lengths, mode=mode, normalize=True)
    m = rng.random((7, 6)) < 0.5
    m_nc = np.repeat(m, 2, axis=1)[:, ::2]
    m_nc.flags.writeable = False
    check(h, mask=m_nc, mode=mode)
    hf = np.asfortranarray(big[:, :6, :24])
    check(hf, lengths=lengths, mode=mode)
    r = big.reshape(-1, 48)[::3, 1::2]  # [28, 24]
    r.flags.writeable = False
    off = np.array([0, 5, 5, 20, 28])
    off.flags.writeable = False
    check(r, offsets=off, mode=mode, dimensions=10)
    bc = np.broadcast_to(big[0, 0], (10, 48))
    check(bc, offsets=np.array([0, 4, 10]), mode=mode)


@pytest.mark.parametrize("n_threads", [None, 1, 2])
def test_threads_give_identical_results(n_threads):
    rng = np.random.default_rng(8)
    h = rng.standard_normal((64, 40, 96)).astype(np.float32)
    lengths = rng.integers(0, 41, size=64)
    base = pool(h, lengths=lengths, mode="mean", n_threads=1)
    out = check(h, lengths=lengths, mode="mean", n_threads=n_threads)
    np.testing.assert_array_equal(out, base)
    flat = h.reshape(-1, 96)
    off = np.sort(rng.integers(0, flat.shape[0] + 1, size=65))
    off[0] = 0
    a = pool(flat, offsets=off, mode="max", n_threads=1)
    b = check(flat, offsets=off, mode="max", n_threads=n_threads)
    np.testing.assert_array_equal(a, b)


def test_larger_random_cases():
    rng = np.random.default_rng(9)
    for trial in range(5):
        B, T, D = rng.integers(1, 20), rng.integers(1, 64), rng.integers(1, 130)
        h = rng.standard_normal((B, T, D)).astype(np.float32)
        lengths = rng.integers(0, T + 1, size=B)
        mask = rng.random((B, T)) < rng.random()
        for mode in MODES:
            check(h, lengths=lengths, mode=mode, normalize=bool(trial % 2))
            check(h, mask=mask, mode=mode, dimensions=int(rng.integers(1, D + 1)))


@pytest.mark.parametrize("D", [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 1023])
def test_vector_widths_and_tails(D):
    """Odd D exercises any SIMD main-loop / tail split."""
    rng = np.random.default_rng(D)
    B, T = 5, 13
    h = rng.standard_normal((B, T, D)).astype(np.float32)
    lengths = np.array([13, 1, 0, 7, 12])
    for b, n in enumerate(lengths):
        h[b, n:] = np.nan
    for mode in MODES:
        check(h, lengths=lengths, mode=mode, normalize=(D % 2 == 1))
        flat = np.ascontiguousarray(h[:, :7]).reshape(-1, D)
        off = np.array([0, 7, 7, 21, 35])
        check(np.where(np.isnan(flat), 0, flat).astype(np.float32), offsets=off, mode=mode,
              dimensions=max(1, D // 2))


def test_realistic_sizes_all_modes():
    rng = np.random.default_rng(11)
    h = rng.standard_normal((8, 512, 256)).astype(np.float32)
    lengths = rng.integers(0, 513, size=8)
    lengths[0] = 512
    mask = np.arange(512)[None, :] < lengths[:, None]
    for mode in MODES:
        a = check(h, lengths=lengths, mode=mode)
        b = check(h, mask=mask, mode=mode)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- bad input


H2 = np.zeros((10, 4), dtype=np.float32)
H3 = np.zeros((3, 5, 4), dtype=np.float32)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.int64, np.complex64,
                                   np.bool_, object])
def test_hidden_wrong_dtype(dtype):
    assert_raises_naming(lambda: pool(H2.astype(dtype), offsets=np.array([0, 10])), "hidden")
    assert_raises_naming(lambda: pool(H3.astype(dtype), lengths=np.array([1, 2, 3])), "hidden")


@pytest.mark.parametrize("shape", [(), (4,), (2, 3, 4, 5)])
def test_hidden_wrong_rank(shape):
    h = np.zeros(shape, dtype=np.float32)
    assert_raises_naming(lambda: pool(h, offsets=np.array([0, 1])), ("hidden", "offsets"))
    assert_raises_naming(lambda: pool(h, lengths=np.array([1])), ("hidden", "lengths"))


def test_hidden_rank_does_not_match_layout():
    assert_raises_naming(lambda: pool(H3, offsets=np.array([0, 1])), ("hidden", "offsets"))
    assert_raises_naming(lambda: pool(H2, lengths=np.array([1, 2])), ("hidden", "lengths"))
    assert_raises_naming(lambda: pool(H2, mask=np.ones((10, 4), bool)), ("hidden", "mask"))


@pytest.mark.parametrize("offsets", [
    [0, 5, 3, 10],   # decreasing
    [0, 11],         # past N
    [0, 5, 12],
    [-1, 5],         # negative
    [3, 2],
])
def test_bad_offsets_values(offsets):
    assert_raises_naming(lambda: pool(H2, offsets=np.array(offsets)), "offsets", ValueError)


@pytest.mark.parametrize("offsets", [np.array([[0, 1], [1, 2]]), np.array([0.0, 1.0]),
                                     np.array([], dtype=np.int64), np.array([0.5, 2.0])])
def test_bad_offsets_shape_or_dtype(offsets):
    assert_raises_naming(lambda: pool(H2, offsets=offsets), "offsets")


@pytest.mark.parametrize("lengths", [[1, 2], [1, 2, 3, 4], [1, 6, 2], [1, -1, 2], [[1, 2, 3]]])
def test_bad_lengths(lengths):
    assert_raises_naming(lambda: pool(H3, lengths=np.array(lengths)), "lengths")


def test_bad_lengths_dtype():
    assert_raises_naming(lambda: pool(H3, lengths=np.array([1.0, 2.0, 3.0])), "lengths")


@pytest.mark.parametrize("mask", [np.ones((3, 4), bool), np.ones((2, 5), bool),
                                  np.ones((3, 5, 1), bool), np.ones(5, bool),
                                  np.ones((3, 5), np.float32) + 0.5])
def test_bad_mask(mask):
    assert_raises_naming(lambda: pool(H3, mask=mask), "mask")


def test_exactly_one_layout_argument():
    names = ("offsets", "lengths", "mask")
    assert_raises_naming(lambda: pool(H2), names)
    assert_raises_naming(lambda: pool(H3, lengths=np.array([1, 2, 3]),
                                      mask=np.ones((3, 5), bool)), names)
    assert_raises_naming(lambda: pool(H2, offsets=np.array([0, 10]),
                                      lengths=np.array([1])), names)


@pytest.mark.parametrize("mode", ["median", "MEAN", "", None, 3])
def test_bad_mode(mode):
    assert_raises_naming(lambda: pool(H2, offsets=np.array([0, 10]), mode=mode), "mode")


@pytest.mark.parametrize("dims", [0, -1, 5, 100, 2.5])
def test_bad_dimensions(dims):
    assert_raises_naming(lambda: pool(H2, offsets=np.array([0, 10]), dimensions=dims),
                         "dimensions")


@pytest.mark.parametrize("n_threads", [0, -2])
def test_bad_n_threads(n_threads):
    assert_raises_naming(lambda: pool(H2, offsets=np.array([0, 10]), n_threads=n_threads),
                         "n_threads")
