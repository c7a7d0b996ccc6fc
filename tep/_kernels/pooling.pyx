"""Pooling kernels: reduce each sequence of float32 hidden states to one float32 vector.

Three layouts, one kernel each (declared in pooling.pxd):
  ragged   hidden_nd [N, D] + offsets_b1 [B+1]   sequence b = hidden_nd[offsets[b]:offsets[b+1]]
  lengths  hidden_btd [B, T, D] + lengths_b [B]  sequence b = hidden_btd[b, :lengths[b]]
  masked   hidden_btd [B, T, D] + mask_bt [B, T] sequence b = hidden_btd[b, t] where mask[b, t]

Modes (POOL_*): mean, max, cls (first valid token), last (last valid token), sum. An empty
sequence pools to the zero vector in every mode. With `normalize` the result is divided by
max(||x||_2, 1e-12). Only the first D' = out_bd.shape[1] components are read and pooled
(`dimensions` truncation); padded positions are never read.

Sums are accumulated in float64 and rounded to float32 once, at the end. Sequences are
processed in parallel (one OpenMP thread per sequence, dynamic schedule because lengths vary),
each thread owning a float64 accumulator of D' values.

Use :func:`tep.kernels.pool`, which validates its arguments; the `def` functions here only
re-check what would otherwise be out-of-bounds memory access.
"""
from cython.parallel cimport parallel, prange
from libc.math cimport sqrt
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from tep._kernels._openmp cimport TEP_OPENMP, omp_get_max_threads
from tep._kernels._typedefs cimport float32_t, float64_t, int64_t, intp_t, uint8_t

MODE_MEAN = POOL_MEAN
MODE_MAX = POOL_MAX
MODE_CLS = POOL_CLS
MODE_LAST = POOL_LAST
MODE_SUM = POOL_SUM
MODES = {"mean": POOL_MEAN, "max": POOL_MAX, "cls": POOL_CLS, "last": POOL_LAST,
         "sum": POOL_SUM}
HAVE_OPENMP = bool(TEP_OPENMP)

# Rows summed per pass over the accumulator: loads/stores of acc[] are amortised over this
# many rows, so the loop is bound by reading hidden states rather than by the accumulator.
cdef enum:
    _ROWS = 4


def max_threads() -> int:
    """Threads an OpenMP region may use (honours OMP_NUM_THREADS); 1 without OpenMP."""
    return omp_get_max_threads()


# ---------------------------------------------------------------------------------------------
# Row primitives over n contiguous components. Plain indexed loops over contiguous memory so
# gcc -O3 vectorises them (float32 -> float64 conversion + add, no fast-math needed).

cdef inline void _zero(float64_t* acc, intp_t n) noexcept nogil:
    cdef intp_t j
    for j in range(n):
        acc[j] = 0.0


cdef inline void _load(float64_t* acc, const float32_t* r, intp_t n) noexcept nogil:
    cdef intp_t j
    for j in range(n):
        acc[j] = <float64_t>r[j]


cdef inline void _add1(float64_t* acc, const float32_t* r, intp_t n) noexcept nogil:
    cdef intp_t j
    for j in range(n):
        acc[j] += <float64_t>r[j]


cdef inline void _add4(float64_t* acc, const float32_t* r0, const float32_t* r1,
                       const float32_t* r2, const float32_t* r3, intp_t n) noexcept nogil:
    cdef intp_t j
    for j in range(n):
        acc[j] += ((<float64_t>r0[j] + <float64_t>r1[j])
                   + (<float64_t>r2[j] + <float64_t>r3[j]))


cdef inline void _max1(float64_t* acc, const float32_t* r, intp_t n) noexcept nogil:
    # NaN propagates like np.max: a NaN row value replaces acc, and a NaN acc is never
    # replaced (x > NaN is false). The select (not a branch) lets gcc vectorise the loop.
    cdef intp_t j
    cdef float64_t x, a
    for j in range(n):
        x = <float64_t>r[j]
        a = acc[j]
        acc[j] = x if (x > a) | (x != x) else a


cdef inline void _finish(float64_t* acc, intp_t count, int mode, bint normalize,
                         float32_t* out, intp_t n) noexcept nogil:
    """acc[n] (sum, max or the chosen row) -> out[n] float32: mean scaling, optional L2."""
    cdef intp_t j
    cdef float64_t ss = 0.0, norm, inv
    if count == 0:  # empty sequence: zero vector in every mode (also after normalize)
        for j in range(n):
            out[j] = 0.0
        return
    if mode == POOL_MEAN:
        inv = 1.0 / <float64_t>count
        for j in range(n):
            acc[j] = acc[j] * inv
    if normalize:
        for j in range(n):
            ss = ss + acc[j] * acc[j]
        norm = sqrt(ss)
        if norm < 1e-12:  # NaN fails this test, so a NaN norm propagates to every component
            norm = 1e-12
        for j in range(n):
            out[j] = <float32_t>(acc[j] / norm)
    else:
        for j in range(n):
            out[j] = <float32_t>acc[j]


# ---------------------------------------------------------------------------------------------
# One sequence. Return the number of rows pooled (0 = empty); acc[:n] holds the raw result.

cdef intp_t _reduce_rows(const float32_t* first, intp_t length, intp_t stride, int mode,
                         float64_t* acc, intp_t n) noexcept nogil:
    """Rows first + i*stride, i < length (contiguous block of a ragged or padded layout)."""
    cdef intp_t i = 0
    cdef const float32_t* r
    if length <= 0:
        return 0
    if mode == POOL_CLS:
        _load(acc, first, n)
        return 1
    if mode == POOL_LAST:
        _load(acc, first + (length - 1) * stride, n)
        return 1
    if mode == POOL_MAX:
        _load(acc, first, n)
        for i in range(1, length):
            _max1(acc, first + i * stride, n)
        return length
    # sum / mean
    _zero(acc, n)
    while i + _ROWS <= length:
        r = first + i * stride
        _add4(acc, r, r + stride, r + 2 * stride, r + 3 * stride, n)
        i += _ROWS
    while i < length:
        _add1(acc, first + i * stride, n)
        i += 1
    return length


cdef intp_t _reduce_masked(const float32_t* first, const uint8_t* m, intp_t T, intp_t stride,
                           int mode, float64_t* acc, intp_t n) noexcept nogil:
    """Rows first + t*stride for t < T with m[t] != 0; rows with m[t] == 0 are not touched."""
    cdef intp_t t, k = 0, count = 0
    cdef const float32_t* rows[_ROWS]
    if mode == POOL_CLS:
        for t in range(T):
            if m[t]:
                _load(acc, first + t * stride, n)
                return 1
        return 0
    if mode == POOL_LAST:
        t = T - 1
        while t >= 0:
            if m[t]:
                _load(acc, first + t * stride, n)
                return 1
            t -= 1
        return 0
    if mode == POOL_MAX:
        for t in range(T):
            if m[t]:
                if count == 0:
                    _load(acc, first + t * stride, n)
                else:
                    _max1(acc, first + t * stride, n)
                count += 1
        return count
    # sum / mean: gather valid rows in groups of _ROWS so each pass over acc reads several rows
    _zero(acc, n)
    for t in range(T):
        if m[t]:
            rows[k] = first + t * stride
            k += 1
            if k == _ROWS:
                _add4(acc, rows[0], rows[1], rows[2], rows[3], n)
                k = 0
            count += 1
    for t in range(k):
        _add1(acc, rows[t], n)
    return count


cdef inline int _workers(int n_threads, intp_t B) noexcept nogil:
    # More threads than sequences would only idle; without OpenMP the region runs serially.
    if n_threads < 1:
        n_threads = 1
    if n_threads > B:
        n_threads = <int>B
    return n_threads


cdef inline intp_t _acc_len(intp_t n) noexcept nogil:
    return n if n > 0 else 1  # malloc(0) may return NULL; keep NULL meaning "out of memory"


# ---------------------------------------------------------------------------------------------
# Kernels (see pooling.pxd): each validates its layout, then runs the shared driver.

cdef struct Layout:
    # Where sequence b lives; exactly one of offsets / lengths / mask is set.
    const float32_t* h         # hidden row 0 (NULL when there are no rows or D == 0)
    intp_t D                   # row stride (floats)
    intp_t T                   # padded length (padded layouts)
    const int64_t* offsets     # ragged: [B + 1]
    const int64_t* lengths     # padded by lengths: [B]
    const uint8_t* mask        # padded by mask: [B, T]


cdef inline intp_t _reduce_seq(const Layout* L, intp_t b, int mode, float64_t* acc,
                               intp_t n) noexcept nogil:
    """Reduce sequence b into acc; returns its token count (0 = empty, acc untouched)."""
    cdef intp_t start, length
    if L.h == NULL:
        return 0
    if L.mask != NULL:
        return _reduce_masked(L.h + b * L.T * L.D, L.mask + b * L.T, L.T, L.D, mode, acc, n)
    if L.offsets != NULL:
        start = L.offsets[b]
        length = L.offsets[b + 1] - start
    else:
        start = b * L.T
        length = L.lengths[b]
    if length <= 0:
        return 0
    return _reduce_rows(L.h + start * L.D, length, L.D, mode, acc, n)


cdef int _pool_all(const Layout* L, intp_t B, int mode, bint normalize, float32_t* out,
                   intp_t n, int n_threads) noexcept nogil:
    """Pool B sequences into out [B, n], sequences split over threads (one float64
    accumulator per thread)."""
    cdef intp_t b, cnt
    cdef int status[1]
    cdef float64_t* acc
    if B == 0 or n == 0:  # nothing to write (D' == 0 only arises when D == 0)
        return POOL_OK
    status[0] = POOL_OK
    acc = NULL
    with nogil, parallel(num_threads=_workers(n_threads, B)):
        acc = <float64_t*>malloc(_acc_len(n) * sizeof(float64_t))  # thread-local
        if acc == NULL:
            status[0] = POOL_ERR_NOMEM
        for b in prange(B, schedule='dynamic'):
            if acc != NULL:
                cnt = _reduce_seq(L, b, mode, acc, n)
                _finish(acc, cnt, mode, normalize, out + b * n, n)
        free(acc)
    return status[0]


cdef int c_pool_ragged(const float32_t[:, ::1] hidden_nd, const int64_t[::1] offsets_b1,
                       int mode, bint normalize, float32_t[:, ::1] out_bd,
                       int n_threads) noexcept nogil:
    cdef intp_t N = hidden_nd.shape[0], D = hidden_nd.shape[1]
    cdef intp_t B = offsets_b1.shape[0] - 1, n = out_bd.shape[1], b
    cdef Layout L
    if mode < POOL_MEAN or mode > POOL_SUM:
        return POOL_ERR_MODE
    if B < 0 or out_bd.shape[0] != B or n > D:
        return POOL_ERR_SHAPE
    for b in range(B + 1):
        if offsets_b1[b] < 0 or offsets_b1[b] > N or (b > 0 and offsets_b1[b] < offsets_b1[b - 1]):
            return POOL_ERR_OFFSETS
    if B == 0 or n == 0:
        return POOL_OK
    memset(&L, 0, sizeof(Layout))
    L.h = &hidden_nd[0, 0] if N > 0 and D > 0 else NULL
    L.D = D
    L.offsets = &offsets_b1[0]
    return _pool_all(&L, B, mode, normalize, &out_bd[0, 0], n, n_threads)


cdef int c_pool_lengths(const float32_t[:, :, ::1] hidden_btd, const int64_t[::1] lengths_b,
                        int mode, bint normalize, float32_t[:, ::1] out_bd,
                        int n_threads) noexcept nogil:
    cdef intp_t B = hidden_btd.shape[0], T = hidden_btd.shape[1], D = hidden_btd.shape[2]
    cdef intp_t n = out_bd.shape[1], b
    cdef Layout L
    if mode < POOL_MEAN or mode > POOL_SUM:
        return POOL_ERR_MODE
    if lengths_b.shape[0] != B or out_bd.shape[0] != B or n > D:
        return POOL_ERR_SHAPE
    for b in range(B):
        if lengths_b[b] < 0 or lengths_b[b] > T:
            return POOL_ERR_LENGTHS
    if B == 0 or n == 0:
        return POOL_OK
    memset(&L, 0, sizeof(Layout))
    L.h = &hidden_btd[0, 0, 0] if T > 0 and D > 0 else NULL
    L.D = D
    L.T = T
    L.lengths = &lengths_b[0]
    return _pool_all(&L, B, mode, normalize, &out_bd[0, 0], n, n_threads)


cdef int c_pool_masked(const float32_t[:, :, ::1] hidden_btd, const uint8_t[:, ::1] mask_bt,
                       int mode, bint normalize, float32_t[:, ::1] out_bd,
                       int n_threads) noexcept nogil:
    cdef intp_t B = hidden_btd.shape[0], T = hidden_btd.shape[1], D = hidden_btd.shape[2]
    cdef intp_t n = out_bd.shape[1]
    cdef Layout L
    if mode < POOL_MEAN or mode > POOL_SUM:
        return POOL_ERR_MODE
    if mask_bt.shape[0] != B or mask_bt.shape[1] != T or out_bd.shape[0] != B or n > D:
        return POOL_ERR_SHAPE
    if B == 0 or n == 0:
        return POOL_OK
    memset(&L, 0, sizeof(Layout))
    L.h = &hidden_btd[0, 0, 0] if T > 0 and D > 0 else NULL
    L.D = D
    L.T = T
    L.mask = &mask_bt[0, 0] if T > 0 else NULL   # T == 0: h is NULL, nothing is read
    return _pool_all(&L, B, mode, normalize, &out_bd[0, 0], n, n_threads)


# ---------------------------------------------------------------------------------------------
# Python entry points: run the kernel without the GIL, turn a status into an exception.

cdef object _raise_status(int status):
    if status == POOL_ERR_MODE:
        raise ValueError("mode: unknown pooling mode code")
    if status == POOL_ERR_SHAPE:
        raise ValueError("out: shape does not match hidden and the sequence description")
    if status == POOL_ERR_OFFSETS:
        raise ValueError("offsets: must be non-decreasing with 0 <= offsets[i] <= N")
    if status == POOL_ERR_LENGTHS:
        raise ValueError("lengths: every length must be in [0, T]")
    if status == POOL_ERR_NOMEM:
        raise MemoryError("pooling: could not allocate a thread-local accumulator")
    raise RuntimeError(f"pooling: kernel status {status}")


def pool_ragged(const float32_t[:, ::1] hidden_nd, const int64_t[::1] offsets_b1, int mode,
                bint normalize, float32_t[:, ::1] out_bd, int n_threads=1):
    """Pool ragged sequences: hidden_nd float32 [N, D], offsets_b1 int64 [B+1] -> out_bd [B, D'].

    out_bd (OUT, float32 [B, D'], D' <= D) receives the first D' components of each pooled
    vector. `mode` is one of MODES' values. Releases the GIL.
    """
    cdef int status
    with nogil:
        status = c_pool_ragged(hidden_nd, offsets_b1, mode, normalize, out_bd, n_threads)
    if status != POOL_OK:
        _raise_status(status)


def pool_lengths(const float32_t[:, :, ::1] hidden_btd, const int64_t[::1] lengths_b, int mode,
                 bint normalize, float32_t[:, ::1] out_bd, int n_threads=1):
    """Pool padded sequences by length: hidden_btd float32 [B, T, D], lengths_b int64 [B].

    Sequence b is hidden_btd[b, :lengths_b[b]]; out_bd (OUT) float32 [B, D'], D' <= D.
    Releases the GIL.
    """
    cdef int status
    with nogil:
        status = c_pool_lengths(hidden_btd, lengths_b, mode, normalize, out_bd, n_threads)
    if status != POOL_OK:
        _raise_status(status)


def pool_masked(const float32_t[:, :, ::1] hidden_btd, const uint8_t[:, ::1] mask_bt, int mode,
                bint normalize, float32_t[:, ::1] out_bd, int n_threads=1):
    """Pool padded sequences by mask: hidden_btd float32 [B, T, D], mask_bt uint8 [B, T].

    Sequence b is the positions t with mask_bt[b, t] != 0, in order; out_bd (OUT) float32
    [B, D'], D' <= D. Releases the GIL.
    """
    cdef int status
    with nogil:
        status = c_pool_masked(hidden_btd, mask_bt, mode, normalize, out_bd, n_threads)
    if status != POOL_OK:
        _raise_status(status)
