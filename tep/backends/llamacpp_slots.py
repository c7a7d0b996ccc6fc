"""Which llama.cpp sequence slot an engine sequence runs in, and what each slot still holds.

llama.cpp keeps one KV-cache stream per sequence slot (``kv_unified=False``, what
``llama-server -np N`` does). When a sequence ends its slot keeps the tokens it was fed;
the next sequence is placed in the free slot whose kept tokens share the longest prefix
with its prompt, and only the tail past that prefix is removed from the cache and
recomputed. Engine seq ids are mapped to slots so the engine never has to know.

Pure Python, no llama.cpp: the model calls :meth:`SlotTable.acquire` /
:meth:`SlotTable.release` and does the cache edits they ask for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["SlotTable", "Placement", "common_prefix_len"]


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Slot:
    tokens: list[int] = field(default_factory=list)  # what the slot's cache holds, pos 0..
    last_used: int = 0                                # tick of the last release (LRU)


@dataclass(frozen=True)
class Placement:
    """Where :meth:`SlotTable.acquire` put a sequence.

    Attributes:
        slot: the llama.cpp seq id the sequence runs in.
        reused: prompt tokens already in that slot's cache (positions ``[0, reused)``).
        drop_from: first cache position the caller must remove (``seq_rm(slot, drop_from,
            -1)``); equals ``reused``.
    """

    slot: int
    reused: int
    drop_from: int


class SlotTable:
    """``n_slots`` llama.cpp sequence slots shared by the engine's sequences.

    Invariants: an engine seq id maps to at most one slot; a slot serves at most one engine
    sequence; ``tokens`` of a slot is exactly what its cache holds (the caller reports
    every token it feeds through :meth:`fed`).
    """

    def __init__(self, n_slots: int) -> None:
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots}")
        self._slots = [_Slot() for _ in range(n_slots)]
        self._free: set[int] = set(range(n_slots))
        self._of_seq: dict[int, int] = {}
        self._tick = 0
        self.prompt_tokens = 0   # prompt tokens of every placed sequence
        self.reused_tokens = 0   # of which were found in a cache

    @property
    def n_slots(self) -> int:
        return len(self._slots)

    def slot_of(self, seq_id: int) -> int | None:
        """The slot an engine sequence runs in, or None."""
        return self._of_seq.get(seq_id)

    def tokens(self, slot: int) -> list[int]:
        """The tokens the slot's cache holds (the list itself; do not modify)."""
        return self._slots[slot].tokens

    def acquire(self, seq_id: int, prompt: Sequence[int], reuse: bool = True) -> Placement:
        """Place a new engine sequence: the free slot with the longest cached prefix of
        ``prompt`` (the least recently used among equals). At most ``len(prompt) - 1``
        tokens are reused, so the last prompt token is always fed for its logits; none
        when ``reuse`` is False (the prefix cache is off).

        Raises:
            ValueError: ``seq_id`` is already placed, or no slot is free.
        """
        if seq_id in self._of_seq:
            raise ValueError(f"seq_id {seq_id} is already running")
        if not self._free:
            raise ValueError(f"all {self.n_slots} sequence slots are busy")
        best, best_n = -1, -1
        for s in self._free:
            n = common_prefix_len(self._slots[s].tokens, prompt)
            if n > best_n or (n == best_n and self._slots[s].last_used < self._slots[best].last_used):
                best, best_n = s, n
        n = max(0, min(best_n, len(prompt) - 1)) if reuse else 0
        self._free.remove(best)
        self._of_seq[seq_id] = best
        del self._slots[best].tokens[n:]
        self.prompt_tokens += len(prompt)
        self.reused_tokens += n
        return Placement(slot=best, reused=n, drop_from=n)

    def fed(self, slot: int, first_pos: int, tokens: Sequence[int]) -> int:
        """Record tokens written at ``first_pos...`` of ``slot``. Returns the position from
        which the caller must remove stale cache cells first (``first_pos`` when it
        rewinds the slot, else -1)."""
        held = self._slots[slot].tokens
        drop = -1
        if first_pos < len(held):
            del held[first_pos:]
            drop = first_pos
        elif first_pos > len(held):
            raise ValueError(f"slot {slot} holds {len(held)} tokens; cannot write at "
                             f"position {first_pos} (positions must be contiguous)")
        held.extend(tokens)
        return drop

    def release(self, seq_id: int) -> int | None:
        """The engine sequence ended; its slot becomes free and keeps its tokens. Returns
        the slot, or None for an unknown seq id (releasing twice is harmless)."""
        slot = self._of_seq.pop(seq_id, None)
        if slot is None:
            return None
        self._tick += 1
        self._slots[slot].last_used = self._tick
        self._free.add(slot)
        return slot

    def free_slots(self) -> list[int]:
        """The slots no sequence runs in (sorted)."""
        return sorted(self._free)

    def forget(self, slot: int) -> None:
        """The slot's cache was cleared (its tokens are gone)."""
        self._slots[slot].tokens.clear()

    @property
    def hit_rate(self) -> float:
        """Reused prompt tokens / prompt tokens placed so far (0 when none)."""
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
