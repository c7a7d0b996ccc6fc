"""Stub for the compiled n-gram draft lookup (tep/_kernels/ngram.pyx).

Used by :class:`tep.engine.speculative.NgramDrafter`, which passes ``NGRAM_SIZES`` and
``MATCH_REACH`` and maps match lengths to draft kinds (``match_kind``).
"""
from typing import Iterable, Sequence

import numpy as np
import numpy.typing as npt

class NgramIndex:
    """Per slot: the tokens (prompt, then extended) and, for each n-gram size, a hash table
    n-gram -> position right after its latest occurrence, covering the n-grams that end
    before the last token. A lookup tries the sizes in the order given; the first found
    wins and its continuation is the draft. Bad slots, released slots, k < 0 and token ids
    outside [0, 2**31 - 1] raise IndexError / ValueError (TypeError for non-integers)."""

    def __init__(self, slots: int, sizes: Iterable[int], reach: int) -> None: ...
    @property
    def slots(self) -> int: ...
    @property
    def sizes(self) -> tuple[int, ...]: ...
    @property
    def reach(self) -> int: ...
    @property
    def nbytes(self) -> int:
        """C memory held (bytes): back to its value after construction once every slot is
        released."""
    def live(self, slot: int) -> bool: ...
    def length(self, slot: int) -> int: ...
    def admit(self, slot: int, prompt: Sequence[int] | npt.NDArray[np.integer]) -> None: ...
    def extend(self, slot: int, tokens: Sequence[int] | npt.NDArray[np.integer]) -> None: ...
    def release(self, slot: int) -> None: ...
    def propose(self, slot: int, k: int) -> tuple[list[int], int]:
        """(up to k drafts, match length); ([], 0) when nothing recurs or k == 0."""
    def propose_many(self, slots: npt.ArrayLike, k: npt.ArrayLike
                     ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64],
                                npt.NDArray[np.int64]]:
        """slots, k: int [B]. (drafts int32 [B, W] padded with -1, n int64 [B], match
        int64 [B]); W = max(k) capped at the longest requested slot's length. No GIL."""
