"""Stub for the compiled sampling module (tep/_kernels/sampling.pyx).

Use the validating wrappers in :mod:`tep.kernels`; these entry points trust their inputs.
"""
import numpy as np
import numpy.typing as npt

TOP_P_SAMPLE_SIZE: int
"""top_p alone estimates its threshold from every (V // TOP_P_SAMPLE_SIZE)-th token."""

def simd_init(allow_avx2: bool = True) -> int:
    """Select the AVX2+FMA row primitives (1) or the portable C path (0); returns the level."""
def simd_level() -> int:
    """1 when the AVX2+FMA row primitives are in use, 0 for the portable path."""
def philox(seed: int, step: int) -> float:
    """The uniform in [0, 1) that the kernel draws for (seed, step)."""
def max_threads() -> int:
    """Threads OpenMP uses by default (honours OMP_NUM_THREADS); 1 without OpenMP."""
def sample_one(logits: npt.NDArray[np.float32], temperature: float, top_k: int, top_p: float,
               min_p: float, seed: int, step: int,
               mask: npt.NDArray[np.uint32] | None = None,
               bias_ids: npt.NDArray[np.int32] | None = None,
               bias_values: npt.NDArray[np.float32] | None = None) -> int:
    """One row [V], scalar knobs, no penalties, allowed set or logprobs; optionally a
    bitmask row [>= ceil(V/32)] and a logit bias (ids int32 [n], values float32 [n]): the
    token id, or -status on failure."""
def sample_rows(logits: npt.NDArray[np.float32], temperature: float, top_k: int, top_p: float,
                min_p: float, seed: npt.NDArray[np.uint64], step: int, n_threads: int,
                out_tokens: npt.NDArray[np.int64], out_status: npt.NDArray[np.int32],
                mask: npt.NDArray[np.uint32] | None = None) -> None:
    """Rows [B, V] sharing scalar knobs, no edits or logprobs; seed is [1 or B]; optional
    bitmask rows [B, >= ceil(V/32)]."""
def sample_batch(logits: npt.NDArray[np.float32], knobs: npt.NDArray[np.float64],
                 seed: npt.NDArray[np.uint64], step: npt.NDArray[np.uint64],
                 prompt_ids: npt.NDArray[np.int32], prompt_starts: npt.NDArray[np.int64],
                 prompt_ends: npt.NDArray[np.int64],
                 output_ids: npt.NDArray[np.int32], output_starts: npt.NDArray[np.int64],
                 output_ends: npt.NDArray[np.int64],
                 bias_ids: npt.NDArray[np.int32], bias_values: npt.NDArray[np.float32],
                 bias_starts: npt.NDArray[np.int64], bias_ends: npt.NDArray[np.int64],
                 allowed_ids: npt.NDArray[np.int32], allowed_starts: npt.NDArray[np.int64],
                 allowed_ends: npt.NDArray[np.int64], has_allowed: npt.NDArray[np.uint8],
                 bitmask: npt.NDArray[np.uint32], use_bitmask: bool,
                 n_top: int, want_logprobs: bool, need_work: bool, max_history: int,
                 n_threads: int,
                 out_tokens: npt.NDArray[np.int64], out_status: npt.NDArray[np.int32],
                 out_logprobs: npt.NDArray[np.float32], out_ranks: npt.NDArray[np.int64],
                 out_top_ids: npt.NDArray[np.int64],
                 out_top_logprobs: npt.NDArray[np.float32]) -> None:
    """Sample rows of logits [B, V] into the out_* arrays; out_status[r] != 0 flags row r
    (its token is -1).

    knobs [7, 1 or B]: temperature, top_k, top_p, min_p, repetition, presence, frequency;
    seed and step [1 or B]; one column/element applies to every row. Each ragged input is
    int32 ids [N >= 1] with int64 starts/ends [B] (row r = ids[starts[r]:ends[r]]); a slice
    outside the id array is empty and ids outside [0, V) are skipped. bitmask [B, W >=
    ceil(V/32)] (read when use_bitmask): bit j % 32 of word j // 32 allows token j."""
def apply_bitmask_batch(logits: npt.NDArray[np.float32], bitmask: npt.NDArray[np.uint32],
                        n_threads: int) -> None:
    """In place: logits[r, j] = -inf where bit j of bitmask[r] is clear ([B, V], [B, W])."""
def log_softmax_batch(logits: npt.NDArray[np.float32], out: npt.NDArray[np.float32],
                      out_status: npt.NDArray[np.int32], n_threads: int) -> None:
    """out = log_softmax(logits) row-wise; out_status[r] != 0 flags row r."""
