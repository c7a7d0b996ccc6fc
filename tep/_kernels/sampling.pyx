# cython: cdivision=True
"""Token sampling from a logits matrix (compiled; use tep.kernels.sample).

Algorithm per row, never sorting the vocabulary:
  1. one vectorised pass gives the row max and the max of every 64-token block;
  2. greedy = first block whose max equals the row max, then the first token in it;
  3. min_p is a logit threshold (max + T*log(min_p)); top_k's k-th value is bounded below by
     the k-th largest block max, so only the blocks that can hold a top-k token are scanned
     and the exact k-th value comes from a quickselect over those few candidates;
  4. top_p is a mass-weighted select over the candidates; over a whole row, a stratified
     sample brackets the threshold, one vectorised pass sums the mass above the bracket
     and collects the few tokens inside it, and the select runs on those (a bracket the
     sample misplaced is moved, recalibrated, and rescanned from the kept exps);
  exps are 2^((x - max) * log2(e) / T) with a degree-5 polynomial (_simd.h), the same
  rounding in the scalar and AVX2 paths;
  5. a candidate set or a top-p row is drawn by inverse CDF (block sums, then one block
     token by token); the full vocabulary by rejection from the block-max envelope, which
     exponentiates only the block maxima (an exact exp-sum draw backs it up).
Randomness: Philox4x32-10 keyed on the seed, counter (step, stream): the draw depends on
(seed, step) and the row only. Scratch memory is per thread and kept between calls.
"""
from cython.parallel cimport parallel, prange
from libc.float cimport FLT_MAX, FLT_MIN
from libc.math cimport INFINITY, log, logf, nextafterf
from libc.stdlib cimport free, malloc, qsort
from libc.string cimport memcpy, memset

from tep._kernels._openmp cimport omp_get_max_threads
from tep._kernels._typedefs cimport (float32_t, float64_t, int32_t, int64_t, intp_t,
                                     uint8_t, uint32_t, uint64_t)

cdef extern from "_simd.h" nogil:
    int TEP_BLOCK
    float tep_exp_ms(float x, float m, float s)
    float tep_block_max(const float* v, Py_ssize_t n, float* bmax)
    double tep_exp_blocks(const float* v, Py_ssize_t n, float m, float s, float lo,
                          double* bsum, float* out)
    Py_ssize_t tep_bracket(const float* v, Py_ssize_t n, float m, float s, float lo, float hi,
                           double* bsum_hi, double* z_all, double* mass_in, Cand* out,
                           Py_ssize_t cap, float* ecache, int fresh)
    float tep_copy_mask_max(const float* v, const uint32_t* mask, Py_ssize_t n, float* out,
                            float* bmax)
    void tep_mask_inplace(float* v, const uint32_t* mask, Py_ssize_t n)
    int tep_mask_all_ones(const uint32_t* mask, Py_ssize_t n)
    int tep_bit(const uint32_t* mask, Py_ssize_t j)
    int tep_simd_init(int allow_avx2)
    int tep_simd_level

cdef extern from "_scratch.h" nogil:
    void* tep_scratch_get(size_t n, int* owned)

cdef float GREEDY_T = 1e-5

cdef enum:
    HIST_BINS = 1024
    MAX_TRIALS = 256       # envelope rejections before the exact exp-sum draw
    # strided tokens in top_p's threshold estimate. It only places the bracket (the pass
    # over the row makes the threshold exact); on real SmolLM2 rows (V = 49152, T = 0.8,
    # top_p = 0.95) 2048 took ~80 us per row where 8192 took ~110 (its scalar histogram)
    TOP_P_SAMPLE = 2048

# the stride of top_p's sample is max(1, V // TOP_P_SAMPLE_SIZE) (tests build rows
# that fool it)
TOP_P_SAMPLE_SIZE = TOP_P_SAMPLE



def simd_init(bint allow_avx2=True):
    """Select the AVX2 path when the CPU has it (default) or force the portable one.

    Returns the level in use: 1 = AVX2+FMA, 0 = portable C.
    """
    return tep_simd_init(allow_avx2)


def simd_level():
    """1 when the AVX2+FMA row primitives are in use, 0 for the portable path."""
    return tep_simd_level


# ---- random numbers -------------------------------------------------------------------------

cdef void philox4(uint64_t seed, uint64_t step, uint32_t stream, uint32_t* out) noexcept nogil:
    """Philox4x32-10 (Salmon et al. 2011): key = seed, counter = (step, stream, 0) -> out[4]."""
    cdef uint32_t c0 = <uint32_t>step, c1 = <uint32_t>(step >> 32), c2 = stream, c3 = 0
    cdef uint32_t k0 = <uint32_t>seed, k1 = <uint32_t>(seed >> 32)
    cdef uint64_t p0, p1
    cdef int r
    for r in range(10):
        p0 = <uint64_t>0xD2511F53 * c0
        p1 = <uint64_t>0xCD9E8D57 * c2
        c0, c1, c2, c3 = (<uint32_t>(p1 >> 32)) ^ c1 ^ k0, <uint32_t>p1, \
                         (<uint32_t>(p0 >> 32)) ^ c3 ^ k1, <uint32_t>p0
        k0 = k0 + <uint32_t>0x9E3779B9
        k1 = k1 + <uint32_t>0xBB67AE85
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3


cdef double philox_uniform(uint64_t seed, uint64_t step) noexcept nogil:
    """The row's uniform in [0, 1): stream 0 of (seed, step), 53 bits."""
    cdef uint32_t w[4]
    philox4(seed, step, 0, w)
    return <double>((((<uint64_t>w[0]) << 32) | w[1]) >> 11) * (1.0 / 9007199254740992.0)


def philox(uint64_t seed, uint64_t step):
    """The uniform in [0, 1) that the kernel draws for (seed, step); exposed for tests."""
    return philox_uniform(seed, step)


# ---- small helpers ----------------------------------------------------------------------------

cdef int cmp_int32(const void* a, const void* b) noexcept nogil:
    cdef int32_t x = (<const int32_t*>a)[0], y = (<const int32_t*>b)[0]
    return (x > y) - (x < y)


cdef int cmp_cand_desc(const void* a, const void* b) noexcept nogil:
    # Larger value first; ties by lower token id, so the order is total and deterministic.
    cdef const Cand* x = <const Cand*>a
    cdef const Cand* y = <const Cand*>b
    if x.v > y.v:
        return -1
    if x.v < y.v:
        return 1
    return (x.idx > y.idx) - (x.idx < y.idx)


cdef float kth_largest(float* a, intp_t n, intp_t k) noexcept nogil:
    """k-th largest (1-based) of a[0:n] by quickselect; reorders a. No NaN in a."""
    cdef intp_t lo = 0, hi = n - 1, target = k - 1, i, j, mid
    cdef float pivot, t
    while lo < hi:
        mid = lo + (hi - lo) // 2
        # median of three as pivot keeps sorted and reversed inputs linear
        if a[mid] > a[lo]:
            t = a[mid]; a[mid] = a[lo]; a[lo] = t
        if a[hi] > a[lo]:
            t = a[hi]; a[hi] = a[lo]; a[lo] = t
        if a[mid] > a[hi]:
            t = a[mid]; a[mid] = a[hi]; a[hi] = t
        pivot = a[hi]
        i = lo
        j = hi
        while i <= j:
            while a[i] > pivot:
                i += 1
            while a[j] < pivot:
                j -= 1
            if i <= j:
                t = a[i]; a[i] = a[j]; a[j] = t
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            return a[target]
    return a[target]


cdef intp_t collect(const float* v, intp_t V, const float* bmax, float lb, bint exact_all,
                    Cand* out, const uint32_t* mask=NULL) noexcept nogil:
    """Finite tokens with v >= lb (index order), scanning only blocks whose max reaches lb.

    exact_all keeps every token, NaN/-inf included (used when fewer finite tokens exist
    than the caller needs). mask (may be NULL): a bitmask not applied to v yet; tokens it
    disallows count as -inf."""
    cdef intp_t nb = (V + TEP_BLOCK - 1) // TEP_BLOCK, b, j, e, n = 0
    cdef float x
    for b in range(nb):
        if not exact_all and not (bmax[b] >= lb):
            continue
        e = min((b + 1) * TEP_BLOCK, V)
        for j in range(b * TEP_BLOCK, e):
            x = v[j]
            if mask != NULL and not tep_bit(mask, j):
                x = -INFINITY
            if exact_all or (x >= lb and x > -INFINITY):
                out[n].v = x if x == x else -INFINITY
                out[n].idx = j
                n += 1
    return n


cdef inline int64_t argmax_blocks(const float* v, intp_t V, const float* bmax, float m,
                                  const uint32_t* mask=NULL) noexcept nogil:
    """First index holding the row max m: the first block whose max is m, then scan it.
    mask (may be NULL): a bitmask not applied to v yet (bmax is of the masked row)."""
    cdef intp_t nb = (V + TEP_BLOCK - 1) // TEP_BLOCK, b, j
    for b in range(nb):
        if bmax[b] == m:
            for j in range(b * TEP_BLOCK, min((b + 1) * TEP_BLOCK, V)):
                if v[j] == m and (mask == NULL or tep_bit(mask, j)):
                    return j
    for j in range(V):               # bmax out of step with v (cannot happen): scan the row
        if v[j] == m and (mask == NULL or tep_bit(mask, j)):
            return j
    return 0


cdef float weighted_select(Cand* a, intp_t n, double need) noexcept nogil:
    """The value t with mass{v > t} < need <= mass{v >= t} over a[0:n] (masses in .e).

    Quickselect by mass with a three-way partition, expected O(n); reorders a. When
    rounding leaves need above the total mass, returns the smallest value (keep all)."""
    cdef intp_t lo = 0, hi = n, i, lt, gt
    cdef float pivot, x0, x1, x2, vmin = INFINITY
    cdef double m_gt, m_eq
    cdef Cand tmp
    for i in range(n):
        if a[i].v < vmin:
            vmin = a[i].v
    while hi > lo:
        x0 = a[lo].v; x1 = a[lo + (hi - lo) // 2].v; x2 = a[hi - 1].v
        pivot = max(min(x0, x1), min(max(x0, x1), x2))      # median of three
        lt = lo; i = lo; gt = hi - 1
        m_gt = 0.0; m_eq = 0.0
        while i <= gt:
            if a[i].v > pivot:
                tmp = a[lt]; a[lt] = a[i]; a[i] = tmp
                m_gt += a[lt].e
                lt += 1
                i += 1
            elif a[i].v < pivot:
                tmp = a[gt]; a[gt] = a[i]; a[i] = tmp
                gt -= 1
            else:
                m_eq += a[i].e
                i += 1
        if need <= m_gt:
            hi = lt
        elif need <= m_gt + m_eq:
            return pivot
        else:
            need -= m_gt + m_eq
            lo = gt + 1
    return vmin


cdef float mass_select(const Cand* a, intp_t n, double need, Cand* tmp,
                       float64_t* hist, float vlo=INFINITY, float vhi=-INFINITY) noexcept nogil:
    """weighted_select without reordering a: a 1024-bin mass histogram over the value
    range finds the bin where the mass from the top reaches need, and only that bin's
    tokens (copied to tmp) go through the quickselect. hist: scratch [HIST_BINS].
    vlo <= every value <= vhi may be given (finite) to skip the range pass."""
    cdef intp_t i, b, nbin = 0
    cdef double scale, above = 0.0
    if n == 0:
        return -INFINITY
    if not (vlo <= vhi and vlo > -INFINITY and vhi < INFINITY):
        vlo = INFINITY
        vhi = -INFINITY
        for i in range(n):
            if a[i].v < vlo:
                vlo = a[i].v
            if a[i].v > vhi:
                vhi = a[i].v
    if not (vhi > vlo):
        return vlo
    if not (need > 0.0):
        return vhi                   # nothing needed (top_p 0): keep the top value only
    scale = (HIST_BINS - 1) / (<double>vhi - <double>vlo)
    memset(hist, 0, HIST_BINS * sizeof(float64_t))
    for i in range(n):
        hist[min(<intp_t>((a[i].v - <double>vlo) * scale), HIST_BINS - 1)] += a[i].e
    b = HIST_BINS - 1
    while b > 0 and above + hist[b] < need:
        above += hist[b]
        b -= 1
    for i in range(n):
        if min(<intp_t>((a[i].v - <double>vlo) * scale), HIST_BINS - 1) == b:
            tmp[nbin] = a[i]
            nbin += 1
    return weighted_select(tmp, nbin, need - above)


# top-p bracket half-width, in shares of the mass: 2-3 standard errors of the sample's
# estimate on a 128k-token row
cdef double MARGIN = 0.004


cdef struct SampleHist:
    float64_t* cum       # cum[b] = sample mass in bins >= b (bins linear in v)
    float vlo
    float64_t width      # value width of one bin


cdef void sample_hist_build(SampleHist* h, const Cand* head, intp_t nh, const float* tv,
                            const float* te, intp_t nt, double w, float L, float vlo, float vhi,
                            float64_t* spare) noexcept nogil:
    """Mass histogram of the top-p sample: head[0:nh] (weight 1) and the strided tail
    tv/te[0:nt] (weight w; values >= L are in the head already). Bins are linear over
    [vlo, vhi]; lower values land in bin 0. Odd tail items go to a spare histogram so that
    two updates of one bin are rarely back to back (a store-to-load stall each)."""
    cdef intp_t i, b, top = HIST_BINS - 1
    cdef float x, f, inv
    h.vlo = vlo
    h.width = (<double>vhi - vlo) / top if vhi > vlo else 1.0
    inv = <float>(1.0 / h.width)
    memset(h.cum, 0, HIST_BINS * sizeof(float64_t))
    memset(spare, 0, HIST_BINS * sizeof(float64_t))
    for i in range(nh):
        f = (head[i].v - vlo) * inv
        b = <intp_t>f if f >= 0 else 0
        h.cum[min(b, top)] += head[i].e
    for i in range(nt):
        x = tv[i]
        if x >= L:
            continue
        f = (x - vlo) * inv
        b = <intp_t>f if f >= 0 else 0          # also NaN (whose weight is 0)
        if i & 1:
            spare[min(b, top)] += te[i] * w
        else:
            h.cum[min(b, top)] += te[i] * w
    h.cum[top] += spare[top]
    for b in range(top - 1, -1, -1):
        h.cum[b] += h.cum[b + 1] + spare[b]


cdef float sample_hist_value(const SampleHist* h, double target, bint upper,
                             double* frac) noexcept nogil:
    """Edge of the bin where the sample mass from the top reaches target: its upper edge
    (upper=True, a value at or above the crossing) or its lower edge. *frac = the sample's
    share of mass at or above the returned value."""
    cdef intp_t b = HIST_BINS - 1
    while b > 0 and h.cum[b] < target:
        b -= 1
    if upper:
        frac[0] = h.cum[b + 1] / h.cum[0] if b + 1 < HIST_BINS else 0.0
        return <float>(h.vlo + (b + 1) * h.width)
    frac[0] = h.cum[b] / h.cum[0]
    return <float>(h.vlo + b * h.width)


cdef intp_t block_draw(const float* v, intp_t V, const double* bsum, float thr, float m,
                       float s, double target) noexcept nogil:
    """Inverse CDF over block sums: bsum[b] = sum of exp((v - m) * s) over block b's tokens
    with v >= thr. Finds the block where the running mass passes target and scans it token
    by token; when rounding between the block sum and the scalar exps leaves the scan short,
    takes the block's last kept token. -1 when target lies past every block (rounding)."""
    cdef intp_t nb = (V + TEP_BLOCK - 1) // TEP_BLOCK, b, j, lo_j, hi_j
    cdef double acc = 0.0
    cdef float e
    for b in range(nb):
        if acc + bsum[b] > target:
            lo_j = b * TEP_BLOCK
            hi_j = min(lo_j + TEP_BLOCK, V)
            for j in range(lo_j, hi_j):
                if v[j] >= thr:
                    e = tep_exp_ms(v[j], m, s)
                    acc += e
                    if acc > target and e > 0:
                        return j
            for j in range(hi_j - 1, lo_j - 1, -1):
                if v[j] >= thr and tep_exp_ms(v[j], m, s) > 0:
                    return j
            return -1
        acc += bsum[b]
    return -1


cdef int64_t top_p_row(const float* v, intp_t V, float m, float s, double p, double u,
                       Scratch* sc) noexcept nogil:
    """Sample a whole row under top_p alone, touching most tokens only in vector passes.

    A stratified sample (the head exactly, ~TOP_P_SAMPLE strided tokens for the rest) estimates the
    logit values where the cumulative mass reaches p -/+ a margin. One vectorised pass sums
    the exact mass per block above that bracket and collects the tokens inside it; a
    weighted quickselect over those settles the exact threshold t. When the sample
    misjudged the row the bracket moves up or down, recalibrated by the exact mass the
    pass measured, reusing the pass's exps, and ending at the row's edge, so t is always
    exact. The draw walks the block masses above the bracket and scans one block,
    or walks the kept bracket tokens."""
    cdef intp_t stride = max(1, V // TOP_P_SAMPLE), ns = V // stride, i, nin = 0, it, b, ci, j
    cdef intp_t nsmp = 0, nb = (V + TEP_BLOCK - 1) // TEP_BLOCK
    cdef double Zs = 0.0, Z = 0.0, mass_hi = 0.0, mass_in, need, acc, target
    cdef double margin_lo = min(MARGIN, (1.0 - p) * 0.5), widen = 1.0, q, f_hi = 0.0, f_lo = 1.0
    cdef float t_hi, t_lo, t, e, x, L = -INFINITY, vmin = m
    cdef Cand* smp = sc.cand + V          # second half of the candidate buffer
    # Head: every token >= the 32nd largest block max, exactly (peaked rows keep their mass
    # there); tail: a strided sample weighted by the stride.
    if nb > 32:
        memcpy(sc.sel, sc.bmax, nb * sizeof(float))
        L = kth_largest(sc.sel, nb, 32)
    nsmp = collect(v, V, sc.bmax, L, False, smp) if L > -INFINITY else 0
    for i in range(nsmp):
        smp[i].e = tep_exp_ms(smp[i].v, m, s)
    for i in range(ns):
        x = v[i * stride]
        sc.sel[i] = x
        if x < vmin and x > -INFINITY:
            vmin = x
    tep_exp_blocks(sc.sel, ns, m, s, -INFINITY, NULL, sc.ebuf)
    # bins over [m - 30 T, m] at most: tokens further down weigh < e^-30 each
    cdef SampleHist sh
    sh.cum = sc.hist
    sample_hist_build(&sh, smp, nsmp, sc.sel, sc.ebuf, ns, stride, L,
                      max(vmin, m - 30.0 / s), m, sc.hist2)
    nsmp += ns
    Zs = sh.cum[0]
    t_hi = sample_hist_value(&sh, (p - MARGIN) * Zs, True, &f_hi) if p > MARGIN else INFINITY
    t_lo = sample_hist_value(&sh, (p + margin_lo) * Zs, False, &f_lo)
    for it in range(64):
        if not (t_lo < t_hi):
            t_lo = t_hi
        # -FLT_MAX, not -inf, as the floor: masked (-inf) tokens never enter a bracket. The
        # first pass computes (and keeps) every exp; a retry only compares.
        nin = tep_bracket(v, V, m, s, t_lo if t_lo > -INFINITY else -FLT_MAX, t_hi, sc.bsum,
                          &Z, &mass_in, sc.cand, V, sc.ebuf, it == 0)
        need = p * Z
        mass_hi = 0.0
        for b in range(nb):
            mass_hi += sc.bsum[b]
        # When the sample misjudged the row, the pass has measured the exact mass at the
        # bracket's edge: shift the sample's quantiles by its error there and retry with
        # twice the margin (ending at t_hi = +inf or t_lo = -inf, so this terminates).
        if mass_hi >= need and t_hi < INFINITY:             # threshold above the bracket
            widen *= 2.0
            q = p - MARGIN * widen - (mass_hi / Z - f_hi)
            t_lo = t_hi
            t_hi = sample_hist_value(&sh, q * Zs, True, &f_hi) \
                if q > 0.0 and widen < 1024 else INFINITY
        elif mass_hi + mass_in < need and t_lo > -INFINITY:  # below it
            widen *= 2.0
            q = p + margin_lo * widen - ((mass_hi + mass_in) / Z - f_lo)
            t_hi = t_lo
            t_lo = sample_hist_value(&sh, q * Zs, False, &f_lo) \
                if q < 1.0 and widen < 1024 else -INFINITY
        else:
            break
    # exact threshold; mass_select keeps the bracket list in index order for the draw
    t = mass_select(sc.cand, nin, need - mass_hi, smp, sc.hist2,
                    t_lo, nextafterf(t_hi, -INFINITY)) if nin > 0 else -INFINITY
    # The draw orders the kept tokens as: those >= t_hi (block sums, then one block's scan),
    # then the kept bracket tokens; index order within each group.
    acc = 0.0
    for i in range(nin):
        if sc.cand[i].v >= t:
            acc += sc.cand[i].e
    target = u * (mass_hi + acc)
    if target < mass_hi:
        j = block_draw(v, V, sc.bsum, t_hi, m, s, target)
        if j >= 0:
            return j
        target = mass_hi          # rounding ran past the block sums: the bracket's first
    target -= mass_hi
    acc = 0.0
    ci = -1
    for i in range(nin):
        if sc.cand[i].v >= t:
            e = sc.cand[i].e
            acc += e
            if e > 0:
                ci = i
                if acc > target:
                    return sc.cand[i].idx
    if ci >= 0:
        return sc.cand[ci].idx    # rounding: the last kept bracket token
    return argmax_blocks(v, V, sc.bmax, m)


cdef bint envelope_draw(const float* v, intp_t V, float m, float s, uint64_t seed,
                        uint64_t step, Scratch* sc, int64_t* token_out,
                        const uint32_t* mask=NULL) noexcept nogil:
    """Exact full-vocabulary draw by rejection from the block-max envelope.

    Proposal: a block with probability proportional to n_b * exp((bmax_b - m) / T), then a
    token uniformly inside it; accept token j with probability exp((v_j - bmax_b) / T).
    proposal * acceptance is proportional to exp((v_j - m) / T), so accepted draws follow
    the softmax exactly, and the vocabulary is never exponentiated in full. Trial t uses
    Philox stream t + 1 of (seed, step), so the draw stays a function of (seed, step) and the
    row. Returns False after MAX_TRIALS rejections (the caller then runs the exact
    exp-sum draw, deterministically as well). mask (may be NULL): a bitmask not applied to
    v yet; a disallowed proposal is rejected, exactly as its -inf would be."""
    cdef intp_t nb = (V + TEP_BLOCK - 1) // TEP_BLOCK, b, lo, hi, mid, j, n_b
    cdef double W = 0.0, target
    cdef uint32_t w[4]
    cdef uint32_t t
    cdef float x
    # block weights n_b * exp((bmax_b - m) * s), prefix-summed into bsum
    tep_exp_blocks(sc.bmax, nb, m, s, -INFINITY, NULL, sc.ebuf)
    for b in range(nb):
        n_b = min(TEP_BLOCK, V - b * TEP_BLOCK)
        W += <double>sc.ebuf[b] * n_b
        sc.bsum[b] = W
    if not (W > 0):
        return False
    for t in range(MAX_TRIALS):
        philox4(seed, step, t + 1, w)
        target = (<double>((((<uint64_t>w[0]) << 32) | w[1]) >> 11)
                  * (1.0 / 9007199254740992.0)) * W
        lo = 0
        hi = nb - 1
        while lo < hi:                      # first block whose prefix sum exceeds target
            mid = (lo + hi) // 2
            if sc.bsum[mid] > target:
                hi = mid
            else:
                lo = mid + 1
        b = lo
        n_b = min(TEP_BLOCK, V - b * TEP_BLOCK)
        j = b * TEP_BLOCK + <intp_t>((<uint64_t>w[2] * <uint64_t>n_b) >> 32)
        x = v[j] if mask == NULL or tep_bit(mask, j) else -INFINITY
        # acceptance exp((x - bmax) * s) against a 32-bit uniform in (0, 1]
        if x > -INFINITY and ((<double>w[3] + 1.0) * (1.0 / 4294967296.0)
                              <= tep_exp_ms(x, sc.bmax[b], s)):
            token_out[0] = j
            return True
    return False


# ---- logit edits ------------------------------------------------------------------------------

cdef inline bint row_has_sparse_edits(const Knobs* kn, const RowEdits* ed) noexcept nogil:
    return (ed.n_bias > 0
            or (kn.repetition_penalty != 1.0 and ed.n_prompt + ed.n_output > 0)
            or ((kn.frequency_penalty != 0.0 or kn.presence_penalty != 0.0) and ed.n_output > 0))


cdef inline bint row_has_edits(const Knobs* kn, const RowEdits* ed) noexcept nogil:
    return ed.has_allowed or ed.mask != NULL or row_has_sparse_edits(kn, ed)


cdef inline bint finite(float w) noexcept nogil:
    return w >= -FLT_MAX and w <= FLT_MAX          # false for NaN and +-inf


cdef inline float saturate(float w) noexcept nogil:
    """Clamp an edited finite logit to the finite float32 range (NaN passes through): a
    penalty or bias never turns a token into +inf (a row error) or -inf (a mask)."""
    if w > FLT_MAX:
        return FLT_MAX
    if w < -FLT_MAX:
        return -FLT_MAX
    return w


cdef intp_t gather_ids(const int32_t* ids, intp_t n, intp_t V, int32_t* out) noexcept nogil:
    """Copy the ids of ids[0:n] that lie in [0, V) to out; returns how many. Ids outside are
    skipped, so an unchecked history (TokenSpans) can never index outside the row."""
    cdef intp_t i, c = 0
    cdef int32_t t
    for i in range(n):
        t = ids[i]
        if t >= 0 and t < V:
            out[c] = t
            c += 1
    return c


cdef float build_work(const float* x, intp_t V, const Knobs* kn, const RowEdits* ed,
                      Scratch* sc) noexcept nogil:
    """sc.work = x with allowed set and bitmask -> bias -> repetition -> frequency/presence
    (the documented order), sc.bmax = its block maxima; returns its max. A bitmask is
    applied in the copy an edited row needs anyway, fused with the block-max pass, so a
    row with only a bitmask makes one pass over its logits. Ids outside [0, V) are skipped;
    non-finite logits (masked -inf, NaN, +inf) are never edited; edited values saturate at
    +-FLT_MAX."""
    cdef float* w = sc.work
    cdef intp_t i
    cdef int32_t t
    cdef float m
    if ed.has_allowed:
        for i in range(V):
            w[i] = -INFINITY
        for i in range(ed.n_allowed):
            t = ed.allowed_ids[i]
            if t >= 0 and t < V and (ed.mask == NULL or tep_bit(ed.mask, t)):
                w[t] = x[t]
    elif ed.mask != NULL:
        m = tep_copy_mask_max(x, ed.mask, V, w, sc.bmax)
        if not row_has_sparse_edits(kn, ed):
            return m
    else:
        memcpy(w, x, V * sizeof(float))
    sparse_edits(w, V, kn, ed, sc)
    return tep_block_max(w, V, sc.bmax)


cdef void sparse_edits(float* w, intp_t V, const Knobs* kn, const RowEdits* ed,
                       Scratch* sc) noexcept nogil:
    """Bias, repetition, frequency/presence on the work row w (see build_work)."""
    cdef intp_t i, j, n, run
    cdef int32_t t
    cdef float b, r = kn.repetition_penalty
    for i in range(ed.n_bias):
        t = ed.bias_ids[i]
        if t < 0 or t >= V or not finite(w[t]):
            continue
        b = ed.bias_values[i]
        b = 100.0 if b > 100.0 else (-100.0 if b < -100.0 else b)
        w[t] = saturate(w[t] + b)
    if r != 1.0 and ed.n_prompt + ed.n_output > 0:
        # each distinct token of prompt ∪ output once: sort a copy, walk the runs
        n = gather_ids(ed.prompt_ids, ed.n_prompt, V, sc.hbuf)
        n += gather_ids(ed.output_ids, ed.n_output, V, sc.hbuf + n)
        qsort(sc.hbuf, n, sizeof(int32_t), cmp_int32)
        for i in range(n):
            t = sc.hbuf[i]
            if (i > 0 and t == sc.hbuf[i - 1]) or not finite(w[t]):
                continue
            w[t] = saturate(w[t] / r if w[t] > 0 else w[t] * r)
    if (kn.frequency_penalty != 0.0 or kn.presence_penalty != 0.0) and ed.n_output > 0:
        n = gather_ids(ed.output_ids, ed.n_output, V, sc.hbuf)
        qsort(sc.hbuf, n, sizeof(int32_t), cmp_int32)
        i = 0
        while i < n:
            t = sc.hbuf[i]
            j = i
            while j < n and sc.hbuf[j] == t:
                j += 1
            run = j - i
            if finite(w[t]):
                w[t] = saturate(w[t] - (kn.frequency_penalty * run + kn.presence_penalty))
            i = j


# ---- the row kernel ---------------------------------------------------------------------------

cdef inline int64_t best_cand(const Cand* a, intp_t n) noexcept nogil:
    """Index of the largest value in a[0:n] (lowest token id on ties); -1 when n == 0."""
    cdef intp_t i
    cdef int64_t best = -1
    cdef float bv = -INFINITY
    for i in range(n):
        if best < 0 or a[i].v > bv or (a[i].v == bv and a[i].idx < best):
            best = a[i].idx
            bv = a[i].v
    return best


# relative slack on "the top token alone holds top_p of the mass": larger than the exp
# approximation's error on a row's sum, so the shortcut never decides a case top_p_row
# would decide otherwise
cdef double TOP_HOLDS_SLACK = 1e-5


cdef bint top_token_holds(const float* v, intp_t V, float m, float s, double p,
                          Scratch* sc) noexcept nogil:
    """True when top_p keeps the argmax alone: p > 1/2 (so no other token can tie it) and
    the argmax's probability 1/Z >= p (with slack). One vectorised exp pass; a peaked row
    (the common case at moderate temperature) then skips top_p_row's sample, histogram
    and bracket, and draws what top_p_row would: the only kept token."""
    cdef intp_t nb = (V + TEP_BLOCK - 1) // TEP_BLOCK, b
    cdef double bound = 0.0
    cdef int top_blocks = 0
    cdef intp_t bt = 0
    cdef float b2 = -INFINITY
    if not (p > 0.5):
        return False
    # cheap refusals first (a flat row costs one pass over the block maxima): the max in
    # two blocks is a tie (p_max <= 1/2 < p), and a runner-up block max of weight above
    # 1/p - 1 leaves the top token short of p
    for b in range(nb):
        if sc.bmax[b] == m:
            top_blocks += 1
            bt = b
        elif sc.bmax[b] > b2:
            b2 = sc.bmax[b]
    if top_blocks != 1 or tep_exp_ms(b2, m, s) > 1.0 / p - 1.0:
        return False
    # an upper bound next, from the block maxima (no pass over the row): the top block
    # summed exactly, every other block as if all its tokens were its max
    tep_exp_blocks(sc.bmax, nb, m, s, -INFINITY, NULL, sc.ebuf)
    for b in range(nb):
        if b != bt:
            bound += <double>sc.ebuf[b] * min(TEP_BLOCK, V - b * TEP_BLOCK)
    bound += tep_exp_blocks(v + bt * TEP_BLOCK, min(TEP_BLOCK, V - bt * TEP_BLOCK),
                            m, s, -INFINITY, NULL, NULL)
    if 1.0 >= p * bound * (1.0 + TOP_HOLDS_SLACK):
        return True
    if 1.0 < p * bound * (1.0 / 16.0):
        return False        # far off: an exact pass would be wasted on a flat row
    return 1.0 >= p * tep_exp_blocks(v, V, m, s, -INFINITY, NULL, NULL) * (1.0 + TOP_HOLDS_SLACK)


cdef int64_t draw_row(const float* v, intp_t V, float m, const Knobs* kn, Scratch* sc,
                      const uint32_t* mask) noexcept nogil:
    """The drawn token of a row whose (edited) logits v have the finite max m and block
    maxima in sc.bmax; -1 when a path finds no token (sample_row then falls back).

    mask (may be NULL): a bitmask not yet applied to v (sc.bmax is of the masked row).
    Greedy, min_p/top_k candidates and the envelope draw read it token by token; the
    paths that sweep the whole row (top_p alone, the exact exp-sum draw) first write the
    masked row to sc.work, so they see -inf like any masked token."""
    cdef intp_t nb = (V + TEP_BLOCK - 1) // TEP_BLOCK, nc = 0, i, b
    cdef float T = kn.temperature, s, lb = -INFINITY, lbk, tk, thr, p = kn.top_p
    cdef bint use_k, have_cands = False
    cdef int64_t k = kn.top_k
    cdef double Z, target, acc, u
    cdef float e
    cdef int64_t tok

    if T < GREEDY_T:
        return argmax_blocks(v, V, sc.bmax, m, mask)
    s = 1.0 / T
    u = philox_uniform(kn.seed, kn.step)
    # A top_p below the smallest normal float32 keeps what any top_p below the top token's
    # probability keeps (the top token and its ties); 0 would make the mass target 0.
    if p < FLT_MIN:
        p = FLT_MIN

    # min_p: p_i >= min_p * p_max  <=>  v_i >= m + T*log(min_p)
    if kn.min_p > 0:
        lb = m + T * logf(kn.min_p) if kn.min_p < 1 else m
    use_k = k > 0 and k < V
    if use_k or kn.min_p > 0:
        lbk = lb
        if use_k and nb > k:
            # the k largest block maxima are k distinct tokens, so the k-th value >= their min
            memcpy(sc.sel, sc.bmax, nb * sizeof(float))
            tk = kth_largest(sc.sel, nb, k)
            if tk > lbk:
                lbk = tk
        nc = collect(v, V, sc.bmax, lbk, False, sc.cand, mask)
        if use_k:
            if nc < k and lbk != lb:
                # fewer than k survivors in all: top_k keeps them all
                nc = collect(v, V, sc.bmax, lb, False, sc.cand, mask)
            elif nc > k:
                for i in range(nc):
                    sc.sel[i] = sc.cand[i].v
                tk = kth_largest(sc.sel, nc, k)
                b = 0
                for i in range(nc):          # keep ties at the k-th value
                    if sc.cand[i].v >= tk:
                        sc.cand[b] = sc.cand[i]
                        b += 1
                nc = b
        have_cands = True

    if have_cands:
        if nc == 0:
            return -1                        # invariant broken: sample_row's fallback
        Z = 0.0
        for i in range(nc):
            e = tep_exp_ms(sc.cand[i].v, m, s)
            sc.cand[i].e = e
            Z += e
        if p < 1.0:
            thr = mass_select(sc.cand, nc, p * Z, sc.cand + nc, sc.hist)
            b = 0
            Z = 0.0
            for i in range(nc):
                if sc.cand[i].v >= thr:
                    sc.cand[b] = sc.cand[i]
                    Z += sc.cand[b].e
                    b += 1
            if b == 0:
                # nothing reached the threshold (cannot happen; cand is untouched then):
                # the kept set's argmax, never an empty set
                return best_cand(sc.cand, nc)
            nc = b
        target = u * Z
        acc = 0.0
        for i in range(nc):
            acc += sc.cand[i].e
            if acc > target:
                return sc.cand[i].idx
        return sc.cand[nc - 1].idx           # rounding left target past the end (nc > 0)

    # whole-row paths: top_p alone, or the full vocabulary
    if p >= 1.0 and envelope_draw(v, V, m, s, kn.seed, kn.step, sc, &tok, mask):
        return tok
    if mask != NULL:
        tep_copy_mask_max(v, mask, V, sc.work, sc.bmax)
        v = sc.work
    if p < 1.0:
        if top_token_holds(v, V, m, s, p, sc):
            return argmax_blocks(v, V, sc.bmax, m)
        return top_p_row(v, V, m, s, p, u, sc)
    Z = tep_exp_blocks(v, V, m, s, -INFINITY, sc.bsum, NULL)
    return block_draw(v, V, sc.bsum, -INFINITY, m, s, u * Z)


cdef int sample_row(const float32_t* x, intp_t V, const Knobs* kn, const RowEdits* ed,
                    Scratch* sc, int64_t* token_out) noexcept nogil:
    """Sample one token from logits x[0:V] (IN) into token_out (OUT). Returns a Status.

    Invariant: on TEP_OK the token is in [0, V) with a finite processed logit. Should a
    path ever break it, the row's argmax (kept by every filter) is returned instead of an
    index computed from an empty or stale candidate set."""
    cdef const float* v = x
    cdef const uint32_t* lazy = NULL
    cdef float m
    cdef int64_t tok
    if ed.mask != NULL and not ed.has_allowed and not row_has_sparse_edits(kn, ed):
        # only a bitmask: one read-only pass for the masked block maxima; the draw reads
        # the mask where it reads a token (see draw_row)
        lazy = ed.mask
        m = tep_copy_mask_max(x, lazy, V, NULL, sc.bmax)
    elif row_has_edits(kn, ed):
        m = build_work(x, V, kn, ed, sc)
        v = sc.work
    else:
        m = tep_block_max(v, V, sc.bmax)
    if m == -INFINITY:
        if (ed.has_allowed or ed.mask != NULL) and tep_block_max(x, V, sc.bmax) > -INFINITY:
            return TEP_MASKED_ALL
        return TEP_NO_FINITE
    if m == INFINITY:
        return TEP_POS_INF
    tok = draw_row(v, V, m, kn, sc, lazy)
    if tok < 0 or tok >= V or not (v[tok] > -INFINITY) or (lazy != NULL and not tep_bit(lazy, tok)):
        tok = argmax_blocks(v, V, sc.bmax, m, lazy)
    token_out[0] = tok
    return TEP_OK


cdef int raw_logprobs_row(const float32_t* x, intp_t V, int64_t token, int n_top, bint reuse_bmax,
                          Scratch* sc, float32_t* lp_out, int64_t* rank_out,
                          int64_t* top_ids_out, float32_t* top_lp_out) noexcept nogil:
    """Raw (unprocessed) logprob and 1-based rank of token, and the n_top best tokens.

    reuse_bmax: sc.bmax already holds this row's block maxima (the row had no edits)."""
    cdef intp_t nb = (V + TEP_BLOCK - 1) // TEP_BLOCK, i, n
    cdef float* bm = sc.bmax if reuse_bmax else sc.bmax_raw
    cdef float m, xt, lbn
    cdef double lse
    cdef int64_t rank = 1
    if reuse_bmax:
        m = -INFINITY
        for i in range(nb):
            m = bm[i] if bm[i] > m else m
    else:
        m = tep_block_max(x, V, bm)
    if m == -INFINITY:
        return TEP_NO_FINITE
    if m == INFINITY:
        return TEP_POS_INF
    if token < 0 or token >= V:
        return TEP_NO_FINITE         # sample_row never hands one out; no read outside x
    lse = m + log(tep_exp_blocks(x, V, m, 1.0, -INFINITY, NULL, NULL))
    xt = x[token]
    if xt != xt:
        xt = -INFINITY
    lp_out[0] = <float>(xt - lse)
    for i in range(V):
        rank += x[i] > xt
    rank_out[0] = rank
    if n_top > 0:
        lbn = -INFINITY
        if nb >= n_top:
            memcpy(sc.sel, bm, nb * sizeof(float))
            lbn = kth_largest(sc.sel, nb, n_top)
        n = collect(x, V, bm, lbn, False, sc.cand) if lbn > -INFINITY else 0
        if n < n_top:
            n = collect(x, V, bm, -INFINITY, True, sc.cand)
        qsort(sc.cand, n, sizeof(Cand), cmp_cand_desc)
        for i in range(n_top):
            if i < n:
                top_ids_out[i] = sc.cand[i].idx
                top_lp_out[i] = <float>(sc.cand[i].v - lse)
            else:                    # n_top > V (the wrapper refuses it): no stale reads
                top_ids_out[i] = -1
                top_lp_out[i] = -INFINITY
    return TEP_OK


cdef int log_softmax_row(const float32_t* x, intp_t V, float32_t* bmax,
                         float32_t* out) noexcept nogil:
    """out = x - logsumexp(x), NaN as -inf. bmax: scratch [ceil(V/64)]."""
    cdef float m = tep_block_max(x, V, bmax)
    cdef double c
    cdef float cf
    cdef intp_t i
    if m == -INFINITY:
        return TEP_NO_FINITE
    if m == INFINITY:
        return TEP_POS_INF
    c = m + log(tep_exp_blocks(x, V, m, 1.0, -INFINITY, NULL, NULL))
    cf = <float>c
    for i in range(V):
        out[i] = x[i] - cf if x[i] == x[i] else -INFINITY
    return TEP_OK


# ---- scratch ----------------------------------------------------------------------------------

cdef inline size_t _carve(size_t n) noexcept nogil:
    return (n + 63) & ~(<size_t>63)      # 64-byte aligned sub-buffers


cdef int scratch_alloc(Scratch* sc, intp_t V, bint need_work, intp_t max_hist,
                       bint need_raw, bint greedy_only=False) noexcept nogil:
    """Point sc at this thread's scratch block, carved into the buffers a row of V tokens
    needs (greedy_only: the small ones). Buffers are not cleared: code writes before it
    reads."""
    cdef intp_t nb = (V + TEP_BLOCK - 1) // TEP_BLOCK
    cdef size_t f_nb = _carve((nb + 1) * sizeof(float))
    cdef size_t d_nb = _carve((nb + 1) * sizeof(double))
    cdef size_t f_v = _carve((V + 1) * sizeof(float))
    cdef size_t c_v = _carve((2 * V + 1) * sizeof(Cand))
    cdef size_t h = _carve(HIST_BINS * sizeof(float64_t))
    cdef size_t hb = _carve((max_hist + 1) * sizeof(int32_t))
    cdef size_t total = f_nb + hb + (f_nb if need_raw else 0) + (f_v if need_work else 0)
    cdef char* p
    cdef int owned = 1
    memset(sc, 0, sizeof(Scratch))
    if not greedy_only:
        total += d_nb + 2 * f_v + c_v + 2 * h
    p = <char*>tep_scratch_get(total, &owned)
    if p == NULL:
        return TEP_NO_MEMORY
    sc.block = p if owned else NULL
    sc.bmax = <float*>p; p += f_nb
    sc.hbuf = <int32_t*>p; p += hb
    if need_raw:
        sc.bmax_raw = <float*>p; p += f_nb
    if need_work:
        sc.work = <float*>p; p += f_v
    if not greedy_only:
        sc.bsum = <double*>p; p += d_nb
        sc.sel = <float*>p; p += f_v
        sc.ebuf = <float*>p; p += f_v
        sc.cand = <Cand*>p; p += c_v
        sc.hist = <float64_t*>p; p += h
        sc.hist2 = <float64_t*>p; p += h
    return TEP_OK


cdef void scratch_free(Scratch* sc) noexcept nogil:
    """Give back a block that is not this thread's kept one."""
    free(sc.block)
    memset(sc, 0, sizeof(Scratch))


cdef int finish_row(const float32_t* x, intp_t V, const Knobs* kn, const RowEdits* ed,
                    int n_top, bint want_lp, Scratch* sc, int64_t* tok, float32_t* lp,
                    int64_t* rank, int64_t* top_ids, float32_t* top_lp) noexcept nogil:
    """sample_row, then the raw logprobs when asked for."""
    cdef int st = sample_row(x, V, kn, ed, sc, tok)
    if st == TEP_OK and want_lp:
        st = raw_logprobs_row(x, V, tok[0], n_top, not row_has_edits(kn, ed), sc,
                              lp, rank, top_ids, top_lp)
    return st


cdef enum:
    # rows of the knobs matrix passed to sample_batch
    K_TEMPERATURE = 0
    K_TOP_K = 1
    K_TOP_P = 2
    K_MIN_P = 3
    K_REPETITION = 4
    K_PRESENCE = 5
    K_FREQUENCY = 6
    N_KNOBS = 7


cdef struct Batch:
    # Everything sample_batch shares between rows; knobs/seeds/steps broadcast when their
    # column count is 1 (stride 0).
    const float32_t* logits
    intp_t V
    const float64_t* knobs
    intp_t knob_cols
    intp_t knob_stride
    const uint64_t* seed
    intp_t seed_stride
    const uint64_t* step
    intp_t step_stride
    Ragged prompt
    Ragged output
    Ragged bias
    Ragged allowed
    const uint8_t* has_allowed
    const uint32_t* mask         # [B, mask_words] or NULL
    intp_t mask_words
    int n_top
    bint want_lp
    int64_t* out_tok
    int32_t* out_status
    float32_t* out_lp
    int64_t* out_rank
    int64_t* out_top_ids
    float32_t* out_top_lp


cdef void batch_row(intp_t r, const Batch* bt, Scratch* sc) noexcept nogil:
    """Gather row r's knobs and edits from the batch arrays, then sample it."""
    cdef Knobs kn
    cdef RowEdits ed
    cdef const float64_t* k = bt.knobs + r * bt.knob_stride
    cdef intp_t c = bt.knob_cols, a
    cdef int st
    kn.temperature = <float>k[K_TEMPERATURE * c]
    kn.top_k = <int64_t>k[K_TOP_K * c]
    kn.top_p = <float>k[K_TOP_P * c]
    kn.min_p = <float>k[K_MIN_P * c]
    kn.repetition_penalty = <float>k[K_REPETITION * c]
    kn.presence_penalty = <float>k[K_PRESENCE * c]
    kn.frequency_penalty = <float>k[K_FREQUENCY * c]
    kn.seed = bt.seed[r * bt.seed_stride]
    kn.step = bt.step[r * bt.step_stride]
    ed.n_prompt = ragged_row(&bt.prompt, r, &a); ed.prompt_ids = bt.prompt.ids + a
    ed.n_output = ragged_row(&bt.output, r, &a); ed.output_ids = bt.output.ids + a
    ed.n_bias = ragged_row(&bt.bias, r, &a)
    ed.bias_ids = bt.bias.ids + a; ed.bias_values = bt.bias.vals + a
    ed.n_allowed = ragged_row(&bt.allowed, r, &a); ed.allowed_ids = bt.allowed.ids + a
    ed.has_allowed = bt.has_allowed[r] != 0
    ed.mask = NULL
    if bt.mask != NULL:
        ed.mask = bt.mask + r * bt.mask_words
        if tep_mask_all_ones(ed.mask, bt.V):
            ed.mask = NULL               # an unconstrained row of a mixed batch: no copy
    bt.out_tok[r] = -1
    st = finish_row(bt.logits + r * bt.V, bt.V, &kn, &ed, bt.n_top, bt.want_lp,
                    sc, &bt.out_tok[r], &bt.out_lp[r], &bt.out_rank[r],
                    bt.out_top_ids + r * bt.n_top, bt.out_top_lp + r * bt.n_top)
    if st != TEP_OK:
        bt.out_tok[r] = -1
    bt.out_status[r] = st


def sample_batch(const float32_t[:, ::1] logits, const float64_t[:, ::1] knobs,
                 const uint64_t[::1] seed, const uint64_t[::1] step,
                 const int32_t[::1] prompt_ids, const int64_t[::1] prompt_starts,
                 const int64_t[::1] prompt_ends,
                 const int32_t[::1] output_ids, const int64_t[::1] output_starts,
                 const int64_t[::1] output_ends,
                 const int32_t[::1] bias_ids, const float32_t[::1] bias_values,
                 const int64_t[::1] bias_starts, const int64_t[::1] bias_ends,
                 const int32_t[::1] allowed_ids, const int64_t[::1] allowed_starts,
                 const int64_t[::1] allowed_ends, const uint8_t[::1] has_allowed,
                 const uint32_t[:, ::1] bitmask, bint use_bitmask,
                 int n_top, bint want_logprobs, bint need_work, Py_ssize_t max_history,
                 int n_threads,
                 int64_t[::1] out_tokens, int32_t[::1] out_status, float32_t[::1] out_logprobs,
                 int64_t[::1] out_ranks, int64_t[:, ::1] out_top_ids,
                 float32_t[:, ::1] out_top_logprobs):
    """Sample one token per row of logits [B, V]; the wrapper has validated the knobs.

    knobs [7, 1 or B] float64 rows: temperature, top_k (0 = off), top_p, min_p,
    repetition, presence, frequency penalty; seed and step [1 or B]. A single column
    applies to every row. Each ragged input is (ids int32 [N >= 1], starts, ends int64 [B]):
    row r's ids are ids[starts[r]:ends[r]]; a slice outside [0, N) counts as empty and ids
    outside [0, V) are skipped (the kernel guards every read). bias_values is [N] beside
    bias_ids. bitmask [B, W >= ceil(V/32)] (used when use_bitmask): bit j of row r allows
    token j; a row whose mask allows every token costs one scan of its words. max_history bounds (prompt + output) per row. out_tokens/out_status [B] are
    written for every row (token -1 when the status is not 0), out_logprobs/out_ranks [B]
    and out_top_* [B, n_top] when want_logprobs. Runs without the GIL, rows over
    n_threads threads.
    """
    cdef intp_t B = logits.shape[0], V = logits.shape[1], r
    cdef Scratch sc
    cdef Scratch* psc
    cdef Batch bt
    cdef int ok
    if B == 0:
        return
    bt.logits = &logits[0, 0]; bt.V = V
    bt.knobs = &knobs[0, 0]; bt.knob_cols = knobs.shape[1]
    bt.knob_stride = 1 if knobs.shape[1] > 1 else 0
    bt.seed = &seed[0]; bt.seed_stride = 1 if seed.shape[0] > 1 else 0
    bt.step = &step[0]; bt.step_stride = 1 if step.shape[0] > 1 else 0
    set_ragged(&bt.prompt, prompt_ids, NULL, prompt_starts, prompt_ends)
    set_ragged(&bt.output, output_ids, NULL, output_starts, output_ends)
    set_ragged(&bt.bias, bias_ids, &bias_values[0], bias_starts, bias_ends)
    set_ragged(&bt.allowed, allowed_ids, NULL, allowed_starts, allowed_ends)
    if bias_values.shape[0] < bias_ids.shape[0]:
        bt.bias.n_ids = bias_values.shape[0]
    bt.has_allowed = &has_allowed[0]
    bt.mask = &bitmask[0, 0] if use_bitmask else NULL
    bt.mask_words = bitmask.shape[1]
    bt.n_top = n_top; bt.want_lp = want_logprobs
    bt.out_tok = &out_tokens[0]; bt.out_status = &out_status[0]
    bt.out_lp = &out_logprobs[0]; bt.out_rank = &out_ranks[0]
    bt.out_top_ids = &out_top_ids[0, 0] if n_top > 0 else NULL
    bt.out_top_lp = &out_top_logprobs[0, 0] if n_top > 0 else NULL
    need_work = need_work or use_bitmask
    n_threads = <int>min(max(n_threads, 1), B)
    if n_threads <= 1:
        with nogil:
            ok = scratch_alloc(&sc, V, need_work, max_history, want_logprobs)
            for r in range(B):
                if ok != TEP_OK:
                    out_status[r] = ok
                    out_tokens[r] = -1
                else:
                    batch_row(r, &bt, &sc)
            scratch_free(&sc)
        return
    with nogil, parallel(num_threads=n_threads):
        # assigned inside the parallel block, so each thread gets its own scratch
        psc = <Scratch*>malloc(sizeof(Scratch))
        ok = scratch_alloc(psc, V, need_work, max_history, want_logprobs) if psc != NULL \
            else TEP_NO_MEMORY
        for r in prange(B, schedule="static"):
            if ok != TEP_OK:
                out_status[r] = ok
                out_tokens[r] = -1
            else:
                batch_row(r, &bt, psc)
        if psc != NULL:
            scratch_free(psc)
            free(psc)


def sample_one(const float32_t[::1] logits, float temperature, int64_t top_k, float top_p,
               float min_p, uint64_t seed, uint64_t step, const uint32_t[::1] mask=None,
               const int32_t[::1] bias_ids=None, const float32_t[::1] bias_values=None):
    """Fast path for one row [V] with scalar knobs, no penalties, allowed set or logprobs;
    optionally a bitmask row [>= ceil(V/32)] words and a logit bias (bias_ids int32 [n]
    beside bias_values float32 [n]; ids outside [0, V) are skipped, values clamp to
    +-100 as in sample_batch).

    Returns the token id (>= 0), or -Status on failure. Arguments are pre-validated."""
    cdef Knobs kn
    cdef RowEdits ed
    cdef Scratch sc
    cdef int64_t tok = 0
    cdef int st
    cdef intp_t V = logits.shape[0]
    memset(&ed, 0, sizeof(RowEdits))
    kn.temperature = temperature; kn.top_k = top_k; kn.top_p = top_p; kn.min_p = min_p
    kn.repetition_penalty = 1.0; kn.presence_penalty = 0.0; kn.frequency_penalty = 0.0
    kn.seed = seed; kn.step = step
    if mask is not None and not tep_mask_all_ones(&mask[0], V):
        ed.mask = &mask[0]
    if bias_ids is not None and bias_values is not None and bias_ids.shape[0] > 0:
        ed.n_bias = min(bias_ids.shape[0], bias_values.shape[0])
        ed.bias_ids = &bias_ids[0]
        ed.bias_values = &bias_values[0]
    with nogil:
        st = scratch_alloc(&sc, V, ed.mask != NULL or ed.n_bias > 0, 0, False,
                           temperature < GREEDY_T)
        if st == TEP_OK:
            st = sample_row(&logits[0], V, &kn, &ed, &sc, &tok)
        scratch_free(&sc)
    return tok if st == TEP_OK else -st


def sample_rows(const float32_t[:, ::1] logits, float temperature, int64_t top_k, float top_p,
                float min_p, const uint64_t[::1] seed, uint64_t step, int n_threads,
                int64_t[::1] out_tokens, int32_t[::1] out_status,
                const uint32_t[:, ::1] mask=None):
    """Rows [B, V] with the same scalar knobs and no edits or logprobs; seed is [1 or B];
    optionally bitmask rows [B, >= ceil(V/32)].

    out_tokens[r] / out_status[r] are written per row. Arguments are pre-validated."""
    cdef intp_t B = logits.shape[0], V = logits.shape[1], r
    cdef intp_t seed_stride = 1 if seed.shape[0] > 1 else 0
    cdef Knobs kn
    cdef RowEdits ed
    cdef Scratch* psc
    cdef int ok
    cdef const uint32_t* mp = NULL
    cdef intp_t mw = 0
    if B == 0:
        return
    if mask is not None:
        mp = &mask[0, 0]
        mw = mask.shape[1]
    memset(&ed, 0, sizeof(RowEdits))
    kn.temperature = temperature; kn.top_k = top_k; kn.top_p = top_p; kn.min_p = min_p
    kn.repetition_penalty = 1.0; kn.presence_penalty = 0.0; kn.frequency_penalty = 0.0
    kn.step = step
    with nogil, parallel(num_threads=<int>min(max(n_threads, 1), B)):
        psc = <Scratch*>malloc(sizeof(Scratch))
        ok = scratch_alloc(psc, V, mp != NULL, 0, False, temperature < GREEDY_T) \
            if psc != NULL else TEP_NO_MEMORY
        for r in prange(B, schedule="static"):
            out_tokens[r] = -1
            if ok != TEP_OK:
                out_status[r] = ok
            else:
                out_status[r] = sample_seeded(&logits[r, 0], V, &kn, seed[r * seed_stride],
                                              mp + r * mw if mp != NULL else NULL,
                                              psc, &out_tokens[r])
        if psc != NULL:
            scratch_free(psc)
            free(psc)


cdef inline int sample_seeded(const float32_t* x, intp_t V, const Knobs* shared, uint64_t seed,
                              const uint32_t* mask, Scratch* sc, int64_t* tok) noexcept nogil:
    cdef Knobs kn = shared[0]
    cdef RowEdits ed
    memset(&ed, 0, sizeof(RowEdits))
    if mask != NULL and not tep_mask_all_ones(mask, V):
        ed.mask = mask
    kn.seed = seed
    return sample_row(x, V, &kn, &ed, sc, tok)


def log_softmax_batch(const float32_t[:, ::1] logits, float32_t[:, ::1] out,
                      int32_t[::1] out_status, int n_threads):
    """out[B, V] = log_softmax(logits[B, V]) row-wise; out_status[r] is a Status."""
    cdef intp_t B = logits.shape[0], V = logits.shape[1], r
    cdef intp_t nb = (V + TEP_BLOCK - 1) // TEP_BLOCK
    cdef float* bmax
    if B == 0 or V == 0:
        return
    with nogil, parallel(num_threads=<int>min(max(n_threads, 1), B)):
        bmax = <float*>malloc((nb + 1) * sizeof(float))
        for r in prange(B, schedule="static"):
            if bmax == NULL:
                out_status[r] = TEP_NO_MEMORY
            else:
                out_status[r] = log_softmax_row(&logits[r, 0], V, bmax, &out[r, 0])
        free(bmax)


def apply_bitmask_batch(float32_t[:, ::1] logits, const uint32_t[:, ::1] bitmask,
                        int n_threads):
    """logits[r, j] = -inf wherever bit j of bitmask[r] is clear (in place; [B, V] and
    [B, W >= ceil(V/32)], pre-validated). Allowed tokens are neither read nor written."""
    cdef intp_t B = logits.shape[0], V = logits.shape[1], r
    if B == 0 or V == 0:
        return
    if n_threads <= 1 or B == 1:
        with nogil:
            for r in range(B):
                tep_mask_inplace(&logits[r, 0], &bitmask[r, 0], V)
        return
    with nogil, parallel(num_threads=<int>min(n_threads, B)):
        for r in prange(B, schedule="static"):
            tep_mask_inplace(&logits[r, 0], &bitmask[r, 0], V)


def max_threads():
    """Threads OpenMP would use by default (honours OMP_NUM_THREADS); 1 without OpenMP."""
    return omp_get_max_threads()


tep_simd_init(1)
