"""Extreme-float fuzz of ``tep.kernels.sample`` and the speculative ``verify`` /
``verify_rejection``, and a random-program fuzz of the n-gram draft index, shared by two
tests.

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

Every third case also verifies drafts (:func:`verify_case`): ragged draft counts (0..16),
draft ids sometimes outside [0, V) (a ValueError, never a read past the row), the same
edge logits and knobs, draft probabilities that are sometimes not a distribution. An
accepted run must repeat the drafts, end with an allowed finite-logit token, and - for
rows without penalties, where each row stands alone - equal ``sample`` at the same
(seed, step + j).

Every third case also runs a random program on an n-gram index (:func:`ngram_case`):
random sizes and reach, vocabularies from 1 token to 2**31, prompts long enough to grow
and rehash the tables, slots out of range, released slots, negative k and bad token ids
mixed in. Each lookup must equal the scanning reference, each bad call must raise and
change nothing, and the index's memory must return to its baseline.
"""
from __future__ import annotations

import itertools
import sys
import time

import numpy as np

from tep._kernels.ngram import NgramIndex
from tep.kernels import (SampledRows, SampleResult, TokenSpans, Verified, sample, verify,
                         verify_rejection)

try:
    from support.ngram_reference import scan
except ImportError:          # run as a script (tests/kernels/test_kernel_asan.py)
    from ngram_reference import scan  # type: ignore[no-redef]

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


def verify_case(rng: np.random.Generator, V: int) -> None:
    """One ``verify`` (or ``verify_rejection``) call on edge logits; assert the contract."""
    B = int(rng.integers(1, 4))
    K = int(rng.integers(1, 17))
    nd = rng.integers(0, K + 1, B)
    nd[int(rng.integers(B))] = K                       # K is the longest row
    drafts = rng.integers(0, V, (B, K)).astype(np.int32)
    bad_id = bool(rng.integers(8) == 0)
    if bad_id:
        drafts[int(rng.integers(B)), int(rng.integers(K))] = int(rng.choice([-1, V, 2**31 - 1]))
    N = int((nd + 1).sum())
    x = np.stack([_row(rng, V) for _ in range(N)])
    # a draft that is the row's argmax sometimes, so runs get accepted
    start = np.concatenate([[0], np.cumsum(nd + 1)[:-1]])
    for b in range(B):
        for j in range(int(nd[b])):
            if rng.integers(2) and 0 <= drafts[b, j] < V:
                x[start[b] + j, drafts[b, j]] = 50.0
    seed = [int(s) for s in rng.integers(0, 2**63, B)]
    step = [int(s) for s in rng.integers(0, 2**40, B)]
    T = [float(rng.choice([0.0, T_GREEDY, 0.7, 1.0, 3e38, 1e-300])) for _ in range(B)]
    used_bad = bad_id and any(not 0 <= drafts[b, j] < V for b in range(B)
                              for j in range(int(nd[b])))
    if rng.integers(4) == 0:                           # rejection sampling
        M = int(nd.sum())
        q = rng.random((M, V)).astype(np.float32)
        q /= q.sum(axis=1, keepdims=True)
        if M and rng.integers(4) == 0:
            q[int(rng.integers(M)), 0] = rng.choice([np.nan, -1.0, 3e38])
        try:
            out = verify_rejection(x, drafts, q, n_draft=nd, temperature=T, seed=seed,
                                   step=step, row_status=True)
        except ValueError:
            return
        assert not used_bad, f"an out-of-range draft was accepted: {drafts} {nd}"
        _check_verified(out, x, drafts, nd, start, V, None)
        return
    kw: dict = {"temperature": T}
    allowed: list = [None] * B
    if rng.integers(2):
        kw["top_k"] = int(rng.choice([0, 1, 5, V]))
        kw["top_p"] = float(rng.choice([1.0, 0.9, 1e-300]))
        kw["min_p"] = float(rng.choice([0.0, 0.05, 1.0]))
    if rng.integers(3) == 0:
        allowed = [sorted(set(rng.integers(0, V, 4).tolist())) for _ in range(B)]
        kw["allowed_token_ids"] = allowed
    if rng.integers(3) == 0:
        W = (V + 31) // 32
        bits = rng.random((N, W * 32)) < rng.choice([0.05, 0.5, 1.0])
        kw["token_bitmask"] = np.packbits(bits, axis=1, bitorder="little").view(np.int32).copy()
    penalized = bool(rng.integers(4) == 0)
    if penalized:
        kw["repetition_penalty"] = 1.3
        kw["frequency_penalty"] = 0.5
        kw["output_token_ids"] = [rng.integers(0, V, 5).tolist() for _ in range(B)]
    if rng.integers(3) == 0:
        kw["logprobs"] = int(min(V, rng.choice([0, 2])))
    try:
        out = verify(x, drafts, n_draft=nd, seed=seed, step=step, row_status=True,
                     n_threads=int(rng.integers(1, 3)), **kw)
    except ValueError as e:
        assert used_bad, f"a valid verify call was refused: {e!r}; V={V} nd={nd} {kw}"
        return
    assert not used_bad, f"an out-of-range draft was accepted: {drafts} {nd}"
    _check_verified(out, x, drafts, nd, start, V, allowed)
    if penalized or "token_bitmask" in kw:
        return
    for b in range(B):                                 # each row alone: sample's own draws
        for j in range(int(out.n_tokens[b])):
            if out.status[b] and j == int(out.n_tokens[b]) - 1:
                break
            one = {k: (v[b] if isinstance(v, list) else v) for k, v in kw.items()
                   if k in ("temperature", "top_k", "top_p", "min_p")}
            if allowed[b] is not None:
                one["allowed_token_ids"] = allowed[b]
            want = sample(x[start[b] + j], seed=seed[b], step=step[b] + j, **one)
            assert int(out.token_ids[b, j]) == int(want), (b, j, kw)


def _check_verified(out: Verified, x: np.ndarray, drafts: np.ndarray, nd: np.ndarray,
                    start: np.ndarray, V: int, allowed: list | None) -> None:
    for b in range(drafts.shape[0]):
        n = int(out.n_tokens[b])
        assert 0 <= n <= int(nd[b]) + 1, (n, nd[b])
        assert (out.token_ids[b, n:] == -1).all()
        ok = n - (1 if out.status[b] else 0)
        for j in range(n):
            t = int(out.token_ids[b, j])
            assert 0 <= t < V, f"token {t} outside [0, {V})"
            assert np.isfinite(x[start[b] + j, t]), f"drew a NaN/-inf token {t}"
            if j < n - 1:
                assert t == int(drafts[b, j]), "an accepted run must repeat the drafts"
            if allowed is not None and allowed[b] is not None and j < ok:
                assert t in allowed[b], (t, allowed[b])   # a draft too: it was sampled


def _refused(exc: type, fn, *args) -> None:
    try:
        fn(*args)
    except exc:
        return
    raise AssertionError(f"{fn.__name__}{args!r:.200} was accepted; expected {exc.__name__}")


def ngram_case(rng: np.random.Generator) -> None:
    """One random program on an NgramIndex; assert the contract (see the module docstring)."""
    sizes = tuple(int(n) for n in rng.permutation(np.arange(1, 6))[:int(rng.integers(1, 5))])
    reach = int(rng.integers(0, 40))
    S = int(rng.integers(1, 5))
    vocab = int(rng.choice([1, 2, 3, 50, 2**31]))
    ix = NgramIndex(S, sizes, reach)
    base = ix.nbytes
    toks: list = [None] * S

    def ids(n: int) -> np.ndarray:
        t = rng.integers(0, vocab, n)
        if n and rng.integers(10) == 0:                    # a bad id: refused, no change
            t[int(rng.integers(n))] = int(rng.choice([-1, -2**31, 2**31, 2**40]))
        return t

    for _ in range(int(rng.integers(1, 40))):
        s = int(rng.integers(0, S)) if rng.integers(8) else int(rng.choice([-1, S]))
        op = int(rng.integers(5))
        if 0 <= s < S and toks[s] is None and rng.integers(4):
            op = 0                                         # mostly admit a free slot
        bad = not 0 <= s < S
        if op == 0:
            t = ids(int(rng.choice([0, 1, 5, 40, 600])))
            if bad:
                _refused(IndexError, ix.admit, s, t)
            elif t.size and (t.min() < 0 or t.max() > 2**31 - 1):
                _refused(ValueError, ix.admit, s, t)
            else:
                ix.admit(s, t)
                toks[s] = t.tolist()
        elif op == 1:
            t = ids(int(rng.integers(0, 9)))
            form = t.tolist() if rng.integers(2) else t
            if bad:
                _refused(IndexError, ix.extend, s, form)
            elif toks[s] is None or (t.size and (t.min() < 0 or t.max() > 2**31 - 1)):
                _refused(ValueError, ix.extend, s, form)
            else:
                ix.extend(s, form)
                toks[s] += t.tolist()
        elif op == 2:
            k = int(rng.integers(-1, 20))
            if bad:
                _refused(IndexError, ix.propose, s, k)
            elif toks[s] is None or k < 0:
                _refused(ValueError, ix.propose, s, k)
            else:
                assert ix.propose(s, k) == scan(toks[s], k, sizes, reach), (sizes, reach)
        elif op == 3:
            B = int(rng.integers(0, 6))
            sl = rng.integers(-1, S + 1, B)
            kk = rng.integers(-1, 20, B)
            # rows are checked in order: the first bad one names the error
            err = next((IndexError if not 0 <= x < S else ValueError
                        for x, k in zip(sl.tolist(), kk.tolist())
                        if not 0 <= x < S or toks[x] is None or k < 0), None)
            if err is not None:
                _refused(err, ix.propose_many, sl, kk)
            else:
                d, n, m = ix.propose_many(sl, kk)
                lists, lm = ix.propose_lists(sl.tolist(), kk.tolist())
                for r in range(B):
                    want, wm = scan(toks[sl[r]], int(kk[r]), sizes, reach)
                    assert d[r, :n[r]].tolist() == want and m[r] == wm, (sizes, reach)
                    assert (d[r, n[r]:] == -1).all()
                    assert lists[r] == want and lm[r] == wm
        elif bad:
            _refused(IndexError, ix.release, s)
        else:
            ix.release(s)
            toks[s] = None
    for s in range(S):
        ix.release(s)
    assert ix.nbytes == base, (ix.nbytes, base)


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
        if n % 3 == 0:
            verify_case(rng, V)
        if n % 3 == 1:
            ngram_case(rng)
        if time.monotonic() - t0 > budget_s:
            break
    return n


if __name__ == "__main__":
    cases = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
    budget = float(sys.argv[2]) if len(sys.argv) > 2 else 1e9
    print(f"fuzz: {run(cases, budget_s=budget)} cases ok")
