# Speculative-decoding verification: `noexcept nogil`, returning a status per row.
# The validating Python wrapper is tep/kernels/speculative.py.
from tep._kernels._typedefs cimport float32_t, int32_t, int64_t, intp_t, uint32_t
from tep._kernels.sampling cimport Knobs, RowEdits, Scratch

cdef int verify_row(const float32_t* x, intp_t V, const int32_t* draft, intp_t k,
                    const Knobs* kn, RowEdits* ed, int32_t* hist, Scratch* sc,
                    int n_top, bint want_lp, int64_t* tok_out, intp_t* n_out,
                    float32_t* lp_out, int64_t* rank_out, int64_t* top_ids_out,
                    float32_t* top_lp_out, const uint32_t* mask, intp_t mask_words) noexcept nogil
