"""The compiled n-gram index (tep/_kernels/ngram.pyx) and NgramDrafter against plain-Python
references of the lookup rule (tests/support/ngram_reference.py): random token streams
over small vocabularies (so n-grams recur), random admit / extend / propose / release
interleavings over many slots, 100k-token streams, bad input, and memory that returns to
its baseline after release."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.ngram_reference import PyNgramDrafter, PyNgramIndex, scan
from tep._kernels.ngram import NgramIndex
from tep.engine.speculative import MATCH_REACH, NGRAM_SIZES, NgramDrafter, match_kind

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
FORMS = ("tuple", "list", "int64", "int32")


def _as(form: str, toks: list[int]):
    return {"tuple": tuple, "list": list, "int64": lambda t: np.asarray(t, np.int64),
            "int32": lambda t: np.asarray(t, np.int32)}[form](toks)


@st.composite
def programs(draw, max_slots: int = 6):
    """(slots, vocab, ops): a random interleaving of the drafter's operations."""
    slots = draw(st.integers(1, max_slots))
    vocab = draw(st.integers(1, 6))
    slot, tok = st.integers(0, slots - 1), st.integers(0, vocab - 1)
    op = st.one_of(
        st.tuples(st.just("admit"), slot, st.lists(tok, max_size=40), st.sampled_from(FORMS)),
        st.tuples(st.just("extend"), slot, st.lists(tok, max_size=8), st.sampled_from(FORMS)),
        st.tuples(st.just("propose"), slot, st.integers(-1, 10)),
        st.tuples(st.just("many"), st.dictionaries(slot, st.integers(-1, 10), max_size=8)),
        st.tuples(st.just("release"), slot),
    )
    return slots, vocab, draw(st.lists(op, max_size=80))


@SETTINGS
@given(programs())
def test_drafter_matches_the_python_reference(prog):
    slots, _, ops = prog
    d, ref = NgramDrafter(slots), PyNgramDrafter(slots)
    for op in ops:
        name = op[0]
        if name == "admit":
            d.admit(op[1], _as(op[3], op[2]))
            ref.admit(op[1], op[2])
        elif name == "extend":
            d.extend(op[1], _as(op[3], op[2]))
            ref.extend(op[1], op[2])
        elif name == "propose":
            assert d.propose(op[1], op[2]) == ref.propose(op[1], op[2])
        elif name == "many":
            assert d.propose_many(op[1]) == ref.propose_many(op[1])
        else:
            d.release(op[1])
            ref.release(op[1])
        assert d.kind == ref.kind


@SETTINGS
@given(programs(max_slots=4),
       st.lists(st.integers(1, 5), min_size=1, max_size=4, unique=True),
       st.integers(0, 12))
def test_index_follows_the_rule_for_any_sizes_and_reach(prog, sizes, reach):
    """Any size order and reach: each lookup is what scanning the history gives."""
    slots, _, ops = prog
    ix = NgramIndex(slots, sizes, reach)
    toks: list[list[int] | None] = [None] * slots
    for op in ops:
        name, s = op[0], op[1]
        if name == "admit":
            ix.admit(s, _as(op[3], op[2]))
            toks[s] = list(op[2])
        elif name == "release":
            ix.release(s)
            toks[s] = None
        elif name == "many":
            pairs = [(s, k) for s, k in op[1].items() if toks[s] is not None and k >= 0]
            pairs += pairs[:2]                    # a slot may appear twice
            sl = np.array([s for s, _ in pairs], np.int64)
            kk = np.array([k for _, k in pairs], np.int64)
            drafts, n, m = ix.propose_many(sl, kk)
            lists, lm = ix.propose_lists(sl.tolist(), kk.tolist())
            assert drafts.dtype == np.int32 and drafts.shape[0] == len(pairs)
            for r, (s, k) in enumerate(pairs):
                want, wm = scan(toks[s], k, sizes, reach)
                assert drafts[r, :n[r]].tolist() == want and m[r] == wm
                assert (drafts[r, n[r]:] == -1).all()
                assert lists[r] == want and lm[r] == wm
        elif toks[s] is None:                     # extend / propose on a released slot
            with pytest.raises(ValueError, match="holds no sequence"):
                if name == "extend":
                    ix.extend(s, op[2])
                else:
                    ix.propose(s, max(op[2], 0))
        elif name == "extend":
            ix.extend(s, _as(op[3], op[2]))
            toks[s] += op[2]
        elif op[2] >= 0:
            assert ix.propose(s, op[2]) == scan(toks[s], op[2], sizes, reach)
            assert ix.length(s) == len(toks[s])


def test_known_examples_and_kinds():
    ix = NgramIndex(2, NGRAM_SIZES, MATCH_REACH)
    ix.admit(0, [1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2])
    assert ix.propose(0, 3) == ([3, 7, 8], 2)     # after the latest "1 2"
    ix.extend(0, [3])
    assert ix.propose(0, 5) == ([7, 8, 1, 2, 3], 3)
    ix.admit(1, [4, 5, 6])
    assert ix.propose(1, 4) == ([], 0)
    assert ix.propose(0, 0) == ([], 0)
    big = 2**31 - 1                               # the largest id
    ix.admit(1, [big, 0, big, 0, big])
    assert ix.propose(1, 9) == ([0, big], 3)
    d = NgramDrafter(1)
    run = list(range(100, 160))
    d.admit(0, run + [7] + run)                   # a 60-token copy: the match caps at reach
    assert d.propose(0, 2) == [7, 100] and d.kind[0] == match_kind(MATCH_REACH)


def _stream(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    """Random tokens with copied runs of earlier text (so long matches exist)."""
    out = list(rng.integers(0, vocab, 300))
    while len(out) < n:
        if rng.random() < 0.5:
            a = int(rng.integers(0, len(out)))
            out += out[a:a + int(rng.integers(1, 200))]
        else:
            out += rng.integers(0, vocab, int(rng.integers(1, 100))).tolist()
    return np.asarray(out[:n], np.int64)


@pytest.mark.parametrize("vocab", [3, 50, 50_000])
def test_long_streams(vocab):
    rng = np.random.default_rng(vocab)
    n = 100_000
    toks = _stream(rng, n, vocab)
    ix, ref = NgramIndex(2, NGRAM_SIZES, MATCH_REACH), PyNgramIndex(2)
    ix.admit(1, toks[:300])
    ref.admit(1, toks[:300].tolist())
    at = 300
    while at < n:
        c = int(rng.integers(1, 65))
        chunk = toks[at:at + c]
        ix.extend(1, chunk if c % 2 else tuple(chunk.tolist()))
        ref.extend(1, chunk.tolist())
        at += len(chunk)
        k = int(rng.integers(1, 9))
        assert ix.propose(1, k) == ref.propose(1, k)
    assert ix.length(1) == n
    assert ix.propose(1, 16) == scan(toks.tolist(), 16)
    # memory stays proportional to the tokens: the buffer + 3 tables at load >= 1/4
    assert ix.nbytes < n * (4 * 2 + 3 * 8 * 4) + 4096
    ix.release(1)


def test_propose_many_matches_propose():
    rng = np.random.default_rng(1)
    S = 64
    ix = NgramIndex(S, NGRAM_SIZES, MATCH_REACH)
    ref = PyNgramIndex(S)
    for s in range(S):
        t = _stream(rng, 300 + 10 * s, 20 + s).tolist()
        ix.admit(s, t)
        ref.admit(s, t)
    for _ in range(20):
        ks = rng.integers(0, 9, S)
        drafts, n, m = ix.propose_many(np.arange(S), ks)
        assert drafts.shape == (S, ks.max())
        for s in range(S):
            want, wm = ref.propose(s, int(ks[s]))
            assert drafts[s, :n[s]].tolist() == want and m[s] == wm
            t = int(rng.integers(0, 20 + s))
            ix.extend(s, (t,))
            ref.extend(s, [t])
    empty = ix.propose_many(np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert empty[0].shape == (0, 0) and empty[1].shape == empty[2].shape == (0,)


def test_bad_input_raises():
    with pytest.raises(ValueError):
        NgramIndex(0, NGRAM_SIZES, MATCH_REACH)
    with pytest.raises(ValueError):
        NgramIndex(2, (), MATCH_REACH)
    with pytest.raises(ValueError):
        NgramIndex(2, (3, 0), MATCH_REACH)
    with pytest.raises(ValueError):
        NgramIndex(2, NGRAM_SIZES, -1)
    ix = NgramIndex(2, NGRAM_SIZES, MATCH_REACH)
    for slot in (2, -1, 10**6):
        with pytest.raises(IndexError):
            ix.admit(slot, [1, 2])
        with pytest.raises(IndexError):
            ix.propose(slot, 1)
        with pytest.raises(IndexError):
            ix.live(slot)
    with pytest.raises(ValueError, match="holds no sequence"):
        ix.propose(0, 1)                          # never admitted
    with pytest.raises(ValueError, match="holds no sequence"):
        ix.extend(0, [1])
    ix.admit(0, [1, 2, 1, 2])
    with pytest.raises(ValueError, match="k must be"):
        ix.propose(0, -1)
    for bad in ([1, -1], np.array([3, -2]), [2**31], np.array([2**31], np.int64)):
        with pytest.raises(ValueError, match="token ids"):
            ix.extend(0, bad)
        with pytest.raises(ValueError, match="token ids"):
            ix.admit(1, bad)
    for bad in ([1.5], np.array([1.0, 2.0]), np.array([True])):
        with pytest.raises(TypeError):
            ix.extend(0, bad)
    with pytest.raises(ValueError, match="one-dimensional"):
        ix.admit(1, np.zeros((2, 2), np.int64))
    assert ix.length(0) == 4                      # a refused extend appends nothing
    assert not ix.live(1)                         # a refused admit admits nothing
    with pytest.raises(ValueError, match="same length"):
        ix.propose_many([0, 0], [1])
    with pytest.raises(ValueError, match="k must be"):
        ix.propose_many([0], [-1])
    with pytest.raises(ValueError, match="holds no sequence"):
        ix.propose_many([0, 1], [1, 1])
    with pytest.raises(IndexError):
        ix.propose_many([0, 5], [1, 1])
    with pytest.raises(TypeError):
        ix.propose_many(np.array([0.0]), [1])
    with pytest.raises(TypeError):
        ix.propose_lists([0.0], [1])              # a float is refused, not truncated
    with pytest.raises(ValueError, match="holds no sequence"):
        ix.propose_lists([1], [0])
    with pytest.raises(ValueError, match="k must be"):
        ix.propose_lists([0], [-2])
    ix.release(0)
    with pytest.raises(ValueError, match="holds no sequence"):
        ix.propose(0, 1)
    ix.release(0)                                 # releasing twice is harmless
    d = NgramDrafter(2)                           # the drafter: a free slot drafts nothing
    d.extend(1, [1])
    assert d.propose(1, 3) == [] and d.propose_many({1: 3, 0: 0}) == {1: [], 0: []}
    d.admit(0, [5, 6, 5])
    assert d.propose_many({1: 3, 0: 2}) == {1: [], 0: [6, 5]}
    with pytest.raises(ValueError, match="token ids"):
        d.extend(0, [-1])                         # a live slot's bad id is still an error
    with pytest.raises(IndexError):
        d.propose(7, 1)


def test_memory_returns_to_baseline_after_release():
    rng = np.random.default_rng(2)
    ix = NgramIndex(8, NGRAM_SIZES, MATCH_REACH)
    base = ix.nbytes
    for cycle in range(200):
        s = cycle % 8
        ix.admit(s, _stream(rng, 300, 40))
        if cycle % 3 == 0:
            ix.admit(s, [1, 2, 3])                # admitting over a live slot frees it
        for _ in range(20):
            ix.extend(s, (int(rng.integers(0, 40)),))
            ix.propose(s, 4)
        assert ix.nbytes > base
        if cycle % 2:
            ix.release(s)
    for s in range(8):
        ix.release(s)
    assert ix.nbytes == base
    d = NgramDrafter(4)
    base = d.nbytes
    for cycle in range(50):
        d.admit(cycle % 4, list(range(500)) * 2)
        d.propose_many({cycle % 4: 4})
        d.release(cycle % 4)
    assert d.nbytes == base


def test_a_call_during_propose_many_in_another_thread_is_refused_not_a_crash():
    """propose_many drops the GIL: a release / admit racing it raises RuntimeError."""
    import threading
    import time

    ix = NgramIndex(16, NGRAM_SIZES, MATCH_REACH)
    rng = np.random.default_rng(3)
    for s in range(16):
        ix.admit(s, rng.integers(0, 4, 4000))
    stop, seen = threading.Event(), []

    def worker():
        while not stop.is_set():
            try:
                ix.propose_many(np.arange(16), np.full(16, 8))
            except ValueError:        # a slot caught between release and admit
                pass
            except Exception as e:    # noqa: BLE001
                seen.append(e)

    th = threading.Thread(target=worker)
    th.start()
    refused, t0 = 0, time.monotonic()
    try:
        while time.monotonic() - t0 < 0.5:
            s = int(rng.integers(16))
            try:
                ix.release(s)
                ix.admit(s, rng.integers(0, 4, 4000))
            except RuntimeError:
                refused += 1
    finally:
        stop.set()
        th.join()
    assert not seen
    for s in range(16):
        if not ix.live(s):
            ix.admit(s, [1])
        assert ix.propose(s, 2) is not None


def test_a_token_whose_index_releases_the_slot_is_caught():
    """Converting the arguments may run Python code: the slot is checked after it."""
    ix = NgramIndex(2, NGRAM_SIZES, MATCH_REACH)
    ix.admit(0, [1, 2, 3])

    class Sneaky:
        def __init__(self, value: int) -> None:
            self.value = value

        def __index__(self) -> int:
            ix.release(0)
            return self.value

    with pytest.raises(ValueError, match="holds no sequence"):
        ix.extend(0, [Sneaky(4)])                 # a token id
    ix.admit(0, [1, 2, 3])
    with pytest.raises(ValueError, match="holds no sequence"):
        ix.propose_lists([Sneaky(0)], [2])        # a slot
    assert not ix.live(0) and ix.nbytes == NgramIndex(2, NGRAM_SIZES, MATCH_REACH).nbytes
