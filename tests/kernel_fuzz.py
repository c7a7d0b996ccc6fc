"""Extreme-float fuzz of ``tep.kernels.sample``, shared by two tests.

tests/test_sampling_extremes.py runs it in-process; tests/test_kernel_asan.py runs this file
as a script against a copy of the sampling kernel built with AddressSanitizer, where a read
outside a buffer aborts the process instead of returning a plausible token.

Every knob is drawn from a pool of edge values (0, 5e-324, 1e-300, float32 denormals,
the smallest normal float32, temperatures around the greedy threshold, +-3e38, values
that overflow float32); logits mix ordinary values with denormals, +-3e38, NaN and -inf.
Each case switches an arbitrary subset of the knobs on (all 2**12 subsets are visited in
turn), and consecutive calls change V so that scratch memory left by one call meets the
next. A call must either return tokens in [0, V) that the row allows, with a finite raw
logit, or raise ValueError - and only when the contract says so (a knob outside its
documented float32 range, or a row with no usable logit).
"""
from __future__ import annotations

import itertools
import sys
import time

import numpy as np

from tep.kernels import SampledRows, SampleResult, TokenSpans, sample

F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)

LOGIT_EDGES = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-40, 1e-38, 1.1754944e-38, 1e-30, 1e30,
                        -1e30, 3e38, -3e38, F32_MAX, -F32_MAX, np.nan, -np.inf], np.float32)
T_GREEDY = float(np.float32(1e-5))

# (valid values, values the wrapper must refuse with ValueError)
POOLS: dict[str, tuple[list, list]] = {
    "temperature": ([0.0, 5e-324, 1e-300, 1e-46, 1e-45, 1e-40, 1e-38, 9.99999e-6,
                     T_GREEDY * (1 - 1e-9), T_GREEDY, 1.0000001e-5, 1.00001e-5, 0.5, 1.0,
                     7.0, 1e30, 3e38, F32_MAX],
                    [3.5e38, 1e300]),
    "top_p": ([5e-324, 1e-300, 1e-46, 1e-45, 1e-40, 1e-38, F32_TINY, 1e-30, 1e-3, 0.5,
               0.9, 0.999999, 1 - 1e-9, 1.0], []),
    "min_p": ([0.0, 5e-324, 1e-300, 1e-46, 1e-45, 1e-40, 1e-38, 1e-30, 0.01, 0.5,
               0.999999, 1.0], []),
    "repetition_penalty": ([F32_TINY, 1e-30, 0.5, 1.0, 1.3, 1e30, 3e38],
                           [5e-324, 1e-300, 1e-40, 1e39]),
    "presence_penalty": ([0.0, 5e-324, 1e-300, -1e-45, 2.0, -2.0, 1e30, -3e38, 3e38],
                         [1e39, -1e300]),
    "frequency_penalty": ([0.0, 5e-324, 1e-300, 1e-45, 2.0, -2.0, 1e30, -3e38, 3e38],
                          [-1e39]),
}
KNOBS = ["temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
         "frequency_penalty", "allowed", "bias", "history", "logprobs", "bitmask"]
VOCABS = [1, 2, 3, 63, 64, 65, 257, 1000, 4099, 20000]


def _row(rng: np.random.Generator, V: int) -> np.ndarray:
    kind = rng.integers(4)
    if kind == 0:
        x = (rng.standard_normal(V) * 3).astype(np.float32)
    elif kind == 1:                       # edge values only
        x = rng.choice(LOGIT_EDGES, V)
    else:                                 # ordinary values with edges sprinkled in
        x = (rng.standard_normal(V) * rng.choice([1e-3, 1, 30])).astype(np.float32)
        n = int(rng.integers(1, max(2, V // 4) + 1))
        x[rng.integers(0, V, n)] = rng.choice(LOGIT_EDGES, n)
    if rng.integers(8) == 0:              # exact ties at the top
        x[rng.integers(0, V, 3)] = np.float32(np.nanmax(np.where(np.isnan(x), -np.inf, x)))
    return x


def _usable(raw: np.ndarray, allowed, logprobs: bool) -> int:
    """0 when the contract lets this row sample, else the RowStatus it must get: the
    processed row (after allowed_token_ids; edits keep finite values finite) must hold a
    finite value and no +inf; the raw row must hold no +inf when logprobs are asked for."""
    r = np.where(np.isnan(raw), -np.inf, raw)
    proc = r
    if allowed is not None:
        proc = np.full_like(r, -np.inf)
        proc[allowed] = r[allowed]
    if np.any(proc == np.inf):
        return 2
    if not np.isfinite(proc).any():
        return 4 if allowed is not None and np.any(r > -np.inf) else 1
    if logprobs and np.any(r == np.inf):
        return 2
    return 0


def _knob_value(rng, name, V):
    if name == "top_k":
        return int(rng.choice([0, -1, 1, 2, 5, 63, 64, 65, V - 1, V, V + 1, 2**31, 2**62,
                               2**63, 2**100])), True
    good, bad = POOLS[name]
    if bad and rng.integers(12) == 0:
        return float(rng.choice(bad)), False
    return float(rng.choice(good)), True


def one_case(rng: np.random.Generator, on: set, V: int) -> None:
    """Run one sample() call with the knobs in ``on`` switched on; assert the contract."""
    B = int(rng.integers(1, 4))
    x = np.stack([_row(rng, V) for _ in range(B)])
    kw: dict = {"seed": int(rng.integers(0, 2**63)), "step": int(rng.integers(0, 2**40))}
    knobs_ok = True
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty"):
        if name in on:
            v, ok = _knob_value(rng, name, V)
            if rng.integers(3) == 0 and name != "top_k":   # per-row values
                vals = [v] + [_knob_value(rng, name, V)[0] for _ in range(B - 1)]
                ok = all(any(u == g for g in POOLS[name][0]) for u in vals)
                kw[name] = vals
            else:
                kw[name] = v
            knobs_ok &= ok
    allowed = [None] * B
    if "allowed" in on:
        allowed = [sorted(set(rng.integers(0, V, int(rng.integers(1, 6))).tolist()))
                   for _ in range(B)]
        kw["allowed_token_ids"] = allowed
    if "bitmask" in on:
        W = (V + 31) // 32 + int(rng.integers(0, 2))
        bits = rng.random((B, W * 32)) < rng.choice([0.0, 0.05, 0.5, 1.0])
        mask = np.packbits(bits, axis=1, bitorder="little").view(np.int32).copy()
        mask[rng.random(mask.shape) < 0.2] = -1
        kw["token_bitmask"] = mask
        unpacked = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, :V]
        for b in range(B):
            ok_ids = set(np.flatnonzero(unpacked[b]).tolist())
            allowed[b] = sorted(ok_ids if allowed[b] is None else ok_ids & set(allowed[b]))
    if "bias" in on:
        kw["logit_bias"] = [{int(t): float(rng.choice([100.0, -100.0, 1e39, -1e300, 5e-324,
                                                       3e38, 0.5]))
                             for t in rng.integers(0, V, 3)} for _ in range(B)]
    if "history" in on:
        hist = rng.integers(0, V, int(rng.integers(1, 40))).astype(np.int32)
        if rng.integers(2):
            # unchecked spans: ids outside [0, V) must be skipped by the kernel
            ids = np.concatenate([hist, np.array([-1, V, 2**31 - 1, -2**31], np.int32)])
            rng.shuffle(ids)
            starts = rng.integers(0, ids.size + 1, B)
            ends = np.minimum(starts + rng.integers(0, ids.size + 1, B), ids.size)
            kw["output_token_ids"] = TokenSpans(ids, starts, ends)
            kw["prompt_token_ids"] = TokenSpans(ids, np.zeros(B, np.int64),
                                                np.full(B, ids.size, np.int64))
        else:
            kw["output_token_ids"] = [hist.tolist()] * B
            kw["prompt_token_ids"] = [hist[::-1].tolist()] * B
    n_top = 0
    if "logprobs" in on:
        n_top = int(min(V, rng.choice([0, 1, 5, 20])))
        kw["logprobs"] = n_top
    expected = [_usable(x[b], allowed[b], "logprobs" in on) for b in range(B)]
    row_status = bool(rng.integers(2))
    try:
        out = sample(x, row_status=row_status, n_threads=int(rng.integers(1, 3)), **kw)
    except ValueError as e:
        if knobs_ok and (row_status or not any(expected)):
            raise AssertionError(f"valid call refused: {e!r}; V={V} {kw}") from e
        return
    assert knobs_ok, f"invalid knob accepted: V={V} {kw}"
    status = np.zeros(B, np.int32)
    if row_status:
        assert isinstance(out, SampledRows)
        status = np.asarray(out.status)
        np.testing.assert_array_equal(status, expected, err_msg=f"V={V} {kw}")
        lp = out.logprobs
        toks = np.asarray(out.token_ids)
    else:
        assert not any(expected), f"unusable row accepted: V={V} {kw}"
        lp = out if isinstance(out, SampleResult) else None
        toks = np.asarray(out.token_ids if lp is not None else out)
    for b in range(B):
        t = int(toks[b])
        if status[b]:
            assert t == -1
            continue
        assert 0 <= t < V, f"token {t} outside [0, {V}): {kw}"
        assert np.isfinite(x[b, t]), f"drew a NaN/-inf token {t}: {x[b]} {kw}"
        if allowed[b] is not None:
            assert t in allowed[b], f"token {t} not allowed {allowed[b]}: {kw}"
        if lp is not None:
            tops = np.asarray(lp.top_token_ids)[b]
            assert tops.shape == (n_top,) and ((tops >= 0) & (tops < V)).all()
            assert 1 <= int(np.asarray(lp.ranks)[b]) <= V


def crash_repro() -> None:
    """The report that started this file: top_p 0 in float32 with top_k and logprobs."""
    x = (np.random.default_rng(4).standard_normal(257) * 3).astype(np.float32)
    for _ in range(3):
        r = sample(x, top_k=5, top_p=1e-300, seed=0, logprobs=5)
        assert r.token_ids == int(np.argmax(x)), r
        assert sample(x, min_p=0.1, top_p=1e-300, seed=1) == int(np.argmax(x))
        assert sample(x, top_k=5, top_p=1e-300, seed=2,
                      allowed_token_ids=[3, 9, 200]) in (3, 9, 200)


def run(cases: int, seed: int = 0, budget_s: float = 1e9) -> int:
    """Run ``cases`` fuzz cases (cycling through every knob subset); returns how many ran."""
    crash_repro()
    rng = np.random.default_rng(seed)
    subsets = itertools.cycle(range(2 ** len(KNOBS)))
    t0 = time.monotonic()
    n = 0
    for n in range(1, cases + 1):
        mask = next(subsets)
        on = {k for i, k in enumerate(KNOBS) if mask >> i & 1}
        # alternate large and small vocabularies: stale scratch meets the next call
        V = VOCABS[(n * 7) % len(VOCABS)] if n % 2 else int(rng.choice(VOCABS[:6]))
        one_case(rng, on, V)
        if time.monotonic() - t0 > budget_s:
            break
    return n


if __name__ == "__main__":
    cases = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
    budget = float(sys.argv[2]) if len(sys.argv) > 2 else 1e9
    print(f"fuzz: {run(cases, budget_s=budget)} cases ok")
