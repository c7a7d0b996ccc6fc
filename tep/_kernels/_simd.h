/* Vectorised row primitives for the sampling kernel.
 *
 * gcc will not vectorise float max/sum reductions without -ffast-math, and -ffast-math
 * deletes the NaN checks the kernels depend on; so the two reductions that every
 * sampling call pays for are written here with AVX2 intrinsics, picked at run time
 * (tep_simd_init), with a portable scalar path that computes the same quantities.
 *
 * NaN policy: NaN behaves as -inf everywhere (max skips it, exp gives 0).
 */
#ifndef TEP_SIMD_H
#define TEP_SIMD_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define TEP_BLOCK 64

/* A candidate token: (processed) logit, its exp((v - max) / T), its id. */
typedef struct { float v; float e; int64_t idx; } tep_cand;

/* exp as 2^t: t = (x - m) * a with a = log2(e) / T (one multiply for the temperature and
 * the change of base; not an FMA x * a - m * a, whose rounded m * a shifts every t when
 * logits are huge), t = k + f with k an integer and
 * |f| <= 1/2, 2^f from a degree-5 polynomial (relative error 8e-8 in exact arithmetic),
 * 2^k added straight into the exponent bits. k comes from the 1.5 * 2^23 "magic" addition,
 * which rounds to nearest in the default rounding mode without a libm call. t is clamped
 * to [-125, ...]: below that, and for NaN or -inf, the result is 0 (e^-86.6 = 2.5e-38 is
 * nothing next to the row's max token, whose weight is 1). Callers keep t <= ~1 (they
 * subtract the row max), so the exponent never overflows. */
#define TEP_EXP2_LO (-125.0f)
#define TEP_MAGIC 12582912.0f
#define TEP_LOG2E 1.44269504088896341f
#define TEP_E2C0 1.0000001192092896f
#define TEP_E2C1 0.6931469440460205f
#define TEP_E2C2 0.24022121727466583f
#define TEP_E2C3 0.05550742521882057f
#define TEP_E2C4 0.009675469249486923f
#define TEP_E2C5 0.001326697994954884f

static inline float tep_exp2f(float t) {
    if (!(t >= TEP_EXP2_LO)) return 0.0f;
    float k = t + TEP_MAGIC;             /* k's low mantissa bits hold round(t) */
    float f = t - (k - TEP_MAGIC);
    float p = TEP_E2C5;
    p = p * f + TEP_E2C4;
    p = p * f + TEP_E2C3;
    p = p * f + TEP_E2C2;
    p = p * f + TEP_E2C1;
    p = p * f + TEP_E2C0;
    uint32_t kb, pb;
    memcpy(&kb, &k, sizeof kb);
    memcpy(&pb, &p, sizeof pb);
    pb += kb << 23;                      /* the magic's own bits shift out */
    memcpy(&p, &pb, sizeof p);
    return p;
}

/* exp((x - m) * s) for x <= m, rounded exactly as the vector passes round it (the same t);
 * 0 below e^-86.6, for -inf and for NaN. */
static inline float tep_exp_ms(float x, float m, float s) {
    return tep_exp2f((x - m) * (s * TEP_LOG2E));
}

/* ---- scalar reference paths -------------------------------------------------------- */

static float tep_block_max_scalar(const float *v, ptrdiff_t n, float *bmax) {
    float m = -INFINITY;
    for (ptrdiff_t b0 = 0, blk = 0; b0 < n; b0 += TEP_BLOCK, blk++) {
        ptrdiff_t e = b0 + TEP_BLOCK < n ? b0 + TEP_BLOCK : n;
        float bm = -INFINITY;
        for (ptrdiff_t j = b0; j < e; j++) bm = v[j] > bm ? v[j] : bm;
        bmax[blk] = bm;
        m = bm > m ? bm : m;
    }
    return m;
}

static double tep_exp_blocks_scalar(const float *v, ptrdiff_t n, float m, float s, float lo,
                                    double *bsum, float *out) {
    const float a = s * TEP_LOG2E;
    double total = 0.0;
    for (ptrdiff_t b0 = 0, blk = 0; b0 < n; b0 += TEP_BLOCK, blk++) {
        ptrdiff_t e = b0 + TEP_BLOCK < n ? b0 + TEP_BLOCK : n;
        float acc = 0.0f;
        for (ptrdiff_t j = b0; j < e; j++) {
            float x = v[j] >= lo ? tep_exp2f((v[j] - m) * a) : 0.0f;
            if (out) out[j] = x;
            acc += x;
        }
        if (bsum) bsum[blk] = acc;
        total += acc;
    }
    return total;
}

/* Tokens with lo <= v < hi go to out[0:cap] (index order; the count is returned even past
 * cap). bsum_hi[b] = sum of exp((v - m) * s) over block b's tokens with v >= hi,
 * *z_all = the sum over every token (both summed per 64-token block like tep_exp_blocks),
 * *mass_in = the sum over the bracket's tokens. ecache[0:n] (may be NULL) keeps the
 * exps between calls over one row: filled when fresh is set, read back otherwise, so a
 * second bracket over the same row costs compares, not exps. */
static ptrdiff_t tep_bracket_scalar(const float *v, ptrdiff_t n, float m, float s, float lo,
                                    float hi, double *bsum_hi, double *z_all, double *mass_in,
                                    tep_cand *out, ptrdiff_t cap, float *ecache, int fresh) {
    const float a = s * TEP_LOG2E;
    ptrdiff_t c = 0, blk = 0;
    double total = 0.0, inside = 0.0;
    for (ptrdiff_t b0 = 0; b0 < n; b0 += TEP_BLOCK, blk++) {
        ptrdiff_t e = b0 + TEP_BLOCK < n ? b0 + TEP_BLOCK : n;
        float acc = 0.0f, all = 0.0f;
        for (ptrdiff_t j = b0; j < e; j++) {
            float x = v[j], ex;
            if (ecache && !fresh) {
                ex = ecache[j];
            } else {
                ex = tep_exp2f((x - m) * a);
                if (ecache) ecache[j] = ex;
            }
            all += ex;
            if (x >= hi) {
                acc += ex;
            } else if (x >= lo) {
                if (c < cap) { out[c].v = x; out[c].e = ex; out[c].idx = j; }
                c++;
                inside += ex;
            }
        }
        bsum_hi[blk] = acc;
        total += all;
    }
    *z_all = total;
    *mass_in = inside;
    return c;
}

/* ---- token bitmasks (llguidance / xgrammar layout) --------------------------------------
 * Bit j of mask (bit j % 32 of 32-bit word j / 32) allows token j; a disallowed token
 * becomes -inf. Bits at or past n are never read as tokens. */

static inline int tep_bit(const uint32_t *mask, ptrdiff_t j) {
    return (int)((mask[j >> 5] >> (j & 31)) & 1u);
}

/* out[j] = allowed(j) ? v[j] : -inf (out may be NULL: nothing is written), and the block
 * maxima of the masked row (NaN skipped, as in tep_block_max); returns the row max. One
 * pass; with out == NULL it reads the logits and the mask only. */
static float tep_copy_mask_max_scalar(const float *v, const uint32_t *mask, ptrdiff_t n,
                                      float *out, float *bmax) {
    float m = -INFINITY;
    for (ptrdiff_t b0 = 0, blk = 0; b0 < n; b0 += TEP_BLOCK, blk++) {
        ptrdiff_t e = b0 + TEP_BLOCK < n ? b0 + TEP_BLOCK : n;
        float bm = -INFINITY;
        for (ptrdiff_t j = b0; j < e; j++) {
            float x = tep_bit(mask, j) ? v[j] : -INFINITY;
            if (out) out[j] = x;
            bm = x > bm ? x : bm;
        }
        bmax[blk] = bm;
        m = bm > m ? bm : m;
    }
    return m;
}

/* v[j] = -inf for every disallowed j < n, in place; allowed tokens are not touched. */
static void tep_mask_inplace_scalar(float *v, const uint32_t *mask, ptrdiff_t n) {
    for (ptrdiff_t w0 = 0; w0 < n; w0 += 32) {
        uint32_t w = mask[w0 >> 5];
        if (w == 0xFFFFFFFFu) continue;
        ptrdiff_t e = w0 + 32 < n ? w0 + 32 : n;
        for (ptrdiff_t j = w0; j < e; j++)
            if (!((w >> (j - w0)) & 1u)) v[j] = -INFINITY;
    }
}

/* 1 when every token j < n is allowed (an unconstrained row of a mixed batch). */
static int tep_mask_all_ones(const uint32_t *mask, ptrdiff_t n) {
    ptrdiff_t full = n >> 5, j;
    for (j = 0; j < full; j++)
        if (mask[j] != 0xFFFFFFFFu) return 0;
    if (n & 31) {
        uint32_t need = (1u << (n & 31)) - 1u;
        if ((mask[full] & need) != need) return 0;
    }
    return 1;
}

/* ---- AVX2 + FMA paths (x86-64 with gcc/clang only) ------------------------------------ */
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TEP_HAVE_AVX2_PATH 1
#define TEP_AVX2 __attribute__((target("avx2,fma")))

TEP_AVX2 static inline float tep_hmax256(__m256 a) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
    return _mm_cvtss_f32(x);
}

TEP_AVX2 static inline float tep_hsum256(__m256 a) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
    return _mm_cvtss_f32(x);
}

/* tep_exp2f on 8 lanes (FMA in the polynomial; same clamp, NaN -> 0). */
TEP_AVX2 static inline __m256 tep_exp2_256(__m256 t) {
    const __m256 lo = _mm256_set1_ps(TEP_EXP2_LO), magic = _mm256_set1_ps(TEP_MAGIC);
    __m256 valid = _mm256_cmp_ps(t, lo, _CMP_GE_OQ);  /* false for NaN, -inf, tiny */
    t = _mm256_max_ps(t, lo);                          /* NaN -> lo (2nd operand wins) */
    __m256 k = _mm256_add_ps(t, magic);
    __m256 f = _mm256_sub_ps(t, _mm256_sub_ps(k, magic));
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(TEP_E2C5), f, _mm256_set1_ps(TEP_E2C4));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(TEP_E2C3));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(TEP_E2C2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(TEP_E2C1));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(TEP_E2C0));
    __m256i pk = _mm256_add_epi32(_mm256_castps_si256(p),
                                  _mm256_slli_epi32(_mm256_castps_si256(k), 23));
    return _mm256_and_ps(_mm256_castsi256_ps(pk), valid);
}

TEP_AVX2 static float tep_block_max_avx2(const float *v, ptrdiff_t n, float *bmax) {
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    __m256 gm = ninf;
    ptrdiff_t full = n / TEP_BLOCK, blk;
    for (blk = 0; blk < full; blk++) {
        const float *p = v + blk * TEP_BLOCK;
        /* _mm256_max_ps(x, acc) returns acc when x is NaN: NaN is skipped. */
        __m256 a0 = _mm256_max_ps(_mm256_loadu_ps(p + 0), ninf);
        __m256 a1 = _mm256_max_ps(_mm256_loadu_ps(p + 8), ninf);
        __m256 a2 = _mm256_max_ps(_mm256_loadu_ps(p + 16), ninf);
        __m256 a3 = _mm256_max_ps(_mm256_loadu_ps(p + 24), ninf);
        a0 = _mm256_max_ps(_mm256_loadu_ps(p + 32), a0);
        a1 = _mm256_max_ps(_mm256_loadu_ps(p + 40), a1);
        a2 = _mm256_max_ps(_mm256_loadu_ps(p + 48), a2);
        a3 = _mm256_max_ps(_mm256_loadu_ps(p + 56), a3);
        __m256 a = _mm256_max_ps(_mm256_max_ps(a0, a1), _mm256_max_ps(a2, a3));
        gm = _mm256_max_ps(a, gm);
        bmax[blk] = tep_hmax256(a);
    }
    float m = tep_hmax256(gm);
    if (full * TEP_BLOCK < n) {
        float t = tep_block_max_scalar(v + full * TEP_BLOCK, n - full * TEP_BLOCK, bmax + full);
        m = t > m ? t : m;
    }
    return m;
}

TEP_AVX2 static double tep_exp_blocks_avx2(const float *v, ptrdiff_t n, float m, float s, float lo,
                                           double *bsum, float *out) {
    const float a = s * TEP_LOG2E;
    const __m256 va = _mm256_set1_ps(a), vm = _mm256_set1_ps(m), vlo = _mm256_set1_ps(lo);
    double total = 0.0;
    ptrdiff_t full = n / TEP_BLOCK, blk;
    for (blk = 0; blk < full; blk++) {
        const float *p = v + blk * TEP_BLOCK;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (int k = 0; k < TEP_BLOCK; k += 16) {
            __m256 x0 = _mm256_loadu_ps(p + k), x1 = _mm256_loadu_ps(p + k + 8);
            __m256 e0 = _mm256_and_ps(tep_exp2_256(_mm256_mul_ps(_mm256_sub_ps(x0, vm), va)),
                                      _mm256_cmp_ps(x0, vlo, _CMP_GE_OQ));
            __m256 e1 = _mm256_and_ps(tep_exp2_256(_mm256_mul_ps(_mm256_sub_ps(x1, vm), va)),
                                      _mm256_cmp_ps(x1, vlo, _CMP_GE_OQ));
            if (out) {
                _mm256_storeu_ps(out + blk * TEP_BLOCK + k, e0);
                _mm256_storeu_ps(out + blk * TEP_BLOCK + k + 8, e1);
            }
            acc0 = _mm256_add_ps(acc0, e0);
            acc1 = _mm256_add_ps(acc1, e1);
        }
        float bs = tep_hsum256(_mm256_add_ps(acc0, acc1));
        if (bsum) bsum[blk] = bs;
        total += bs;
    }
    if (full * TEP_BLOCK < n)
        total += tep_exp_blocks_scalar(v + full * TEP_BLOCK, n - full * TEP_BLOCK, m, s, lo,
                                       bsum ? bsum + full : NULL, out ? out + full * TEP_BLOCK : NULL);
    return total;
}
TEP_AVX2 static ptrdiff_t tep_bracket_avx2(const float *v, ptrdiff_t n, float m, float s, float lo,
                                           float hi, double *bsum_hi, double *z_all,
                                           double *mass_in, tep_cand *out, ptrdiff_t cap,
                                           float *ecache, int fresh) {
    const float a = s * TEP_LOG2E;
    const __m256 va = _mm256_set1_ps(a), vm = _mm256_set1_ps(m);
    const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
    const int load = ecache && !fresh;
    double total = 0.0, inside = 0.0;
    ptrdiff_t c = 0, full = n / TEP_BLOCK, blk;
    float local[TEP_BLOCK];
    for (blk = 0; blk < full; blk++) {
        const float *p = v + blk * TEP_BLOCK;
        float *eb = ecache ? ecache + blk * TEP_BLOCK : local;  /* this block's exps */
        __m256 acc = _mm256_setzero_ps(), all = _mm256_setzero_ps(), ins = _mm256_setzero_ps();
        uint64_t in = 0;
        for (int k = 0; k < TEP_BLOCK; k += 8) {
            __m256 x = _mm256_loadu_ps(p + k), e;
            if (load) {
                e = _mm256_loadu_ps(eb + k);
            } else {
                e = tep_exp2_256(_mm256_mul_ps(_mm256_sub_ps(x, vm), va));
                _mm256_storeu_ps(eb + k, e);
            }
            __m256 ge_hi = _mm256_cmp_ps(x, vhi, _CMP_GE_OQ);
            all = _mm256_add_ps(all, e);
            acc = _mm256_add_ps(acc, _mm256_and_ps(e, ge_hi));
            /* in the bracket: x >= lo and not x >= hi */
            __m256 inm = _mm256_andnot_ps(ge_hi, _mm256_cmp_ps(x, vlo, _CMP_GE_OQ));
            ins = _mm256_add_ps(ins, _mm256_and_ps(e, inm));
            in |= (uint64_t)(unsigned)_mm256_movemask_ps(inm) << k;
        }
        /* one branchy loop per block, not per vector: its exits mispredict far less */
        while (in) {
            int l = __builtin_ctzll(in);
            in &= in - 1;
            if (c < cap) { out[c].v = p[l]; out[c].e = eb[l]; out[c].idx = blk * TEP_BLOCK + l; }
            c++;
        }
        bsum_hi[blk] = tep_hsum256(acc);
        total += tep_hsum256(all);
        inside += tep_hsum256(ins);
    }
    if (full * TEP_BLOCK < n) {
        double t = 0.0, t_in = 0.0;
        ptrdiff_t room = c < cap ? cap - c : 0;
        tep_cand *dst = out + (c < cap ? c : cap);
        ptrdiff_t extra = tep_bracket_scalar(v + full * TEP_BLOCK, n - full * TEP_BLOCK, m, s, lo, hi,
                                             bsum_hi + full, &t, &t_in, dst, room,
                                             ecache ? ecache + full * TEP_BLOCK : NULL, fresh);
        for (ptrdiff_t i = 0; i < extra && i < room; i++) dst[i].idx += full * TEP_BLOCK;
        c += extra;
        total += t;
        inside += t_in;
    }
    *z_all = total;
    *mass_in = inside;
    return c;
}

/* Lanes k of 8 tokens whose bit k of word w (k = 0..7 of byte `byte`) is set, as sign
 * bits (what blendv reads): shift bit 8 * byte + k of the word up to bit 31. */
TEP_AVX2 static inline __m256 tep_word_lanes(__m256i w, int byte) {
    const __m256i base = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
    __m256i sh = _mm256_sub_epi32(base, _mm256_set1_epi32(8 * byte));
    return _mm256_castsi256_ps(_mm256_sllv_epi32(w, sh));
}

/* lanes of 8 tokens whose bits (the low 8 bits of bits) are set: all-ones lanes */
TEP_AVX2 static inline __m256 tep_bits_to_lanes(uint32_t bits) {
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i b = _mm256_and_si256(_mm256_set1_epi32((int)(bits & 0xFFu)), sel);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, sel));
}

TEP_AVX2 static float tep_copy_mask_max_avx2(const float *v, const uint32_t *mask, ptrdiff_t n,
                                             float *out, float *bmax) {
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    __m256 gm = ninf;
    ptrdiff_t full = n / TEP_BLOCK, blk;
    for (blk = 0; blk < full; blk++) {
        const float *p = v + blk * TEP_BLOCK;
        float *o = out ? out + blk * TEP_BLOCK : NULL;
        uint32_t w0 = mask[2 * blk], w1 = mask[2 * blk + 1];
        __m256 a = ninf;
        if ((w0 & w1) == 0xFFFFFFFFu) {            /* all allowed: a plain copy */
            for (int k = 0; k < TEP_BLOCK; k += 8) {
                __m256 x = _mm256_loadu_ps(p + k);
                if (out) _mm256_storeu_ps(o + k, x);
                a = _mm256_max_ps(x, a);
            }
        } else if ((w0 | w1) == 0) {               /* none allowed: logits not read */
            if (out)
                for (int k = 0; k < TEP_BLOCK; k += 8) _mm256_storeu_ps(o + k, ninf);
        } else {
            __m256i v0 = _mm256_set1_epi32((int)w0), v1 = _mm256_set1_epi32((int)w1);
            for (int k = 0; k < TEP_BLOCK; k += 8) {
                __m256 lanes = tep_word_lanes(k < 32 ? v0 : v1, (k & 31) >> 3);
                __m256 x = _mm256_blendv_ps(ninf, _mm256_loadu_ps(p + k), lanes);
                if (out) _mm256_storeu_ps(o + k, x);
                a = _mm256_max_ps(x, a);
            }
        }
        gm = _mm256_max_ps(a, gm);
        bmax[blk] = tep_hmax256(a);
    }
    float m = tep_hmax256(gm);
    if (full * TEP_BLOCK < n) {
        /* the tail block starts on a word boundary (64 = 2 words) */
        float t = tep_copy_mask_max_scalar(v + full * TEP_BLOCK, mask + 2 * full,
                                           n - full * TEP_BLOCK,
                                           out ? out + full * TEP_BLOCK : NULL, bmax + full);
        m = t > m ? t : m;
    }
    return m;
}

TEP_AVX2 static void tep_mask_inplace_avx2(float *v, const uint32_t *mask, ptrdiff_t n) {
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    ptrdiff_t full = n >> 5, j;
    for (j = 0; j < full; j++) {
        uint32_t w = mask[j];
        if (w == 0xFFFFFFFFu) continue;
        float *p = v + 32 * j;
        if (w == 0) {
            _mm256_storeu_ps(p, ninf); _mm256_storeu_ps(p + 8, ninf);
            _mm256_storeu_ps(p + 16, ninf); _mm256_storeu_ps(p + 24, ninf);
            continue;
        }
        for (int k = 0; k < 32; k += 8) {
            uint32_t off = ~(w >> k) & 0xFFu;       /* disallowed lanes */
            if (off)
                _mm256_maskstore_ps(p + k, _mm256_castps_si256(tep_bits_to_lanes(off)), ninf);
        }
    }
    if (n & 31) tep_mask_inplace_scalar(v + 32 * full, mask + full, n & 31);
}
#else
#define TEP_HAVE_AVX2_PATH 0
#endif

/* ---- dispatch ------------------------------------------------------------------------- */
typedef float (*tep_block_max_fn)(const float *, ptrdiff_t, float *);
typedef double (*tep_exp_blocks_fn)(const float *, ptrdiff_t, float, float, float, double *, float *);
typedef ptrdiff_t (*tep_bracket_fn)(const float *, ptrdiff_t, float, float, float, float, double *,
                                    double *, double *, tep_cand *, ptrdiff_t, float *, int);

static tep_block_max_fn tep_block_max = tep_block_max_scalar;
static tep_exp_blocks_fn tep_exp_blocks = tep_exp_blocks_scalar;
typedef float (*tep_copy_mask_max_fn)(const float *, const uint32_t *, ptrdiff_t, float *, float *);
typedef void (*tep_mask_inplace_fn)(float *, const uint32_t *, ptrdiff_t);

static tep_bracket_fn tep_bracket = tep_bracket_scalar;
static tep_copy_mask_max_fn tep_copy_mask_max = tep_copy_mask_max_scalar;
static tep_mask_inplace_fn tep_mask_inplace = tep_mask_inplace_scalar;
static int tep_simd_level = 0;

/* Pick the AVX2 path when the CPU has it; TEP_SIMD=scalar in the environment forces the
 * portable path (used by tests to check both agree). Returns 1 when AVX2 is in use. */
static int tep_simd_init(int allow_avx2) {
#if TEP_HAVE_AVX2_PATH
    __builtin_cpu_init();
    if (allow_avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        tep_block_max = tep_block_max_avx2;
        tep_exp_blocks = tep_exp_blocks_avx2;
        tep_bracket = tep_bracket_avx2;
        tep_copy_mask_max = tep_copy_mask_max_avx2;
        tep_mask_inplace = tep_mask_inplace_avx2;
        tep_simd_level = 1;
        return 1;
    }
#endif
    (void)allow_avx2;
    tep_block_max = tep_block_max_scalar;
    tep_exp_blocks = tep_exp_blocks_scalar;
    tep_bracket = tep_bracket_scalar;
    tep_copy_mask_max = tep_copy_mask_max_scalar;
    tep_mask_inplace = tep_mask_inplace_scalar;
    tep_simd_level = 0;
    return 0;
}

#endif
