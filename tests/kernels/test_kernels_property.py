"""Property-based tests: random shapes, dtypes and values thrown at sample, log_softmax and
pool. Each call must give a valid result or raise TypeError/ValueError; where the contract
says an input is valid, it must succeed, and where it says invalid, it must raise.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tep.kernels import SampleResult, log_softmax, pool, sample

from support import reference as ref

# derandomize: the suite must be deterministic (same examples every run, no example database
# written into the checkout). Raise max_examples locally for a deeper search.
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

FLOAT_DTYPES = [np.float32, np.float64, np.float16]
OTHER_DTYPES = [np.int32, np.int64, np.uint8, np.bool_, np.complex64]

float_values = st.one_of(
    st.floats(-50, 50, width=32),
    st.sampled_from([np.nan, -np.inf, np.inf, 0.0, -0.0, 1e30, -1e30, 3.4e38, 1e-40]),
)


@st.composite
def logits_arrays(draw):
    """Mostly float32 [B, V] / [V]; sometimes other dtypes or ranks."""
    rank = draw(st.sampled_from([1, 2, 2, 2, 0, 3]))
    dtype = draw(st.sampled_from([np.float32] * 6 + FLOAT_DTYPES + OTHER_DTYPES))
    if rank == 0:
        shape = ()
    elif rank == 1:
        shape = (draw(st.integers(0, 40)),)
    elif rank == 2:
        shape = (draw(st.integers(0, 6)), draw(st.integers(0, 40)))
    else:
        shape = (draw(st.integers(0, 3)), draw(st.integers(0, 3)), draw(st.integers(0, 5)))
    mostly_finite = draw(st.booleans())
    elems = st.floats(-20, 20, width=32) if mostly_finite else float_values
    x = draw(hnp.arrays(np.float32, shape, elements=elems))
    if mostly_finite and x.size and draw(st.booleans()):
        # sprinkle a few NaN / -inf
        idx = draw(st.lists(st.integers(0, x.size - 1), max_size=5))
        x.flat[idx] = draw(st.sampled_from([np.nan, -np.inf]))
    with np.errstate(all="ignore"):
        x = x.astype(dtype) if dtype not in OTHER_DTYPES else np.nan_to_num(x).astype(dtype)
    x = np.array(x)  # a 0-d draw can come back as a numpy scalar
    layout = draw(st.sampled_from(["c", "c", "readonly", "strided"]))
    if layout == "readonly":
        x.flags.writeable = False
    elif layout == "strided" and x.ndim >= 1:
        x = np.repeat(x, 2, axis=-1)[..., ::2]
    return x


def _row_valid(row) -> bool:
    r = np.where(np.isnan(row), -np.inf, row)
    return bool(np.isfinite(r).any()) and not bool(np.any(r == np.inf))


@st.composite
def knob_value(draw, name, B):
    """A scalar or per-row value for ``name``, occasionally invalid. Returns (value, valid)."""
    valid_scalar = {
        "temperature": st.one_of(st.just(0.0), st.floats(1e-3, 5.0), st.just(1e-6)),
        "top_k": st.sampled_from([0, -1, 1, 2, 5, 40, 1000]),
        "top_p": st.one_of(st.just(1.0), st.floats(1e-3, 1.0)),
        "min_p": st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
        "repetition_penalty": st.one_of(st.just(1.0), st.floats(0.1, 3.0)),
        "presence_penalty": st.floats(-2.0, 2.0),
        "frequency_penalty": st.floats(-2.0, 2.0),
        "seed": st.integers(0, 2**64 - 1),
        "step": st.integers(0, 2**40),
    }[name]
    invalid_scalar = {
        "temperature": st.sampled_from([-1.0, np.nan, np.inf]),
        "top_k": st.sampled_from([-2, -7]),
        "top_p": st.sampled_from([0.0, 1.5, -0.2, np.nan]),
        "min_p": st.sampled_from([-0.1, 1.01, np.nan]),
        "repetition_penalty": st.sampled_from([0.0, -1.0, np.nan, np.inf]),
        "presence_penalty": st.sampled_from([np.nan, np.inf]),
        "frequency_penalty": st.sampled_from([np.nan, -np.inf]),
        "seed": st.sampled_from([-1, 2**64]),
        "step": st.sampled_from([-1, -100]),
    }[name]
    bad = draw(st.integers(0, 9)) == 0
    per_row = B is not None and draw(st.booleans())
    if not per_row:
        return (draw(invalid_scalar), False) if bad else (draw(valid_scalar), True)
    vals = [draw(valid_scalar) for _ in range(B)]
    valid = True
    if bad and B > 0:
        vals[draw(st.integers(0, B - 1))] = draw(invalid_scalar)
        valid = False
    if draw(st.integers(0, 14)) == 0:  # wrong length
        vals = vals + vals[:1] if B > 0 and draw(st.booleans()) else vals + [vals[0] if vals else 0]
        valid = False
    if name == "seed" and valid and all(isinstance(v, int) for v in vals):
        return np.array(vals, dtype=np.uint64), True
    return vals, valid


@st.composite
def id_list(draw, V, allow_bad):
    ids = draw(st.lists(st.integers(0, max(V - 1, 0)), max_size=8)) if V > 0 else []
    ok = True
    if allow_bad and draw(st.integers(0, 9)) == 0:
        ids = ids + [draw(st.sampled_from([V, V + 3, -1]))]
        ok = False
    return ids, ok


@given(data=st.data(), x=logits_arrays())
@SETTINGS
def test_sample_valid_result_or_clear_exception(data, x):
    kw = {}
    valid = x.dtype == np.float32 and x.ndim in (1, 2)
    B = x.shape[0] if x.ndim == 2 else None
    V = x.shape[-1] if x.ndim >= 1 else 0
    rows = [] if x.ndim not in (1, 2) else (list(x) if x.ndim == 2 else [x])
    if valid:
        valid = all(_row_valid(r) for r in rows)
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "seed", "step"):
        if data.draw(st.booleans()):
            v, ok = data.draw(knob_value(name, B))
            kw[name] = v
            valid &= ok
    nrows = B if B is not None else 1
    allowed_rows = [None] * nrows
    for name in ("prompt_token_ids", "output_token_ids", "allowed_token_ids"):
        if not data.draw(st.booleans()):
            continue
        if B is None:
            ids, ok = data.draw(id_list(V, True))
            kw[name] = ids
            if name == "allowed_token_ids":
                allowed_rows = [ids]
        else:
            lst = []
            ok = True
            for b in range(B):
                if data.draw(st.booleans()):
                    lst.append(None)
                else:
                    ids, ok_b = data.draw(id_list(V, True))
                    ok &= ok_b
                    lst.append(ids)
            kw[name] = lst
            if name == "allowed_token_ids":
                allowed_rows = lst
        valid &= ok
    if data.draw(st.booleans()) and V > 0:
        def one_bias():
            d = data.draw(st.dictionaries(st.integers(0, V - 1),
                                          st.floats(-500, 500), max_size=4))
            ok = True
            if data.draw(st.integers(0, 9)) == 0:
                d[data.draw(st.sampled_from([V, -1]))] = 1.0
                ok = False
            if data.draw(st.integers(0, 14)) == 0:
                d[0] = data.draw(st.sampled_from([np.nan, np.inf]))
                ok = False
            return d, ok
        if B is None:
            d, ok = one_bias()
            kw["logit_bias"] = d
        else:
            lst, ok = [], True
            for _ in range(B):
                d, ok_b = one_bias()
                lst.append(d)
                ok &= ok_b
            kw["logit_bias"] = lst
        valid &= ok
    n = data.draw(st.sampled_from([None, None, 0, 1, 3, 20, 21, -1]))
    if n is not None:
        kw["logprobs"] = n
        valid &= 0 <= n <= 20
    nt = data.draw(st.sampled_from([None, None, 1, 2, 0]))
    kw["n_threads"] = nt
    valid &= nt != 0
    # An allowed set that masks every finite logit is left unspecified by the contract.
    ambiguous = False
    for r, allowed in zip(rows, allowed_rows):
        if allowed is not None and _row_valid(r):
            a = [i for i in allowed if 0 <= i < V]
            rr = np.where(np.isnan(r), -np.inf, r)
            if not np.isfinite(rr[a]).any() if a else True:
                ambiguous = True
    if n is not None and valid and n > V:
        ambiguous = True  # top-n wider than the vocabulary: unspecified
    if x.ndim == 2 and V == 0 and B == 0:
        ambiguous = True  # [0, 0]: empty batch or empty vocabulary, both readings are fine
    if B == 0 and not valid:
        ambiguous = True  # whether an empty batch still validates knob values is unspecified

    try:
        out = sample(x, **kw)
    except (TypeError, ValueError) as e:
        assert str(e), "exception without a message"
        if valid and not ambiguous:
            raise AssertionError(f"valid input rejected: {e!r}") from e
        return
    assert valid or ambiguous, f"invalid input accepted: dtype={x.dtype} shape={x.shape} {kw}"

    toks = out.token_ids if isinstance(out, SampleResult) else out
    toks = np.atleast_1d(np.asarray(toks))
    assert toks.shape == ((B,) if B is not None else (1,))
    if B is None:
        assert isinstance(out.token_ids if isinstance(out, SampleResult) else out,
                          (int, np.integer))
    for b, t in enumerate(toks):
        assert 0 <= t < V
        r = np.where(np.isnan(rows[b]), -np.inf, rows[b])
        assert np.isfinite(r[t]), "drew a NaN/-inf token"
        if allowed_rows[b] is not None:
            assert t in allowed_rows[b]
    if isinstance(out, SampleResult):
        lps = np.atleast_1d(out.logprobs)
        assert lps.shape == toks.shape and np.all(lps <= 1e-6) and np.all(np.isfinite(lps))
        ranks = np.atleast_1d(out.ranks)
        assert np.all((ranks >= 1) & (ranks <= V))
        tt = np.atleast_2d(out.top_token_ids)
        assert tt.shape[-1] == n
        assert np.all((tt >= 0) & (tt < V))
        if B is not None:
            for b in range(B):
                lp, rank, top_ids, top_lps = ref.raw_logprob_info(rows[b], int(toks[b]), n)
                assert ranks[b] == rank
                np.testing.assert_array_equal(tt[b], top_ids)


@given(x=logits_arrays())
@SETTINGS
def test_log_softmax_valid_result_or_clear_exception(x):
    try:
        out = log_softmax(x)
    except (TypeError, ValueError) as e:
        assert str(e)
        if x.dtype == np.float32 and x.ndim in (1, 2) and x.size and all(
                _row_valid(r) for r in np.atleast_2d(x)):
            raise AssertionError(f"valid input rejected: {e!r}") from e
        return
    assert x.ndim in (1, 2), "accepted wrong rank"
    assert out.shape == x.shape and out.dtype == np.float32
    if x.dtype == np.float32:
        for r_in, r_out in zip(np.atleast_2d(x), np.atleast_2d(out)):
            if _row_valid(r_in):
                r = np.where(np.isnan(r_in), -np.inf, r_in)
                fin = np.isfinite(r)
                assert np.all(np.isfinite(r_out[fin]))
                assert np.all(r_out[~fin] == -np.inf)
                assert np.all(r_out[fin] <= 1e-6)
                np.testing.assert_allclose(r_out, ref.log_softmax(r_in), rtol=1e-4, atol=1e-4)


@st.composite
def pool_inputs(draw):
    layout = draw(st.sampled_from(["offsets", "lengths", "mask"]))
    dtype = draw(st.sampled_from([np.float32] * 8 + [np.float64, np.int32, np.complex64]))
    D = draw(st.integers(0, 12))
    valid = dtype == np.float32
    kw = {}
    if layout == "offsets":
        N = draw(st.integers(0, 30))
        B = draw(st.integers(0, 6))
        offs = sorted(draw(st.lists(st.integers(0, N), min_size=B + 1, max_size=B + 1)))
        if draw(st.integers(0, 7)) == 0 and len(offs) > 1:
            offs = offs[::-1]
            valid &= offs == sorted(offs)
        if draw(st.integers(0, 9)) == 0:
            offs[-1] = N + draw(st.integers(1, 3))
            valid = False
        hidden_shape = (N, D)
        kw["offsets"] = np.array(offs, dtype=draw(st.sampled_from([np.int64, np.int32])))
    else:
        B = draw(st.integers(0, 6))
        T = draw(st.integers(0, 10))
        hidden_shape = (B, T, D)
        if layout == "lengths":
            lens = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
            if draw(st.integers(0, 9)) == 0 and B:
                lens[0] = draw(st.sampled_from([-1, T + 1]))
                valid = False
            kw["lengths"] = np.array(lens, dtype=np.int64)
        else:
            kw["mask"] = draw(hnp.arrays(np.bool_, (B, T)))
            if draw(st.integers(0, 9)) == 0:
                kw["mask"] = kw["mask"][:, :-1] if T else np.zeros((B + 1, T), bool)
                valid = False
    if draw(st.integers(0, 14)) == 0:  # wrong rank for the layout
        hidden_shape = hidden_shape[1:] if len(hidden_shape) == 3 else (1,) + hidden_shape
        valid = False
    finite = draw(st.booleans())
    elems = st.floats(-100, 100, width=32) if finite else float_values
    hidden = draw(hnp.arrays(np.float32, hidden_shape, elements=elems))
    with np.errstate(all="ignore"):
        hidden = hidden.astype(dtype) if dtype != np.int32 else np.nan_to_num(hidden).astype(dtype)
    if draw(st.booleans()):
        hidden.flags.writeable = False
    kw["mode"] = draw(st.sampled_from(["mean", "max", "cls", "last", "sum", "bogus"]))
    valid &= kw["mode"] != "bogus"
    kw["normalize"] = draw(st.booleans())
    if draw(st.booleans()):
        kw["dimensions"] = draw(st.integers(-1, D + 1))
        valid &= 1 <= kw["dimensions"] <= D
    if D == 0 and valid:
        valid = None  # D == 0 is unspecified
    return hidden, kw, valid, finite


@given(inp=pool_inputs())
@SETTINGS
def test_pool_valid_result_or_clear_exception(inp):
    hidden, kw, valid, finite = inp
    try:
        out = pool(hidden, **kw)
    except (TypeError, ValueError) as e:
        assert str(e)
        if valid:
            raise AssertionError(f"valid input rejected: {e!r}") from e
        return
    assert valid is not False, f"invalid input accepted: {hidden.dtype} {hidden.shape} {kw}"
    if valid is None:
        return
    D = hidden.shape[-1]
    B = kw["offsets"].size - 1 if "offsets" in kw else hidden.shape[0]
    assert out.dtype == np.float32
    assert out.shape == (B, kw.get("dimensions") or D)
    if finite:
        want = ref.pool(hidden, **kw)
        assert np.all(np.isfinite(out)) or not np.all(np.isfinite(want))
        with np.errstate(all="ignore"):
            np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("fn", ["sample", "log_softmax", "pool"])
def test_non_array_garbage(fn):
    for junk in (None, "abc", [[1, 2], [3]], {"a": 1}, object()):
        try:
            if fn == "sample":
                sample(junk)
            elif fn == "log_softmax":
                log_softmax(junk)
            else:
                pool(junk, offsets=np.array([0, 1]))
        except (TypeError, ValueError) as e:
            assert str(e)
        else:
            raise AssertionError(f"{fn} accepted {junk!r}")
