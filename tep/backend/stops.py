"""Stop strings over text that grows a piece at a time."""
from __future__ import annotations

from typing import Sequence

__all__ = ["StopMatcher"]


class StopMatcher:
    """Finds the earliest stop string in a growing text, scanning each character about
    once, and says how much of the text's end must be held back because it may be the
    start of a stop string.

        m = StopMatcher(["\\n\\n", "END"])
        cut = m.find(text)            # index of the earliest stop string, or -1
        safe = len(text) - m.holdback(text)   # text[:safe] can be sent now

    ``find`` assumes ``text`` only grew since the previous call (what a stream does).
    Empty stop strings are ignored.
    """

    __slots__ = ("stops", "_longest", "_scan_from")

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self._scan_from = 0

    def __bool__(self) -> bool:
        return bool(self.stops)

    def find(self, text: str) -> int:
        """Index of the earliest complete stop string in ``text``, or -1. Only the new
        part of the text (plus the overlap a stop string may straddle) is searched."""
        start = max(0, self._scan_from - self._longest + 1)
        best = -1
        for s in self.stops:
            i = text.find(s, start)
            if i != -1 and (best == -1 or i < best):
                best = i
        self._scan_from = len(text)
        return best

    def holdback(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop
        string (0 when none is)."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
