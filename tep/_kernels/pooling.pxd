# Pooling kernels: hidden states float32 -> one float32 vector per sequence.
#
# Every kernel runs without the GIL and returns a status (POOL_OK on success); the caller
# (tep.kernels.pooling.pool, or another Cython module that cimports this one) allocates
# `out_bd` and raises on a non-zero status. Accumulation is float64.
#
# Conventions: IN arrays are `const` memoryviews (read-only numpy arrays are accepted);
# `out_bd` is OUT, shape [B, D'] with D' <= D: only the first D' components are pooled,
# which is how `dimensions` truncation is expressed. `n_threads` >= 1 (capped at B).
from tep._kernels._typedefs cimport float32_t, float64_t, int64_t, intp_t, uint8_t

cdef enum:
    # modes
    POOL_MEAN = 0
    POOL_MAX = 1
    POOL_CLS = 2      # first valid token
    POOL_LAST = 3     # last valid token
    POOL_SUM = 4

cdef enum:
    # statuses
    POOL_OK = 0
    POOL_ERR_MODE = 1         # mode not one of POOL_*
    POOL_ERR_SHAPE = 2        # out_bd / offsets / lengths / mask shapes disagree with hidden
    POOL_ERR_OFFSETS = 3      # offsets decreasing or outside [0, N]
    POOL_ERR_LENGTHS = 4      # a length outside [0, T]
    POOL_ERR_NOMEM = 5        # a thread-local accumulator could not be allocated

# Ragged: sequence b is hidden_nd[offsets_b1[b]:offsets_b1[b + 1]].
cdef int c_pool_ragged(const float32_t[:, ::1] hidden_nd, const int64_t[::1] offsets_b1,
                       int mode, bint normalize, float32_t[:, ::1] out_bd,
                       int n_threads) noexcept nogil

# Padded with lengths: sequence b is hidden_btd[b, :lengths_b[b]].
cdef int c_pool_lengths(const float32_t[:, :, ::1] hidden_btd, const int64_t[::1] lengths_b,
                        int mode, bint normalize, float32_t[:, ::1] out_bd,
                        int n_threads) noexcept nogil

# Padded with a mask: sequence b is the positions t with mask_bt[b, t] != 0, in order.
cdef int c_pool_masked(const float32_t[:, :, ::1] hidden_btd, const uint8_t[:, ::1] mask_bt,
                       int mode, bint normalize, float32_t[:, ::1] out_bd,
                       int n_threads) noexcept nogil
