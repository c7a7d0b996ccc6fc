"""Stub for the compiled verification module (tep/_kernels/speculative.pyx).

Use the validating wrapper :func:`tep.kernels.verify`; this entry point trusts its inputs.
"""
import numpy as np
import numpy.typing as npt

def verify_batch(logits: npt.NDArray[np.float32], row_start: npt.NDArray[np.int64],
                 n_draft: npt.NDArray[np.int64], drafts: npt.NDArray[np.int32],
                 knobs: npt.NDArray[np.float64], seed: npt.NDArray[np.uint64],
                 step: npt.NDArray[np.uint64],
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
                 max_output: int, n_threads: int,
                 out_tokens: npt.NDArray[np.int64], out_count: npt.NDArray[np.int64],
                 out_status: npt.NDArray[np.int32], out_logprobs: npt.NDArray[np.float32],
                 out_ranks: npt.NDArray[np.int64], out_top_ids: npt.NDArray[np.int64],
                 out_top_logprobs: npt.NDArray[np.float32]) -> None:
    """Exact-match verification: sequence r owns logits rows row_start[r] ..
    row_start[r] + n_draft[r]; row j is sampled at step + j with the accepted drafts in the
    output history; drafts are accepted while they equal the samples. out_tokens [B, K+1],
    out_count [B] (emitted tokens), out_status [B]; logprob outputs [B, K+1(, n_top)]."""
def rejection_batch(logits: npt.NDArray[np.float32], row_start: npt.NDArray[np.int64],
                    n_draft: npt.NDArray[np.int64], drafts: npt.NDArray[np.int32],
                    draft_probs: npt.NDArray[np.float32], q_start: npt.NDArray[np.int64],
                    temperature: npt.NDArray[np.float32], seed: npt.NDArray[np.uint64],
                    step: npt.NDArray[np.uint64], n_threads: int,
                    out_tokens: npt.NDArray[np.int64], out_count: npt.NDArray[np.int64],
                    out_status: npt.NDArray[np.int32]) -> None:
    """Speculative (rejection) sampling: accept draft j with min(1, p_j/q_j), resample
    the first rejection from max(0, p - q) normalised, bonus from p_k after k accepts."""
