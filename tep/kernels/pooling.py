"""Embedding pooling: one float32 vector per sequence from float32 hidden states.

    from tep.kernels import pool
    emb = pool(hidden_nd, offsets=offsets_b1, mode="mean", normalize=True)   # [B, D]

:func:`pool` validates and converts its arguments here, in Python, then runs the compiled
kernel (:mod:`tep._kernels.pooling`) with the GIL released. Semantics: see
:func:`pool`'s docstring.
"""
from __future__ import annotations

import operator
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from tep._kernels import pooling as _kernel

__all__ = ["pool", "PoolMode", "POOL_MODES"]

PoolMode = Literal["mean", "max", "cls", "last", "sum"]
POOL_MODES: tuple[str, ...] = ("mean", "max", "cls", "last", "sum")

# Below this many float32 values to read, one thread: starting an OpenMP team costs more than
# the split saves (2**17 values is ~0.5 MiB, tens of microseconds of work).
_PARALLEL_MIN_VALUES = 1 << 17


def pool(
    hidden: ArrayLike,
    *,
    offsets: ArrayLike | None = None,
    lengths: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    mode: PoolMode = "mean",
    normalize: bool = False,
    dimensions: int | None = None,
    n_threads: int | None = None,
) -> NDArray[np.float32]:
    """Pool each sequence of hidden states into one vector.

    Layouts (exactly one of ``offsets`` / ``lengths`` / ``mask``):

    * ragged: ``hidden`` float32 ``[N, D]`` and ``offsets`` integer ``[B+1]``, non-decreasing,
      each in ``[0, N]``; sequence ``b`` is ``hidden[offsets[b]:offsets[b+1]]``.
    * padded: ``hidden`` float32 ``[B, T, D]`` and either ``lengths`` integer ``[B]`` (each in
      ``[0, T]``; sequence ``b`` is ``hidden[b, :lengths[b]]``) or ``mask`` ``[B, T]`` (bool, or
      integers 0/1; sequence ``b`` is the positions with ``mask[b, t] == 1``, in order).

    Padded or masked-out positions are never read, so they may hold anything.

    Args:
        hidden: float32 hidden states (only float32; other dtypes raise ``TypeError``).
            Read-only arrays are used as they are; non-contiguous ones are copied.
        mode: ``"mean"``, ``"max"`` (per component), ``"cls"`` (first valid token),
            ``"last"`` (last valid token) or ``"sum"``. An empty sequence gives the zero
            vector in every mode.
        normalize: divide each vector by ``max(||x||_2, 1e-12)``.
        dimensions: keep the first ``dimensions`` components (``1 <= dimensions <= D``) and
            L2-normalise them (OpenAI order: truncate, then renormalise), whether or not
            ``normalize`` is set.
        n_threads: threads over sequences; ``None`` picks 1 for small inputs and up to
            ``omp_get_max_threads()`` (``OMP_NUM_THREADS``) otherwise.

    Returns:
        float32 ``[B, D']`` with ``D' = dimensions or D``; ``[0, D']`` for an empty batch.
        Sums are accumulated in float64. NaN in ``hidden`` propagates to the output.

    Raises:
        TypeError: wrong dtype or type of an argument (the message names it).
        ValueError: wrong shape or value of an argument (the message names it).
    """
    hidden_arr = _as_hidden(hidden)
    given = [name for name, value in (("offsets", offsets), ("lengths", lengths), ("mask", mask))
             if value is not None]
    if len(given) != 1:
        raise ValueError("offsets/lengths/mask: give exactly one "
                         f"(got {', '.join(given) if given else 'none'})")
    code = _mode_code(mode)
    if not isinstance(normalize, (bool, np.bool_)):
        raise TypeError(f"normalize: must be a bool, got {type(normalize).__name__}")

    if hidden_arr.ndim == 2:
        if given[0] != "offsets":
            raise ValueError(f"{given[0]}: needs padded hidden [B, T, D], but hidden is "
                             f"[N, D] = {list(hidden_arr.shape)}; use offsets [B+1]")
        n_rows, d = hidden_arr.shape
        offsets_b1 = _as_offsets(offsets, n_rows)
        batch = offsets_b1.shape[0] - 1
    else:
        if given[0] == "offsets":
            raise ValueError("offsets: needs ragged hidden [N, D], but hidden is [B, T, D] = "
                             f"{list(hidden_arr.shape)}; use lengths [B] or mask [B, T]")
        batch, t_max, d = hidden_arr.shape
        if lengths is not None:
            lengths_b = _as_lengths(lengths, batch)
        else:
            mask_bt = _as_mask(mask, batch, t_max)

    d_out = _dimensions(dimensions, d)
    threads = _threads(n_threads, batch)
    if threads == 0:  # automatic: only now count the rows that will be read
        if code in (_kernel.MODE_CLS, _kernel.MODE_LAST):
            rows = batch
        elif hidden_arr.ndim == 2:
            rows = int(offsets_b1[-1]) - int(offsets_b1[0])  # garbage if invalid: kernel rejects
        elif lengths is not None:
            rows = int(lengths_b.sum())
        else:
            rows = int(np.count_nonzero(mask_bt))
        threads = 1 if rows * d_out < _PARALLEL_MIN_VALUES else min(_kernel.max_threads(), batch)
    renorm = bool(normalize) or dimensions is not None
    out = np.empty((batch, d_out), dtype=np.float32)

    # The kernels re-check offsets/lengths (O(B)) before reading anything; on failure the
    # Python side says what exactly is wrong.
    if hidden_arr.ndim == 2:
        try:
            _kernel.pool_ragged(hidden_arr, offsets_b1, code, renorm, out, threads)
        except ValueError:
            _explain_offsets(offsets_b1, n_rows)
            raise
    elif lengths is not None:
        try:
            _kernel.pool_lengths(hidden_arr, lengths_b, code, renorm, out, threads)
        except ValueError:
            _explain_lengths(lengths_b, t_max)
            raise
    else:
        _kernel.pool_masked(hidden_arr, mask_bt, code, renorm, out, threads)
    return out


# ---- argument checks ----------------------------------------------------------------------

def _as_hidden(hidden: ArrayLike) -> NDArray[np.float32]:
    """float32 [N, D] or [B, T, D], C-contiguous (copied only if it is not)."""
    try:
        arr = np.asarray(hidden)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"hidden: expected a float32 array ({exc})") from None
    if arr.dtype.kind != "f" or arr.dtype.itemsize != 4:
        raise TypeError(f"hidden: dtype must be float32, got {arr.dtype}")
    if arr.ndim not in (2, 3):
        raise ValueError(f"hidden: must be [N, D] (ragged) or [B, T, D] (padded), "
                         f"got shape {list(arr.shape)}")
    # Also normalises a byte-swapped float32 array to native order.
    return np.ascontiguousarray(arr, dtype=np.float32)


def _as_integers(x: ArrayLike, name: str, ndim: int) -> np.ndarray:
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected an integer array ({exc})") from None
    if arr.dtype.kind == "f" and arr.size == 0:
        arr = arr.astype(np.int64)  # np.asarray([]) is float64; an empty list is fine
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: dtype must be an integer type, got {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name}: must have {ndim} dimension(s), got shape {list(arr.shape)}")
    return arr


def _as_offsets(offsets: ArrayLike, n_rows: int) -> NDArray[np.int64]:
    """int64 [B+1]. Order and range are checked by the kernel (see _explain_offsets)."""
    arr = _as_integers(offsets, "offsets", 1)
    if arr.shape[0] < 1:
        raise ValueError("offsets: must have B+1 >= 1 entries, got 0")
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and arr.max() > n_rows:
        _explain_offsets(arr, n_rows)  # a uint64 above 2**63 would wrap in the int64 cast
    return np.ascontiguousarray(arr, dtype=np.int64)


def _explain_offsets(arr: np.ndarray, n_rows: int) -> None:
    """Raise the ValueError that says what is wrong with offsets (if anything is)."""
    if arr.min() < 0 or arr.max() > n_rows:
        raise ValueError(f"offsets: every entry must be in [0, N] = [0, {n_rows}], got "
                         f"min {arr.min()}, max {arr.max()}")
    drops = np.flatnonzero(arr[1:] < arr[:-1])
    if drops.size:
        i = int(drops[0])
        raise ValueError(f"offsets: must be non-decreasing, but offsets[{i + 1}] = "
                         f"{arr[i + 1]} < offsets[{i}] = {arr[i]}")


def _as_lengths(lengths: ArrayLike, batch: int) -> NDArray[np.int64]:
    """int64 [B]. The range [0, T] is checked by the kernel (see _explain_lengths)."""
    arr = _as_integers(lengths, "lengths", 1)
    if arr.shape[0] != batch:
        raise ValueError(f"lengths: must have B = {batch} entries, got {arr.shape[0]}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and batch and arr.max() > 2**62:
        raise ValueError(f"lengths: every entry must be in [0, T], got max {arr.max()}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _explain_lengths(arr: np.ndarray, t_max: int) -> None:
    if arr.size and (arr.min() < 0 or arr.max() > t_max):
        raise ValueError(f"lengths: every entry must be in [0, T] = [0, {t_max}], got "
                         f"min {arr.min()}, max {arr.max()}")


def _as_mask(mask: ArrayLike, batch: int, t_max: int) -> NDArray[np.uint8]:
    try:
        arr = np.asarray(mask)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"mask: expected a bool or integer array ({exc})") from None
    if arr.dtype.kind == "f" and arr.size == 0:
        arr = arr.astype(np.uint8)
    if arr.dtype != np.bool_ and arr.dtype.kind not in "iu":
        raise TypeError(f"mask: dtype must be bool or integer (0/1), got {arr.dtype}")
    if arr.shape != (batch, t_max):
        raise ValueError(f"mask: must have shape [B, T] = {[batch, t_max]}, "
                         f"got {list(arr.shape)}")
    if arr.dtype == np.bool_:
        return np.ascontiguousarray(arr).view(np.uint8)  # bool is one byte, 0 or 1: no copy
    if arr.size and ((arr != 0) & (arr != 1)).any():
        raise ValueError("mask: integer entries must be 0 or 1")
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _mode_code(mode: str) -> int:
    if not isinstance(mode, str):
        raise TypeError(f"mode: must be a str, got {type(mode).__name__}")
    code = _kernel.MODES.get(mode)
    if code is None:
        raise ValueError(f"mode: must be one of {', '.join(POOL_MODES)}; got {mode!r}")
    return code


def _dimensions(dimensions: int | None, d: int) -> int:
    """Output width D' (D when dimensions is None)."""
    if dimensions is None:
        return d
    if isinstance(dimensions, (bool, np.bool_)):
        raise TypeError("dimensions: must be an int, got bool")
    try:
        value = operator.index(dimensions)
    except TypeError:
        raise TypeError(f"dimensions: must be an int, got {type(dimensions).__name__}") from None
    if not 1 <= value <= d:
        raise ValueError(f"dimensions: must be in [1, D] = [1, {d}], got {value}")
    return value


def _threads(n_threads: int | None, batch: int) -> int:
    """Validated n_threads; 0 = automatic (decided by the caller from the work size)."""
    if n_threads is None:
        return 0 if batch >= 2 else 1
    if isinstance(n_threads, (bool, np.bool_)):
        raise TypeError("n_threads: must be an int or None, got bool")
    try:
        value = operator.index(n_threads)
    except TypeError:
        raise TypeError(f"n_threads: must be an int or None, got "
                        f"{type(n_threads).__name__}") from None
    if value < 1:
        raise ValueError(f"n_threads: must be >= 1, got {value}")
    return min(value, 1 << 16)  # the kernel caps at B as well; keep it a C int
