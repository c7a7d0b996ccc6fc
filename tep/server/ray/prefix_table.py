"""What each model replica has seen: a table of prompt-prefix block hashes per replica.

A request's *route key* is bytes whose prefixes follow the prompt's prefixes: the prompt's
token IDs (int32 bytes), its text (UTF-8), or for chat the messages serialised one after
the other (a turn that resends the history plus one message extends the last turn's key).
The key is cut into blocks of ``block_bytes``; block i is named by a hash chained over
blocks 0..i, so one hash names a whole prefix and a table lookup per block finds the
longest prefix a replica has served. The trailing partial block is not hashed.

Per replica the table is an LRU of hashes with a bound (``max_blocks``), each marked if a
key ended there (:meth:`PrefixTable.ends_at`: the next turn of a chat continues exactly
such a key, while a new conversation only shares a system turn); what falls out is
forgotten, and :meth:`PrefixTable.stale` forgets everything a replica used before an
entry that it turned out to have evicted (in an LRU cache, an evicted entry means that
every older one went too). :meth:`drop` forgets a replica (it died or was scaled down).
Pure Python, no Ray: the router (:mod:`tep.server.ray.router`) holds one per deployment
handle and guards it with a lock.
"""
from __future__ import annotations

import json
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = ["RouteKey", "PrefixTable", "chat_key_bytes", "prompt_key_bytes", "BLOCK_BYTES"]

BLOCK_BYTES = 16          # 4 token IDs, or 16 bytes of text
MAX_BLOCKS = 1 << 14      # hashes per key at most (a 256 KiB prefix)


@dataclass(frozen=True)
class RouteKey:
    """A request's prefix blocks, as chained hashes (index i names bytes [0, (i+1)*B)).

    Attributes:
        chain: the hashes, one per whole block.
        n_bytes: the key's length in bytes (partial block included).
    """

    chain: tuple[int, ...]
    n_bytes: int

    @classmethod
    def of(cls, key: bytes, block_bytes: int = BLOCK_BYTES) -> "RouteKey":
        """The chain of ``key`` (O(len(key) / block_bytes) hashes)."""
        h = 0
        out = []
        n = min(len(key) // block_bytes, MAX_BLOCKS)
        for i in range(n):
            h = hash((h, key[i * block_bytes:(i + 1) * block_bytes]))
            out.append(h)
        return cls(tuple(out), len(key))


def prompt_key_bytes(model: str, prompt: str | Sequence[int]) -> bytes:
    """The route key of a completion prompt: its token IDs (int32) or its UTF-8 text,
    after the model name."""
    head = b"c\x00" + model.encode("utf-8", "replace") + b"\x00"
    if isinstance(prompt, str):
        return head + prompt.encode("utf-8", "replace")
    return head + array("i", [int(t) & 0x7FFFFFFF for t in prompt]).tobytes()


def chat_key_bytes(model: str, messages: Iterable[dict]) -> bytes:
    """The route key of a chat request: each message as compact JSON (sorted keys), one
    after the other, after the model name; the same history gives the same bytes."""
    parts = [b"m\x00", model.encode("utf-8", "replace"), b"\x00"]
    for m in messages:
        parts.append(json.dumps(m, sort_keys=True, separators=(",", ":"),
                                ensure_ascii=False, default=str).encode("utf-8", "replace"))
        parts.append(b"\x1e")
    return b"".join(parts)


class PrefixTable:
    """Block hashes per replica with LRU bounds.

    Args:
        max_blocks: most hashes remembered per replica (least recently used go first).
    """

    def __init__(self, max_blocks: int = 1 << 16) -> None:
        self.max_blocks = max(1, int(max_blocks))
        self._holders: dict[int, set[str]] = {}
        # per replica: hash -> True where a key it was sent ends (a conversation's turn)
        self._lru: dict[str, "OrderedDict[int, bool]"] = {}
        self._n_keys: dict[str, int] = {}   # end marks per replica
        self.forgotten = 0   # hashes dropped by the LRU bound or stale()

    def replicas(self) -> list[str]:
        return list(self._lru)

    def size(self, replica: str) -> int:
        """Hashes remembered for ``replica``."""
        return len(self._lru.get(replica, ()))

    def n_keys(self, replica: str) -> int:
        """Keys (distinct ends: conversations, prompts) remembered for ``replica``."""
        return self._n_keys.get(replica, 0)

    def match(self, chain: Sequence[int], candidates: Iterable[str]) -> tuple[list[str], int]:
        """The candidates holding the longest prefix of ``chain`` and its length in
        blocks; ``([], 0)`` when none holds even the first block."""
        alive = set(candidates)
        best: set[str] = set()
        depth = 0
        holders = self._holders
        for i, h in enumerate(chain):
            hs = holders.get(h)
            if not hs:
                break
            inter = alive & hs
            if not inter:
                break
            alive = best = inter
            depth = i + 1
        return sorted(best), depth

    def depth(self, replica: str, chain: Sequence[int]) -> int:
        """How many leading blocks of ``chain`` ``replica`` holds."""
        lru = self._lru.get(replica)
        if not lru:
            return 0
        d = 0
        for h in chain:
            if h not in lru:
                break
            d += 1
        return d

    def ends_at(self, replica: str, h: int) -> bool:
        """Whether a key sent to ``replica`` ended with block ``h`` (so a request matching
        up to ``h`` continues that key, e.g. the next turn of a chat)."""
        lru = self._lru.get(replica)
        return bool(lru and lru.get(h))

    def insert(self, replica: str, chain: Sequence[int]) -> None:
        """``replica`` now holds ``chain`` (marked most recently used)."""
        lru = self._lru.get(replica)
        if lru is None:
            lru = self._lru[replica] = OrderedDict()
        holders = self._holders
        last = chain[-1] if chain else None
        for h in chain:
            if h in lru:
                lru.move_to_end(h)
                if h == last and not lru[h]:
                    lru[h] = True
                    self._n_keys[replica] = self._n_keys.get(replica, 0) + 1
            else:
                lru[h] = h == last
                if h == last:
                    self._n_keys[replica] = self._n_keys.get(replica, 0) + 1
                hs = holders.get(h)
                if hs is None:
                    holders[h] = {replica}
                else:
                    hs.add(replica)
        while len(lru) > self.max_blocks:
            self._forget(replica, *lru.popitem(last=False))

    def stale(self, replica: str, chain: Sequence[int], kept_blocks: int) -> int:
        """``replica`` served ``chain`` with only ``kept_blocks`` of it cached although the
        table said more: it evicted block ``kept_blocks``, so forget that block's entry and
        everything the replica used before it. Returns how many hashes were forgotten."""
        lru = self._lru.get(replica)
        if not lru or kept_blocks >= len(chain):
            return 0
        h_evicted = chain[kept_blocks]
        if h_evicted not in lru:
            return 0
        n = 0
        while lru:
            h, end = lru.popitem(last=False)
            self._forget(replica, h, end)
            n += 1
            if h == h_evicted:
                break
        # the rest of this chain is older than the evicted block too (inserted with it)
        for h in chain[kept_blocks:]:
            if h in lru:
                self._forget(replica, h, lru.pop(h))
                n += 1
        return n

    def drop(self, replica: str) -> None:
        """Forget ``replica`` entirely (it died or was removed)."""
        lru = self._lru.pop(replica, None)
        self._n_keys.pop(replica, None)
        if lru:
            for h in lru:
                self._unhold(replica, h)

    def keep_only(self, replicas: Iterable[str]) -> list[str]:
        """Drop every replica not in ``replicas``; returns the dropped ones."""
        keep = set(replicas)
        gone = [r for r in self._lru if r not in keep]
        for r in gone:
            self.drop(r)
        return gone

    def _forget(self, replica: str, h: int, end: bool = False) -> None:
        self.forgotten += 1
        if end:
            self._n_keys[replica] -= 1
        self._unhold(replica, h)

    def _unhold(self, replica: str, h: int) -> None:
        hs = self._holders.get(h)
        if hs is not None:
            hs.discard(replica)
            if not hs:
                del self._holders[h]
