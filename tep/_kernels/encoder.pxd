# BERT encoder forward pass over a ragged batch: BLAS sgemm for the projections, fused
# row kernels (_encoder_rows.h) for everything between them. See encoder.pyx.
from tep._kernels._typedefs cimport float32_t, int64_t, intp_t

cdef extern from "_encoder_pool.h" nogil:
    int TEP_POOL_MAX
    ctypedef void (*tep_task_fn)(void* ctx, intp_t item, int worker) noexcept nogil
    ctypedef struct tep_pool:
        int n_workers
    tep_pool* tep_pool_new(int n_workers)
    void tep_pool_free(tep_pool* p)
    void tep_pool_run(tep_pool* p, int helpers, tep_task_fn fn, void* ctx, intp_t n_items)

# Fortran BLAS sgemm (column-major), as scipy.linalg.cython_blas exports it.
ctypedef void (*sgemm_fn)(char* transa, char* transb, int* m, int* n, int* k, float32_t* alpha,
                          float32_t* a, int* lda, float32_t* b, int* ldb, float32_t* beta,
                          float32_t* c, int* ldc) noexcept nogil

cdef enum:
    ENC_OK = 0
    ENC_ERR_OFFSETS = 1   # offsets not non-decreasing from 0 to N
    ENC_ERR_TOO_LONG = 2  # a sequence longer than max_pos
    ENC_ERR_VOCAB = 3     # a token ID outside [0, vocab)
    ENC_ERR_WORK = 4      # the work buffer is smaller than c_work_floats says

# One transformer layer; weights input-major ([in, out], so the product is x @ w), Q columns
# of w_qkv and b_qkv pre-scaled by 1/sqrt(head_dim).
cdef struct EncLayer:
    const float32_t* w_qkv   # [D, 3D]
    const float32_t* b_qkv   # [3D]
    const float32_t* w_o     # [D, D]
    const float32_t* b_o
    const float32_t* ln1_g
    const float32_t* ln1_b
    const float32_t* w_i     # [D, I]
    const float32_t* b_i     # [I]
    const float32_t* w_out   # [I, D]
    const float32_t* b_out
    const float32_t* ln2_g
    const float32_t* ln2_b
    # the same four matrices packed in 32-column panels (_encoder_gemm.h), or NULL
    const float32_t* p_qkv
    const float32_t* p_o
    const float32_t* p_i
    const float32_t* p_out

cdef struct EncModel:
    intp_t vocab
    intp_t d              # hidden size D
    intp_t n_heads
    intp_t head_dim
    intp_t inter          # intermediate size I
    intp_t n_layers
    intp_t max_pos
    float32_t eps
    int act               # TEP_ACT_* of _encoder_rows.h
    intp_t small_rows     # products with at most this many rows use the packed panels
    const float32_t* word_emb   # [vocab, D]
    const float32_t* pos_emb    # [max_pos, D], token type 0 folded in
    const float32_t* ln_g
    const float32_t* ln_b
    const EncLayer* layers      # [n_layers]
    sgemm_fn gemm

# Floats of work memory c_encode needs for n tokens whose longest sequence has max_len.
cdef intp_t c_work_floats(const EncModel* m, intp_t n, intp_t max_len, int n_threads) noexcept nogil

# Last hidden states of the ragged batch (sequence b = ids_n[offsets_b1[b]:offsets_b1[b+1]])
# into out_nd (OUT, [n, D], row-major). work: >= c_work_floats floats. pool: NULL, or a
# pool of n_threads - 1 workers (tep_pool_new). Returns ENC_*.
cdef int c_encode(const EncModel* m, const int64_t* ids_n, intp_t n, const int64_t* offsets_b1,
                  intp_t b, float32_t* out_nd, float32_t* work, intp_t work_floats,
                  tep_pool* pool, int n_threads) noexcept nogil
