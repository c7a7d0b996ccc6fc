"""Stub for the compiled BERT encoder (tep/_kernels/encoder.pyx).

Use :class:`tep.backends._bert_encoder.BertEncoder`, which loads the weights and builds
:class:`Encoder`.
"""
from typing import Any, Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

ACTIVATIONS: dict[str, int]
"""``hidden_act`` name -> kernel code (erf GELU, tanh GELU, ReLU)."""
MAX_THREADS: int
"""Most threads one call may use (the caller plus its pool's workers)."""
SMALL_GEMM: bool
"""True when few-token products may use the packed-panel AVX-512 kernel (``TEP_SIMD=scalar`` turns it off)."""
SMALL_ROWS: int
"""Default ``small_rows``: products with at most this many token rows use the packed panels."""
SIMD_AVX2: bool
"""True when the row kernels use their AVX2+FMA path (``TEP_SIMD=scalar`` turns it off)."""

class Encoder:
    """BERT forward pass over float32 C-contiguous weights.

    Keyword arguments: ``word_emb`` [V, D]; ``pos_emb`` [P, D] (token type 0 folded in);
    ``ln_g``, ``ln_b`` [D] (embedding LayerNorm); ``layers``: one mapping per layer with
    ``n_heads`` and the arrays ``w_qkv`` [D, 3D] (Q columns pre-scaled by 1/sqrt(D/H)),
    ``b_qkv`` [3D], ``w_o`` [D, D], ``b_o``, ``ln1_g``, ``ln1_b`` [D], ``w_i`` [D, I],
    ``b_i`` [I], ``w_out`` [I, D], ``b_out``, ``ln2_g``, ``ln2_b`` [D]; ``eps``; ``act``
    (a key of :data:`ACTIVATIONS`); ``sgemm``: ``scipy.linalg.cython_blas.__pyx_capi__["sgemm"]``;
    ``small_rows``: products with at most this many rows use weights packed at construction
    (0: always BLAS).
    """

    def __init__(self, *, word_emb: NDArray[np.float32], pos_emb: NDArray[np.float32],
                 ln_g: NDArray[np.float32], ln_b: NDArray[np.float32],
                 layers: Sequence[Mapping[str, Any]], eps: float, act: str, sgemm: object,
                 small_rows: int = ...) -> None: ...
    @property
    def hidden_size(self) -> int: ...
    def encode(self, ids_n: NDArray[np.int64], offsets_b1: NDArray[np.int64],
               out_nd: NDArray[np.float32], n_threads: int = 1) -> None:
        """Last hidden states of a ragged batch into ``out_nd`` (OUT, float32 [N, D]).

        ``n_threads``: the caller plus ``n_threads - 1`` pool workers (capped at
        :data:`MAX_THREADS`). Raises ValueError for bad offsets, a sequence longer than the
        position table or an ID outside the vocabulary. Releases the GIL.
        """
