"""BERT encoder forward pass over a ragged batch, compiled.

A batch is the token IDs of all sequences concatenated (``ids_n`` [N]) plus ``offsets_b1``
[B+1]. Nothing is padded: the four projections of each layer are one sgemm each over all N
tokens, and attention runs per (sequence, head) on that sequence's own L x L scores, so a
batch costs the sum of its sequences' costs.

Per layer (x: [N, D], updated in place in the output array):

  qkv   = x @ W_qkv + b                 sgemm, bias added to the block each thread computed
  ctx   = softmax(Q K^T) V              per (sequence, head): sgemm, row softmax, sgemm
  x     = LayerNorm(x + ctx @ W_o + b)  sgemm, then residual + bias + LayerNorm in one pass
  inter = GELU(x @ W_i + b)             sgemm, bias + GELU on the block just computed
  x     = LayerNorm(x + inter @ W_out + b)

sgemm is the Fortran BLAS routine scipy exports (``scipy.linalg.cython_blas``), passed in as
a function pointer so tep builds without scipy. BLAS runs single-threaded; threads are tep's own
(a small work-claiming pool, _encoder_pool.h): a projection is split by rows when there are
many tokens and by output columns when there are few; attention items are (sequence, head)
pairs. With up to SMALL_ROWS tokens (one sentence, small batches) the projections skip BLAS
for a kernel over weights packed once at load (_encoder_gemm.h): per call, BLAS re-packs
the whole weight matrix, which at batch 1 cost three times the arithmetic.

Work memory (qkv, ctx, a projection output, the intermediate activations and one L x L
score block per thread) is one buffer that the Python object keeps and reuses between
calls; concurrent calls each take their own.
"""
from cpython.pycapsule cimport PyCapsule_GetName, PyCapsule_GetPointer, PyCapsule_IsValid
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

import os

import numpy as np

from tep._kernels._typedefs cimport float32_t, int64_t, intp_t


cdef extern from "_encoder_rows.h" nogil:
    int TEP_ACT_GELU_ERF
    int TEP_ACT_GELU_TANH
    int TEP_ACT_RELU
    void tep_enc_bias_add(float32_t* x, intp_t ld, const float32_t* b, intp_t rows, intp_t cols)
    void tep_enc_bias_act(float32_t* x, intp_t ld, const float32_t* b, intp_t rows, intp_t cols,
                          int act)
    void tep_enc_add_ln(float32_t* r, intp_t ldr, const float32_t* y, intp_t ldy,
                        const float32_t* b, const float32_t* g, const float32_t* beta,
                        intp_t rows, intp_t d, float32_t eps)
    void tep_enc_softmax(float32_t* s, intp_t ld, intp_t rows, intp_t n)
    int tep_enc_rows_init(int allow_avx2)


cdef extern from "_encoder_gemm.h" nogil:
    int TEP_PANEL
    void tep_pack_panels(const float32_t* w, intp_t k, intp_t n, float32_t* out)
    void tep_gemm_small(const float32_t* a, intp_t lda, intp_t m, intp_t k,
                        const float32_t* packed, intp_t n, float32_t* c, intp_t ldc,
                        intp_t p0, intp_t p1)
    int tep_gemm_small_ok(int allow)


ACTIVATIONS = {"gelu": TEP_ACT_GELU_ERF, "gelu_new": TEP_ACT_GELU_TANH,
               "gelu_pytorch_tanh": TEP_ACT_GELU_TANH, "relu": TEP_ACT_RELU}
SIMD_AVX2 = bool(tep_enc_rows_init(os.environ.get("TEP_SIMD", "") != "scalar"))
SMALL_GEMM = bool(tep_gemm_small_ok(os.environ.get("TEP_SIMD", "") != "scalar"))
"""True when few-token products may use the packed-panel AVX-512 kernel."""
# Products with at most this many token rows use the packed panels. Measured (CPU time,
# all-MiniLM, 1 thread): packed ahead of OpenBLAS from 1 row (2x at 32 rows) up to ~1000
# rows, where BLAS's cache blocking of the activations starts to win.
SMALL_ROWS = 768

cdef enum:
    _POST_BIAS = 0    # C += b
    _POST_ACT = 1     # C = act(C + b)
    _POST_LN = 2      # x = LayerNorm(x + C + b)
    # Tokens per thread below which a projection is split by output columns, not rows:
    # with few rows, packing the weight matrix costs as much as the product, and a
    # column split has each thread pack only its columns.
    _ROW_SPLIT_MIN = 48
    _ALIGN = 16       # floats (64 bytes): column-split and buffer boundaries
    _POOLS = 17       # thread counts 1..16 per call


MAX_THREADS = _POOLS - 1
"""Most threads one call may use (the caller plus its pool's workers)."""


cdef inline intp_t _round_up(intp_t x) noexcept nogil:
    return (x + _ALIGN - 1) // _ALIGN * _ALIGN


cdef intp_t c_work_floats(const EncModel* m, intp_t n, intp_t max_len, int n_threads) noexcept nogil:
    return (_round_up(n * 3 * m.d) + 2 * _round_up(n * m.d) + _round_up(n * m.inter)
            + n_threads * _round_up(max_len * max_len))


# Row-major C[m, n] = op(A) op(B) (+ beta C) through column-major sgemm: a row-major matrix
# is its column-major transpose, so compute C^T = op(B)^T op(A)^T with the same flags.
cdef inline void _gemm(sgemm_fn f, char ta, char tb, int m, int n, int k, const float32_t* a,
                       int lda, const float32_t* b, int ldb, float32_t beta, float32_t* c,
                       int ldc) noexcept nogil:
    cdef float32_t one = 1.0
    f(&tb, &ta, &n, &m, &k, &one, <float32_t*>b, &ldb, <float32_t*>a, &lda, &beta, c, &ldc)


cdef void _dense_part(const EncModel* m, const float32_t* a, intp_t k, const float32_t* w,
                      const float32_t* packed, intp_t n_out, const float32_t* bias, float32_t* c,
                      int post, float32_t* x, const float32_t* g, const float32_t* beta,
                      intp_t r0, intp_t r1, intp_t c0, intp_t c1) noexcept nogil:
    """C[r0:r1, c0:c1] = A[r0:r1] @ W[:, c0:c1], then its post-op (LN only with all columns).

    With ``packed`` (few rows), c0 and c1 are multiples of TEP_PANEL (c1 may be n_out)."""
    if r1 <= r0 or c1 <= c0:
        return
    if packed != NULL:
        tep_gemm_small(a + r0 * k, k, r1 - r0, k, packed, n_out, c + r0 * n_out, n_out,
                       c0 // TEP_PANEL, (c1 + TEP_PANEL - 1) // TEP_PANEL)
    else:
        _gemm(m.gemm, b'N', b'N', <int>(r1 - r0), <int>(c1 - c0), <int>k, a + r0 * k, <int>k,
              w + c0, <int>n_out, 0.0, c + r0 * n_out + c0, <int>n_out)
    if post == _POST_BIAS:
        tep_enc_bias_add(c + r0 * n_out + c0, n_out, bias + c0, r1 - r0, c1 - c0)
    elif post == _POST_ACT:
        tep_enc_bias_act(c + r0 * n_out + c0, n_out, bias + c0, r1 - r0, c1 - c0, m.act)
    elif c0 == 0 and c1 == n_out:
        tep_enc_add_ln(x + r0 * n_out, n_out, c + r0 * n_out, n_out, bias, g, beta, r1 - r0,
                       n_out, m.eps)


cdef struct _DenseJob:
    const EncModel* m
    const float32_t* a
    intp_t n_rows
    intp_t k
    const float32_t* w
    const float32_t* packed
    intp_t n_out
    const float32_t* bias
    float32_t* c
    int post
    float32_t* x
    const float32_t* g
    const float32_t* beta
    bint by_rows
    intp_t n_items
    intp_t unit          # columns per item (column split); 0 with by_rows


cdef void _dense_item(void* ctx, intp_t item, int worker) noexcept nogil:
    cdef _DenseJob* j = <_DenseJob*>ctx
    cdef intp_t r0, r1, c0, c1
    if j.by_rows:
        r0 = j.n_rows * item // j.n_items
        r1 = j.n_rows * (item + 1) // j.n_items
        _dense_part(j.m, j.a, j.k, j.w, j.packed, j.n_out, j.bias, j.c, j.post, j.x, j.g,
                    j.beta, r0, r1, 0, j.n_out)
    else:
        c0 = item * j.unit
        c1 = c0 + j.unit
        if c1 > j.n_out:
            c1 = j.n_out
        _dense_part(j.m, j.a, j.k, j.w, j.packed, j.n_out, j.bias, j.c, j.post, j.x, j.g,
                    j.beta, 0, j.n_rows, c0, c1)


cdef void _ln_item(void* ctx, intp_t item, int worker) noexcept nogil:
    """Residual + bias + LayerNorm over rows [8 item, 8 item + 8) (after a column split)."""
    cdef _DenseJob* j = <_DenseJob*>ctx
    cdef intp_t r0 = item * 8, r1 = r0 + 8
    if r1 > j.n_rows:
        r1 = j.n_rows
    tep_enc_add_ln(j.x + r0 * j.n_out, j.n_out, j.c + r0 * j.n_out, j.n_out, j.bias, j.g,
                   j.beta, r1 - r0, j.n_out, j.m.eps)


cdef void _dense(const EncModel* m, const float32_t* a, intp_t n_rows, intp_t k,
                 const float32_t* w, const float32_t* packed, intp_t n_out,
                 const float32_t* bias, float32_t* c, int post,
                 float32_t* x, const float32_t* g, const float32_t* beta,
                 tep_pool* pool, int nt) noexcept nogil:
    """C [n_rows, n_out] = A [n_rows, k] @ W [k, n_out] + post-op, over nt threads.

    Few rows (<= m.small_rows, with packed panels): the packed-panel kernel, one item per
    panel. Otherwise BLAS: with many rows one item per thread's share of rows (each BLAS
    call packs the whole weight, so fewer, larger items); with few, shares of columns."""
    cdef _DenseJob j
    j.m = m
    j.a = a
    j.n_rows = n_rows
    j.k = k
    j.w = w
    j.packed = packed if (packed != NULL and n_rows <= m.small_rows) else NULL
    j.n_out = n_out
    j.bias = bias
    j.c = c
    j.post = post
    j.x = x
    j.g = g
    j.beta = beta
    j.by_rows = j.packed == NULL and n_rows >= _ROW_SPLIT_MIN * nt
    if nt <= 1:
        j.by_rows = True
        j.n_items = 1
        j.unit = 0
    elif j.by_rows:
        j.n_items = nt
        j.unit = 0
    elif j.packed != NULL:
        j.unit = TEP_PANEL
        j.n_items = (n_out + TEP_PANEL - 1) // TEP_PANEL
    else:
        j.unit = ((n_out + nt - 1) // nt + _ALIGN - 1) // _ALIGN * _ALIGN
        j.n_items = (n_out + j.unit - 1) // j.unit
    tep_pool_run(pool, nt - 1, _dense_item, &j, j.n_items)
    if post == _POST_LN and not j.by_rows:  # a LayerNorm needs whole rows: a second pass
        tep_pool_run(pool, nt - 1, _ln_item, &j, (n_rows + 7) // 8)


cdef void _attend_one(const EncModel* m, const float32_t* qkv, float32_t* ctx, intp_t row0,
                      intp_t length, intp_t h, float32_t* scores) noexcept nogil:
    """ctx[rows, head h] = softmax(Q K^T) V for one sequence (scores: its own L x L block,
    never a padded one)."""
    cdef intp_t d = m.d, dh = m.head_dim
    cdef const float32_t* q = qkv + row0 * 3 * d + h * dh
    cdef int L = <int>length, ld3 = <int>(3 * d)
    _gemm(m.gemm, b'N', b'T', L, L, <int>dh, q, ld3, q + d, ld3, 0.0, scores, L)
    tep_enc_softmax(scores, L, L, L)
    _gemm(m.gemm, b'N', b'N', L, <int>dh, L, scores, L, q + 2 * d, ld3, 0.0,
          ctx + row0 * d + h * dh, <int>d)


cdef struct _AttnJob:
    const EncModel* m
    const int64_t* offsets_b1
    const float32_t* qkv
    float32_t* ctx
    float32_t* scores
    intp_t score_stride


cdef void _attn_item(void* ctx, intp_t item, int worker) noexcept nogil:
    cdef _AttnJob* j = <_AttnJob*>ctx
    cdef intp_t s = item // j.m.n_heads
    cdef intp_t row0 = j.offsets_b1[s], length = j.offsets_b1[s + 1] - j.offsets_b1[s]
    if length > 0:
        _attend_one(j.m, j.qkv, j.ctx, row0, length, item % j.m.n_heads,
                    j.scores + worker * j.score_stride)


cdef void _attention(const EncModel* m, const int64_t* offsets_b1, intp_t b,
                     const float32_t* qkv, float32_t* ctx, float32_t* scores,
                     intp_t score_stride, tep_pool* pool, int nt) noexcept nogil:
    cdef _AttnJob j
    j.m = m
    j.offsets_b1 = offsets_b1
    j.qkv = qkv
    j.ctx = ctx
    j.scores = scores
    j.score_stride = score_stride
    tep_pool_run(pool if nt > 1 else NULL, nt - 1, _attn_item, &j, b * m.n_heads)


cdef int c_encode(const EncModel* m, const int64_t* ids_n, intp_t n, const int64_t* offsets_b1,
                  intp_t b, float32_t* out_nd, float32_t* work, intp_t work_floats,
                  tep_pool* pool, int n_threads) noexcept nogil:
    cdef intp_t i, s, p, max_len = 0, d = m.d
    cdef int nt = n_threads if (n_threads > 1 and pool != NULL) else 1
    cdef const EncLayer* w
    # -- validate (cheap next to the forward pass, and the kernel never trusts its caller)
    if offsets_b1[0] != 0 or offsets_b1[b] != n:
        return ENC_ERR_OFFSETS
    for s in range(b):
        if offsets_b1[s + 1] < offsets_b1[s]:
            return ENC_ERR_OFFSETS
        if offsets_b1[s + 1] - offsets_b1[s] > max_len:
            max_len = offsets_b1[s + 1] - offsets_b1[s]
    if max_len > m.max_pos:
        return ENC_ERR_TOO_LONG
    for i in range(n):
        if ids_n[i] < 0 or ids_n[i] >= m.vocab:
            return ENC_ERR_VOCAB
    if n == 0:
        return ENC_OK
    if work_floats < c_work_floats(m, n, max_len, nt):
        return ENC_ERR_WORK

    cdef float32_t* qkv = work
    cdef float32_t* ctx = qkv + _round_up(n * 3 * d)
    cdef float32_t* proj = ctx + _round_up(n * d)
    cdef float32_t* inter = proj + _round_up(n * d)
    cdef float32_t* scores = inter + _round_up(n * m.inter)
    cdef intp_t score_stride = _round_up(max_len * max_len)

    # -- embeddings: word + (position + type 0), LayerNorm
    for s in range(b):
        for i in range(offsets_b1[s], offsets_b1[s + 1]):
            p = i - offsets_b1[s]
            memcpy(out_nd + i * d, m.word_emb + ids_n[i] * d, d * sizeof(float32_t))
            tep_enc_add_ln(out_nd + i * d, d, m.pos_emb + p * d, d, NULL, m.ln_g, m.ln_b, 1, d,
                           m.eps)

    for i in range(m.n_layers):
        w = &m.layers[i]
        _dense(m, out_nd, n, d, w.w_qkv, w.p_qkv, 3 * d, w.b_qkv, qkv, _POST_BIAS,
               NULL, NULL, NULL, pool, nt)
        _attention(m, offsets_b1, b, qkv, ctx, scores, score_stride, pool, nt)
        _dense(m, ctx, n, d, w.w_o, w.p_o, d, w.b_o, proj, _POST_LN, out_nd, w.ln1_g, w.ln1_b,
               pool, nt)
        _dense(m, out_nd, n, d, w.w_i, w.p_i, m.inter, w.b_i, inter, _POST_ACT,
               NULL, NULL, NULL, pool, nt)
        _dense(m, inter, n, m.inter, w.w_out, w.p_out, d, w.b_out, proj, _POST_LN, out_nd,
               w.ln2_g, w.ln2_b, pool, nt)
    return ENC_OK


# ---------------------------------------------------------------------------------------------

cdef class _Work:
    """One reusable work buffer (grown, never shrunk)."""
    cdef float32_t* buf
    cdef intp_t size

    def __dealloc__(self):
        free(self.buf)

    cdef int reserve(self, intp_t floats) except -1:
        if floats <= self.size:
            return 0
        free(self.buf)
        self.size = 0
        self.buf = <float32_t*>malloc(floats * sizeof(float32_t))
        if self.buf == NULL:
            raise MemoryError(f"encoder work buffer of {floats * 4} bytes")
        self.size = floats
        return 0


_ERRORS = {
    ENC_ERR_OFFSETS: "offsets_b1 must go non-decreasing from 0 to N",
    ENC_ERR_TOO_LONG: "a sequence is longer than max_position_embeddings",
    ENC_ERR_VOCAB: "a token ID is outside [0, vocab_size)",
    ENC_ERR_WORK: "work buffer too small (internal error)",
}


cdef sgemm_fn _sgemm_from_capsule(object capsule) except NULL:
    name = PyCapsule_GetName(capsule)
    if not PyCapsule_IsValid(capsule, name):
        raise TypeError("sgemm must be a PyCapsule (scipy.linalg.cython_blas.__pyx_capi__['sgemm'])")
    cdef void* ptr = PyCapsule_GetPointer(capsule, name)
    if ptr == NULL:
        raise TypeError("sgemm capsule holds no pointer")
    return <sgemm_fn>ptr


cdef class Encoder:
    """Compiled BERT forward pass over weights held as float32 C-contiguous numpy arrays.

    Built by :class:`tep.backends._bert_encoder.BertEncoder`, which prepares the arrays
    (see ``encoder.pyi`` for the argument list). Keeps references to every array, so the
    pointers stay valid; thread-safe (each concurrent call uses its own work buffer).
    """
    cdef EncModel model
    cdef EncLayer* layers
    cdef object _keep
    cdef list _free_work
    cdef tep_pool* pools[_POOLS]   # pools[nt]: nt - 1 workers, made on first use

    def __cinit__(self):
        self.layers = NULL
        for i in range(_POOLS):
            self.pools[i] = NULL

    def __init__(self, *, word_emb, pos_emb, ln_g, ln_b, layers, float eps, str act, sgemm,
                 int small_rows=SMALL_ROWS):
        cdef const float32_t[:, ::1] we = word_emb
        cdef const float32_t[:, ::1] pe = pos_emb
        cdef const float32_t[::1] g = ln_g
        cdef const float32_t[::1] bb = ln_b
        cdef intp_t d = we.shape[1], i, j
        if pe.shape[1] != d or g.shape[0] != d or bb.shape[0] != d:
            raise ValueError("embedding tables and LayerNorm must share the hidden size")
        if act not in ACTIVATIONS:
            raise ValueError(f"activation {act!r} not supported ({sorted(ACTIVATIONS)})")
        layers = list(layers)
        if not layers:
            raise ValueError("no layers")
        n_heads = int(layers[0]["n_heads"])
        if n_heads <= 0 or d % n_heads:
            raise ValueError("hidden size must be a multiple of n_heads")
        inter = int(np.asarray(layers[0]["b_i"]).shape[0])
        shapes = {"w_qkv": (d, 3 * d), "b_qkv": (3 * d,), "w_o": (d, d), "b_o": (d,),
                  "ln1_g": (d,), "ln1_b": (d,), "w_i": (d, inter), "b_i": (inter,),
                  "w_out": (inter, d), "b_out": (d,), "ln2_g": (d,), "ln2_b": (d,)}
        keep = [word_emb, pos_emb, ln_g, ln_b]
        arrays = []
        for li, layer in enumerate(layers):
            row = {}
            for name, shape in shapes.items():
                a = layer[name]
                if not isinstance(a, np.ndarray) or a.dtype != np.float32 or \
                        not a.flags.c_contiguous or a.shape != shape:
                    raise ValueError(f"layer {li} {name}: need float32 C-contiguous {shape}")
                row[name] = a
                keep.append(a)
            arrays.append(row)
        self.layers = <EncLayer*>malloc(len(arrays) * sizeof(EncLayer))
        if self.layers == NULL:
            raise MemoryError()
        for i, row in enumerate(arrays):
            self.layers[i].w_qkv = _ptr(row["w_qkv"])
            self.layers[i].b_qkv = _ptr(row["b_qkv"])
            self.layers[i].w_o = _ptr(row["w_o"])
            self.layers[i].b_o = _ptr(row["b_o"])
            self.layers[i].ln1_g = _ptr(row["ln1_g"])
            self.layers[i].ln1_b = _ptr(row["ln1_b"])
            self.layers[i].w_i = _ptr(row["w_i"])
            self.layers[i].b_i = _ptr(row["b_i"])
            self.layers[i].w_out = _ptr(row["w_out"])
            self.layers[i].b_out = _ptr(row["b_out"])
            self.layers[i].ln2_g = _ptr(row["ln2_g"])
            self.layers[i].ln2_b = _ptr(row["ln2_b"])
            self.layers[i].p_qkv = self.layers[i].p_o = NULL
            self.layers[i].p_i = self.layers[i].p_out = NULL
            if SMALL_GEMM and small_rows > 0:
                self.layers[i].p_qkv = _packed(row["w_qkv"], keep)
                self.layers[i].p_o = _packed(row["w_o"], keep)
                self.layers[i].p_i = _packed(row["w_i"], keep)
                self.layers[i].p_out = _packed(row["w_out"], keep)
        self.model.vocab = we.shape[0]
        self.model.d = d
        self.model.n_heads = n_heads
        self.model.head_dim = d // n_heads
        self.model.inter = inter
        self.model.n_layers = len(arrays)
        self.model.max_pos = pe.shape[0]
        self.model.eps = eps
        self.model.act = ACTIVATIONS[act]
        self.model.small_rows = small_rows if SMALL_GEMM else 0
        self.model.word_emb = &we[0, 0]
        self.model.pos_emb = &pe[0, 0]
        self.model.ln_g = &g[0]
        self.model.ln_b = &bb[0]
        self.model.layers = self.layers
        self.model.gemm = _sgemm_from_capsule(sgemm)
        self._keep = (keep, sgemm)
        self._free_work = []

    def __dealloc__(self):
        for i in range(_POOLS):
            if self.pools[i] != NULL:
                tep_pool_free(self.pools[i])
        free(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.model.d

    def encode(self, const int64_t[::1] ids_n, const int64_t[::1] offsets_b1,
               float32_t[:, ::1] out_nd, int n_threads=1) -> None:
        """Last hidden states of a ragged batch into ``out_nd`` (OUT, float32 [N, D]).

        ``ids_n`` int64 [N]; ``offsets_b1`` int64 [B+1]. Raises ValueError for bad offsets,
        a sequence longer than the position table or an ID outside the vocabulary.
        Releases the GIL; ``n_threads``: the caller plus n_threads - 1 pool workers (capped
        at MAX_THREADS); several threads only with a thread pool (POSIX).
        """
        cdef intp_t n = ids_n.shape[0], b = offsets_b1.shape[0] - 1
        cdef int nt = n_threads if n_threads > 1 else 1
        cdef int status
        cdef _Work work
        cdef intp_t i, max_len = 0, need
        if b < 0:
            raise ValueError("offsets_b1 needs B+1 >= 1 entries")
        if out_nd.shape[0] != n or out_nd.shape[1] != self.model.d:
            raise ValueError(f"out_nd has shape ({out_nd.shape[0]}, {out_nd.shape[1]}), "
                             f"expected ({n}, {self.model.d})")
        if nt >= _POOLS:
            nt = _POOLS - 1
        if nt > 1 and self.pools[nt] == NULL:  # under the GIL: made once
            self.pools[nt] = tep_pool_new(nt - 1)
            if self.pools[nt] == NULL:
                raise MemoryError("encoder thread pool")
        for i in range(b):
            if offsets_b1[i + 1] - offsets_b1[i] > max_len:
                max_len = offsets_b1[i + 1] - offsets_b1[i]
        if max_len > self.model.max_pos:
            raise ValueError(_ERRORS[ENC_ERR_TOO_LONG])
        try:
            work = self._free_work.pop()
        except IndexError:
            work = _Work()
        try:
            need = c_work_floats(&self.model, n, max_len, nt)
            work.reserve(need)
            with nogil:
                status = c_encode(&self.model, &ids_n[0] if n else NULL, n, &offsets_b1[0], b,
                                  &out_nd[0, 0] if n else NULL, work.buf, work.size,
                                  self.pools[nt], nt)
        finally:
            self._free_work.append(work)
        if status != ENC_OK:
            raise ValueError(_ERRORS.get(status, f"encoder status {status}"))


cdef const float32_t* _packed(object w, list keep):
    """W [K, N] packed in 32-column panels (kept alive in ``keep``)."""
    cdef const float32_t[:, ::1] wv = w
    cdef intp_t k = wv.shape[0], n = wv.shape[1]
    out = np.empty(((n + TEP_PANEL - 1) // TEP_PANEL, k, TEP_PANEL), np.float32)
    cdef float32_t[:, :, ::1] ov = out
    tep_pack_panels(&wv[0, 0], k, n, &ov[0, 0, 0])
    keep.append(out)
    return &ov[0, 0, 0]


cdef const float32_t* _ptr(object a):
    cdef const float32_t[::1] v = a.reshape(-1)
    return &v[0]
