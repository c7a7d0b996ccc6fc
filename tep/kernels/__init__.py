"""Sampling and pooling kernels over numpy arrays.

    from tep.kernels import sample, pool, log_softmax, apply_token_bitmask, verify

Each function validates its arguments (raising ``TypeError``/``ValueError`` that name the
argument), then runs a compiled Cython kernel with the GIL released.
"""
from tep.kernels.pooling import pool
from tep.kernels.sampling import (RowStatus, SampledRows, SampleResult, TokenSpans,
                                  apply_token_bitmask, log_softmax, sample)
from tep.kernels.speculative import Verified, verify, verify_rejection

__all__ = ["sample", "SampleResult", "SampledRows", "TokenSpans", "RowStatus",
           "apply_token_bitmask", "log_softmax", "pool", "verify", "verify_rejection", "Verified"]
