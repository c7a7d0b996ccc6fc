"""Which llama.cpp sequence slot an engine sequence runs in, and what each slot still holds.

llama.cpp keeps one KV-cache stream per sequence slot (``kv_unified=False``, what
``llama-server -np N`` does). When a sequence ends its slot keeps the tokens it was fed;
the next sequence reuses the longest cached prefix of its prompt, and only the tail past
that prefix is removed from the cache and recomputed. Engine seq ids are mapped to slots
so the engine never has to know.

Busy slots are kept in one run of adjacent slots. With one stream per slot, llama.cpp puts
only sequences with consecutive slot ids into one micro-batch (``split_equal`` with
``sequential``), and each micro-batch streams every weight again: four sequences in slots
0, 2, 4, 6 cost four one-token forwards per step, in slots 0..3 one forward of four
tokens (on the 2-core CPU here, 50-76 ms against 35-48 ms per step). So:

* a new sequence goes to a free slot that keeps the busy slots one run; when another free
  slot holds a longer prefix of its prompt, that slot's whole stream is copied into the
  chosen one (``llama_memory_seq_cp``, bit for bit) when the gain is worth the copy;
* when sequences end and leave a gap, :meth:`SlotTable.compact` moves the running
  sequences from the ends of the busy slots into the gaps (a stream copy each), first
  parking the cache a gap holds in a free slot outside when that one is older.

Pure Python, no llama.cpp: the model calls :meth:`SlotTable.acquire`,
:meth:`SlotTable.compact` and :meth:`SlotTable.release` and does the cache edits and copies
they ask for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["SlotTable", "Placement", "Move", "common_prefix_len", "count_runs"]


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def count_runs(slots: Sequence[int]) -> int:
    """How many runs of adjacent ids a set of slot ids forms ({0, 1, 3} -> 2)."""
    xs = sorted(slots)
    return sum(1 for i, x in enumerate(xs) if i == 0 or x != xs[i - 1] + 1)


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
        copy_from: a slot whose whole stream the caller must first copy into ``slot``
            (``seq_cp(copy_from, slot, -1, -1)``), or None.
    """

    slot: int
    reused: int
    drop_from: int
    copy_from: int | None = None


@dataclass(frozen=True)
class Move:
    """One stream copy asked for by :meth:`SlotTable.compact`, done in order.

    Attributes:
        src, dst: copy slot ``src``'s whole stream into slot ``dst``.
        seq_id: the running engine sequence that now lives in ``dst``, or None when the
            copy only parks a free slot's cache.
    """

    src: int
    dst: int
    seq_id: int | None


# what a cached token a placement overwrites is worth against a prompt token it reuses
# (it may be asked for again, or may not)
_LOST_WEIGHT = 0.5


class SlotTable:
    """``n_slots`` llama.cpp sequence slots shared by the engine's sequences.

    Invariants: an engine seq id maps to at most one slot; a slot serves at most one engine
    sequence; ``tokens`` of a slot is exactly what its cache holds (the caller reports
    every token it feeds through :meth:`fed`, and does every copy asked for).

    Args:
        n_slots: the slots (llama.cpp's ``n_seq_max``).
        copy_min_tokens: a placement copies another slot's stream only when that gives at
            least this many more reused prompt tokens than the chosen slot holds (a copy
            moves the whole stream, whatever it holds).
    """

    def __init__(self, n_slots: int, copy_min_tokens: int = 8) -> None:
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots}")
        if copy_min_tokens < 1:
            raise ValueError(f"copy_min_tokens must be >= 1, got {copy_min_tokens}")
        self._slots = [_Slot() for _ in range(n_slots)]
        self._free: set[int] = set(range(n_slots))
        self._of_seq: dict[int, int] = {}
        self._tick = 0
        self._copy_min = copy_min_tokens
        self._gapped = False     # busy slots may form more than one run
        self.prompt_tokens = 0   # prompt tokens of every placed sequence
        self.reused_tokens = 0   # of which were found in a cache
        self.copies = 0          # placements that copied another slot's stream
        self.moves = 0           # running sequences moved by compact()

    @property
    def n_slots(self) -> int:
        return len(self._slots)

    def slot_of(self, seq_id: int) -> int | None:
        """The slot an engine sequence runs in, or None."""
        return self._of_seq.get(seq_id)

    def tokens(self, slot: int) -> list[int]:
        """The tokens the slot's cache holds (the list itself; do not modify)."""
        return self._slots[slot].tokens

    def busy_slots(self) -> list[int]:
        """The slots a sequence runs in (sorted)."""
        return sorted(self._of_seq.values())

    def acquire(self, seq_id: int, prompt: Sequence[int], reuse: bool = True) -> Placement:
        """Place a new engine sequence in a free slot that keeps the busy slots in as few
        runs as possible; among those, the one that scores best, then the least recently
        used. A slot's score is the prompt tokens it gives (its own cached prefix of
        ``prompt``, or the longest one of any free slot copied in (``copy_from``) when
        that is at least ``copy_min_tokens`` more, less ``copy_min_tokens`` for the copy)
        minus half the cached tokens it would lose (what it holds past that prefix). So
        prompts that share only a system turn keep their own slots: the next one takes an
        empty slot and copies the shared part, instead of overwriting the other's cache.
        At most ``len(prompt) - 1`` tokens are reused, so the last prompt token is always
        fed for its logits; none when ``reuse`` is False (the prefix cache is off).

        Raises:
            ValueError: ``seq_id`` is already placed, or no slot is free.
        """
        if seq_id in self._of_seq:
            raise ValueError(f"seq_id {seq_id} is already running")
        if not self._free:
            raise ValueError(f"all {self.n_slots} sequence slots are busy")
        busy = set(self._of_seq.values())
        cap = max(0, len(prompt) - 1) if reuse else 0
        slots = self._slots

        def held(s: int) -> int:
            return min(common_prefix_len(slots[s].tokens, prompt), cap) if cap else 0

        def joins(s: int) -> int:   # runs removed (+1), kept (0) or added (-1) by taking s
            return (s - 1 in busy) + (s + 1 in busy) - 1

        gain = {s: held(s) for s in self._free}
        source = max(self._free, key=lambda s: (gain[s], -s))
        most, copy_min = gain[source], self._copy_min

        def score(s: int) -> float:
            n = gain[s]
            if most - n >= copy_min:
                n = most - copy_min
            return n - _LOST_WEIGHT * (len(slots[s].tokens) - gain[s])

        target = max(self._free, key=lambda s: (joins(s) if busy else 0, score(s),
                                                -slots[s].last_used, -s))
        n, copy_from = gain[target], None
        if source != target and most - n >= copy_min:
            n, copy_from = gain[source], source
            slots[target].tokens = slots[source].tokens[:n]
            self.copies += 1
        self._free.remove(target)
        self._of_seq[seq_id] = target
        del slots[target].tokens[n:]
        self.prompt_tokens += len(prompt)
        self.reused_tokens += n
        return Placement(slot=target, reused=n, drop_from=n, copy_from=copy_from)

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
        self._gapped = True
        return slot

    def compact(self) -> list[Move]:
        """Moves that make the busy slots one run again after sequences ended (empty when
        they already are). The busy slots outside the window of ``len(busy)`` slots that
        holds most of them move into that window's free slots, highest first into lowest.
        A gap whose cache was used more recently than the oldest free slot outside the
        window is first parked there (one more copy), so finished conversations keep
        their cache. The caller does the copies in order and re-maps each moved sequence.
        """
        if not self._gapped:
            return []
        self._gapped = False
        of_seq = dict(self._of_seq)
        busy = sorted(of_seq.values())
        if count_runs(busy) <= 1:
            return []
        k, bset = len(busy), set(busy)
        start = max(range(self.n_slots - k + 1),
                    key=lambda a: (sum(1 for b in busy if a <= b < a + k), -a))
        window = range(start, start + k)
        outside = [b for b in busy if b not in window][::-1]          # highest first
        gaps = [s for s in window if s not in bset]                   # lowest first
        seq_in = {slot: seq for seq, slot in of_seq.items()}
        slots, moves = self._slots, []
        for src, dst in zip(outside, gaps):
            gap = slots[dst]
            if gap.tokens:
                park = [s for s in self._free if s not in window and s != dst]
                if park:
                    p = min(park, key=lambda s: (slots[s].last_used, s))
                    if slots[p].last_used < gap.last_used or not slots[p].tokens:
                        moves.append(Move(dst, p, None))
                        slots[p].tokens, slots[p].last_used = gap.tokens, gap.last_used
            seq = seq_in[src]
            moves.append(Move(src, dst, seq))
            gap.tokens, gap.last_used = list(slots[src].tokens), 0
            slots[src].last_used = 0      # a copy of a running prefix: evict it first
            self._free.remove(dst)
            self._free.add(src)
            self._of_seq[seq] = dst
            self.moves += 1
        return moves

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
