# Token-sampling kernels: one row of logits at a time, `noexcept nogil`, returning a status.
# The validating Python wrapper is tep/kernels/sampling.py.
from tep._kernels._typedefs cimport (float32_t, float64_t, int32_t, int64_t, uint32_t,
                                     uint64_t, intp_t)

cdef enum Status:
    TEP_OK = 0
    TEP_NO_FINITE = 1      # the row has no finite logit (after NaN -> -inf and masking)
    TEP_POS_INF = 2        # the row holds +inf
    TEP_NO_MEMORY = 3
    TEP_MASKED_ALL = 4     # finite logits exist, but the allowed set / bitmask keeps none

cdef struct Knobs:
    float32_t temperature
    float32_t top_p
    float32_t min_p
    float32_t repetition_penalty
    float32_t presence_penalty
    float32_t frequency_penalty
    int64_t top_k
    uint64_t seed
    uint64_t step

cdef struct RowEdits:
    # Sparse per-row edits, each a pointer + length into the wrapper's id arrays. Ids are
    # int32 and not trusted: the kernel skips any id outside [0, V).
    const int32_t* prompt_ids
    intp_t n_prompt
    const int32_t* output_ids
    intp_t n_output
    const int32_t* bias_ids
    const float32_t* bias_values
    intp_t n_bias
    const int32_t* allowed_ids
    intp_t n_allowed
    bint has_allowed
    const uint32_t* mask     # grammar bitmask words [ceil(V/32)] (bit j allows token j), or NULL

cdef extern from "_simd.h" nogil:
    ctypedef struct Cand "tep_cand":
        float32_t v      # (processed) logit
        float32_t e      # exp((v - max) / T)
        int64_t idx      # token id

cdef struct Scratch:
    # Views into one block: this thread's kept block (see _scratch.h) or, when block is
    # not NULL, a block of this call's own that scratch_free gives back.
    char* block
    float32_t* work      # [V] processed logits (only when a row has edits)
    float32_t* bmax      # [nb] block maxima of the row being sampled
    float32_t* bmax_raw  # [nb] block maxima of the raw row (logprobs)
    float64_t* bsum      # [nb] block sums of exp
    float32_t* sel       # [V] quickselect scratch
    float32_t* ebuf      # [V] exp values of the top-p sample
    Cand* cand           # [2V] candidate tokens (second half: top-p sample)
    float64_t* hist      # [HIST_BINS] top-p sample histogram
    float64_t* hist2     # [HIST_BINS] mass histogram of mass_select
    int32_t* hbuf        # [n_prompt + n_output] sorted history copy

cdef double philox_uniform(uint64_t seed, uint64_t step) noexcept nogil
cdef int sample_row(const float32_t* x, intp_t V, const Knobs* kn, const RowEdits* ed,
                    Scratch* sc, int64_t* token_out) noexcept nogil
cdef int raw_logprobs_row(const float32_t* x, intp_t V, int64_t token, int n_top, bint reuse_bmax,
                          Scratch* sc, float32_t* lp_out, int64_t* rank_out,
                          int64_t* top_ids_out, float32_t* top_lp_out) noexcept nogil
cdef int scratch_alloc(Scratch* sc, intp_t V, bint need_work, intp_t max_hist,
                       bint need_raw, bint greedy_only=*) noexcept nogil
cdef void scratch_free(Scratch* sc) noexcept nogil
cdef int log_softmax_row(const float32_t* x, intp_t V, float32_t* bmax,
                         float32_t* out) noexcept nogil


# Ragged per-row id lists (prompt, output, bias, allowed) as the batched kernels take them;
# shared by sampling.pyx and speculative.pyx.
cdef struct Ragged:
    # Row r's items are ids[start[r]:end[r]] (and vals[...] when present); n_ids bounds
    # every slice (the wrapper checks 0 <= start <= end <= n_ids; the kernel re-checks).
    const int32_t* ids
    const float32_t* vals
    const int64_t* start
    const int64_t* end
    intp_t n_ids


cdef inline intp_t ragged_row(const Ragged* rg, intp_t r, intp_t* first) noexcept nogil:
    """Length of row r's slice (0 for a slice outside the id array) and its first index."""
    cdef int64_t a = rg.start[r], b = rg.end[r]
    if a < 0 or b < a or b > rg.n_ids:
        first[0] = 0
        return 0
    first[0] = a
    return b - a


cdef inline void set_ragged(Ragged* rg, const int32_t[::1] ids, const float32_t* vals,
                            const int64_t[::1] start, const int64_t[::1] end) noexcept:
    rg.ids = &ids[0]; rg.vals = vals; rg.start = &start[0]; rg.end = &end[0]
    rg.n_ids = ids.shape[0]
