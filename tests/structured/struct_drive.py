"""Drive a Constraint the way the engine will: fill the mask, mask random logits, sample
with ``tep.kernels.sample`` (the kernel's ``token_bitmask`` when it has one, else the mask
applied with numpy), accept the token, until an end-of-sequence token."""
from __future__ import annotations

import inspect
from typing import Sequence

import numpy as np

from tep.kernels import sample
from tep.structured import allocate_bitmask, apply_bitmask, fill_bitmasks
from tep.structured.matcher import Constraint

KERNEL_BITMASK = "token_bitmask" in inspect.signature(sample).parameters


def toy_bias(vocab_size: int) -> np.ndarray:
    """Logit offsets that favour printable ASCII and JSON punctuation (like the toy
    model's bias), so random texts end in a few hundred steps."""
    b = np.zeros(vocab_size, np.float32)
    b[32:127] = 3.0
    for ch in '"}],:0123456789':
        b[ord(ch)] = 4.0
    return b


def closing_bias(tok, boost: float = 6.0) -> np.ndarray:
    """For a real vocabulary: favour tokens made only of JSON punctuation and digits, so
    random texts under open schemas (extra properties, long arrays) end in bounded time."""
    V = tok.vocab_size
    b = np.zeros(V, np.float32)
    ok = set(b'"}],:0123456789 ')
    for i in range(V):
        piece = tok.decode_bytes([i])
        if piece and all(ch in ok for ch in piece):
            b[i] = boost
    return b


def sample_masked(logits: np.ndarray, bitmask: np.ndarray, *, seed: Sequence[int],
                  step: Sequence[int], temperature: float = 1.0) -> np.ndarray:
    """int64 [B] tokens from float32 [B, V] logits under int32 [B, W] bitmask."""
    if KERNEL_BITMASK:
        return sample(logits, temperature=temperature, seed=list(seed), step=list(step),
                      token_bitmask=bitmask)
    return sample(apply_bitmask(logits, bitmask), temperature=temperature, seed=list(seed),
                  step=list(step))


def generate(c: Constraint, *, seed: int, max_steps: int = 4000,
             bias: np.ndarray | None = None, temperature: float = 1.0,
             step_bias: Sequence[np.ndarray] = ()) -> list[int]:
    """Tokens (EOS included) of one constrained sequence under random logits
    (+ ``bias``, + ``step_bias[i]`` at step i)."""
    V = c.vocab_size
    rng = np.random.default_rng(seed)
    bm = allocate_bitmask(1, V)
    out: list[int] = []
    for step in range(max_steps):
        fill_bitmasks([c], [0], bm)
        logits = rng.standard_normal((1, V)).astype(np.float32)
        if bias is not None:
            logits += bias
        if step < len(step_bias):
            logits += step_bias[step]
        tok = int(sample_masked(logits, bm, seed=[seed], step=[step],
                                temperature=temperature)[0])
        assert c.accept(tok), f"sampled token {tok} was refused: {c.error}"
        out.append(tok)
        if tok in c.eos_ids:
            return out
    raise AssertionError(f"no EOS within {max_steps} steps")
