"""Plain-Python references for the n-gram draft lookup (tep/_kernels/ngram.pyx), written
from the rule in docs/SPECULATIVE.md and tep.engine.speculative: a test oracle and the
benchmark's "before", not a production path.

The rule: for n in the sizes, in order, look up the last n tokens among the n-grams that
end before the last token; the first size found wins, with its latest occurrence. The
drafts are the (up to k) tokens after it; the match length is n extended backwards while
the tokens before both occurrences agree, measured up to ``reach`` tokens back and never
past the start of the sequence.

- :func:`scan`: the rule by scanning the whole history (no index at all).
- :class:`PyNgramIndex`: the same with dicts n-gram -> position after the latest
  occurrence, indexed lazily at each lookup (the Python implementation the compiled index
  replaced), with :class:`tep._kernels.ngram.NgramIndex`'s methods.
- :class:`PyNgramDrafter`: the engine-facing drafter on top of it (``kind`` per slot,
  released slots propose nothing and ignore ``extend``).
"""
from __future__ import annotations

from typing import Sequence

from tep.engine.speculative import MATCH_REACH, NGRAM_SIZES, match_kind

__all__ = ["scan", "PyNgramIndex", "PyNgramDrafter"]


def _match(toks: Sequence[int], q: int, n: int, reach: int) -> int:
    m, lim = n, min(reach, q)
    while m < lim and toks[q - 1 - m] == toks[len(toks) - 1 - m]:
        m += 1
    return m


def scan(toks: Sequence[int], k: int, sizes: Sequence[int] = NGRAM_SIZES,
         reach: int = MATCH_REACH) -> tuple[list[int], int]:
    """(drafts, match length) for a sequence ``toks`` by the rule, scanning: ([], 0) when
    nothing recurs or k == 0."""
    toks = [int(t) for t in toks]
    L = len(toks)
    if k <= 0:
        return [], 0
    for n in sizes:
        if L < n:
            continue
        key = toks[L - n:]
        for q in range(L - 1, n - 1, -1):     # latest first; the n-gram ends before L - 1
            if toks[q - n:q] == key:
                return toks[q:q + k], _match(toks, q, n, reach)
    return [], 0


class PyNgramIndex:
    """Dict-indexed lookup, one per slot; the API of the compiled NgramIndex."""

    def __init__(self, slots: int, sizes: Sequence[int] = NGRAM_SIZES,
                 reach: int = MATCH_REACH) -> None:
        self.sizes, self.reach = tuple(sizes), reach
        self._toks: list[list[int] | None] = [None] * slots
        self._index: list[list[dict] | None] = [None] * slots
        self._done = [0] * slots

    def live(self, slot: int) -> bool:
        return self._toks[slot] is not None

    def admit(self, slot: int, prompt: Sequence[int]) -> None:
        self._toks[slot] = [int(t) for t in prompt]
        self._index[slot] = [{} for _ in self.sizes]
        self._done[slot] = 0

    def release(self, slot: int) -> None:
        self._toks[slot] = None
        self._index[slot] = None

    def extend(self, slot: int, tokens: Sequence[int]) -> None:
        self._toks[slot].extend(int(t) for t in tokens)  # type: ignore[union-attr]

    def propose(self, slot: int, k: int) -> tuple[list[int], int]:
        toks, index = self._toks[slot], self._index[slot]
        assert toks is not None and index is not None
        if k <= 0:
            return [], 0
        L = len(toks)
        # index the n-grams ending at positions done .. L - 2 (continuation <= L - 1)
        for end in range(self._done[slot], L - 1):
            for n, d in zip(self.sizes, index):
                if end + 1 >= n:
                    d[tuple(toks[end + 1 - n:end + 1])] = end + 1
        self._done[slot] = max(self._done[slot], L - 1)
        for n, d in zip(self.sizes, index):
            if L >= n:
                q = d.get(tuple(toks[L - n:]))
                if q is not None:
                    return toks[q:q + k], _match(toks, q, n, self.reach)
        return [], 0


class PyNgramDrafter:
    """The engine's drafter over :class:`PyNgramIndex` (NgramDrafter's public behaviour)."""

    source = "ngram"

    def __init__(self, slots: int) -> None:
        self._index = PyNgramIndex(slots)
        self.kind = [0] * slots

    def admit(self, slot: int, prompt: Sequence[int]) -> None:
        self._index.admit(slot, prompt)

    def release(self, slot: int) -> None:
        self._index.release(slot)

    def extend(self, slot: int, tokens: Sequence[int]) -> None:
        if self._index.live(slot):
            self._index.extend(slot, tokens)

    def verified(self, slot: int, accepted: int) -> None:
        pass

    def propose(self, slot: int, k: int) -> list[int]:
        if k <= 0 or not self._index.live(slot):
            return []
        drafts, m = self._index.propose(slot, k)
        if drafts:
            self.kind[slot] = match_kind(m)
        return drafts

    def propose_many(self, want: dict[int, int]) -> dict[int, list[int]]:
        return {s: self.propose(s, k) for s, k in want.items()}
