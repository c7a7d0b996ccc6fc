"""Stub for the compiled pooling kernels (tep/_kernels/pooling.pyx).

Use :func:`tep.kernels.pool`; these entry points assume validated, C-contiguous arrays of
exactly the dtypes shown and only re-check what would otherwise read out of bounds.
"""
import numpy as np
from numpy.typing import NDArray

MODE_MEAN: int
MODE_MAX: int
MODE_CLS: int
MODE_LAST: int
MODE_SUM: int
MODES: dict[str, int]
"""Mode name ("mean", "max", "cls", "last", "sum") -> kernel code."""
HAVE_OPENMP: bool
"""True when the module was compiled with OpenMP (otherwise every call runs serially)."""

def max_threads() -> int:
    """Threads an OpenMP region may use (honours OMP_NUM_THREADS); 1 without OpenMP."""

def pool_ragged(
    hidden_nd: NDArray[np.float32],
    offsets_b1: NDArray[np.int64],
    mode: int,
    normalize: bool,
    out_bd: NDArray[np.float32],
    n_threads: int = 1,
) -> None:
    """hidden_nd float32 [N, D], offsets_b1 int64 [B+1] -> out_bd (OUT) float32 [B, D'], D' <= D.

    Raises ValueError on inconsistent shapes, decreasing or out-of-range offsets, or an unknown
    mode; MemoryError if an accumulator cannot be allocated. Releases the GIL.
    """

def pool_lengths(
    hidden_btd: NDArray[np.float32],
    lengths_b: NDArray[np.int64],
    mode: int,
    normalize: bool,
    out_bd: NDArray[np.float32],
    n_threads: int = 1,
) -> None:
    """hidden_btd float32 [B, T, D], lengths_b int64 [B] in [0, T] -> out_bd (OUT) [B, D']."""

def pool_masked(
    hidden_btd: NDArray[np.float32],
    mask_bt: NDArray[np.uint8],
    mode: int,
    normalize: bool,
    out_bd: NDArray[np.float32],
    n_threads: int = 1,
) -> None:
    """hidden_btd float32 [B, T, D], mask_bt uint8 [B, T] (nonzero = valid) -> out_bd (OUT)."""
