"""Token bitmasks: int32 ``[B, ceil(V/32)]``, bit ``j % 32`` of word ``j // 32`` set when
token ``j`` is allowed (llguidance's and xgrammar's layout, what ``tep.kernels.sample``
takes as ``token_bitmask``). Numpy helpers for code paths without the kernel."""
from __future__ import annotations

import numpy as np

__all__ = ["bitmask_words", "allocate_bitmask", "allowed_token_ids", "bitmask_to_bool",
           "apply_bitmask"]


def bitmask_words(vocab_size: int) -> int:
    """Words per row: ``ceil(V / 32)``."""
    return (vocab_size + 31) // 32


def allocate_bitmask(batch: int, vocab_size: int) -> np.ndarray:
    """int32 ``[batch, ceil(V/32)]`` with every token allowed (all bits set)."""
    return np.full((batch, bitmask_words(vocab_size)), -1, dtype=np.int32)


def bitmask_to_bool(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """bool ``[..., V]`` from int32 ``[..., ceil(V/32)]``."""
    bits = np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), axis=-1,
                         bitorder="little")
    return bits[..., :vocab_size].astype(bool)


def allowed_token_ids(row: np.ndarray, vocab_size: int) -> np.ndarray:
    """int64 ids allowed by one row (``allowed_token_ids`` for a sampler without bitmasks)."""
    return np.flatnonzero(bitmask_to_bool(row, vocab_size)).astype(np.int64)


def apply_bitmask(logits: np.ndarray, bitmask: np.ndarray) -> np.ndarray:
    """A copy of float32 ``[B, V]`` (or ``[V]``) logits with disallowed tokens at -inf."""
    out = np.array(logits, dtype=np.float32, copy=True)
    ok = bitmask_to_bool(bitmask.reshape(out.shape[:-1] + (-1,)), out.shape[-1])
    out[~ok] = -np.inf
    return out
