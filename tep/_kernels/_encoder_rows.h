/* Row primitives of the BERT encoder (tep/_kernels/encoder.pyx): the element-wise work
 * between the matrix products, each done in one pass over rows that are still in cache.
 *
 *   tep_enc_bias_gelu    x = GELU(x + b)                      (after the intermediate GEMM)
 *   tep_enc_bias_add     x = x + b                            (after the QKV GEMM)
 *   tep_enc_add_ln       r = LayerNorm(r + y + b)             (after the two output GEMMs)
 *   tep_enc_softmax      s = softmax(s) over each row          (attention, one sequence/head)
 *
 * gcc does not vectorise float reductions or exp without -ffast-math (which tep never
 * uses), so each primitive has an AVX2+FMA path picked at run time and a portable scalar
 * path computing the same formula. exp comes from _simd.h (2^t, degree-5 polynomial).
 *
 * GELU is the erf form 0.5 x (1 + erf(x / sqrt 2)) written with erfc's symmetry:
 * q = erfc(|x| / sqrt 2); GELU = x - 0.5 x q (x >= 0) or 0.5 x q (x < 0); erfc(z) =
 * t P(t) exp(-z^2), t = 1 / (1 + p z) (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7),
 * the same formula as tep.backends._bert_encoder.gelu_erf.
 */
#ifndef TEP_ENCODER_ROWS_H
#define TEP_ENCODER_ROWS_H

#include <math.h>
#include <stddef.h>
#include "_simd.h"

#define TEP_AS_P 0.3275911f
#define TEP_AS_A1 0.254829592f
#define TEP_AS_A2 (-0.284496736f)
#define TEP_AS_A3 1.421413741f
#define TEP_AS_A4 (-1.453152027f)
#define TEP_AS_A5 1.061405429f
#define TEP_INV_SQRT2 0.70710678118654752f

/* ---- scalar paths --------------------------------------------------------------------- */

static inline float tep_gelu1(float x) {
    float z = fabsf(x) * TEP_INV_SQRT2;
    float t = 1.0f / (1.0f + TEP_AS_P * z);
    float p = TEP_AS_A5;
    p = p * t + TEP_AS_A4;
    p = p * t + TEP_AS_A3;
    p = p * t + TEP_AS_A2;
    p = p * t + TEP_AS_A1;
    p *= t;
    float h = 0.5f * x * p * tep_exp2f(-(z * z) * TEP_LOG2E);  /* 0.5 x erfc */
    return x >= 0.0f ? x - h : h;
}

static void tep_enc_bias_gelu_scalar(float *x, ptrdiff_t ld, const float *b, ptrdiff_t rows,
                                     ptrdiff_t cols) {
    for (ptrdiff_t i = 0; i < rows; i++) {
        float *r = x + i * ld;
        for (ptrdiff_t j = 0; j < cols; j++) r[j] = tep_gelu1(r[j] + b[j]);
    }
}

static void tep_enc_add_ln_scalar(float *r, ptrdiff_t ldr, const float *y, ptrdiff_t ldy,
                                  const float *b, const float *g, const float *beta,
                                  ptrdiff_t rows, ptrdiff_t d, float eps) {
    for (ptrdiff_t i = 0; i < rows; i++) {
        float *x = r + i * ldr;
        const float *yy = y ? y + i * ldy : NULL;
        double s = 0.0;
        for (ptrdiff_t j = 0; j < d; j++) {
            float v = x[j];
            if (yy) v += yy[j];
            if (b) v += b[j];
            x[j] = v;
            s += v;
        }
        float mean = (float)(s / (double)d);
        double ss = 0.0;
        for (ptrdiff_t j = 0; j < d; j++) {
            float c = x[j] - mean;
            ss += (double)c * c;
        }
        float rstd = (float)(1.0 / sqrt(ss / (double)d + (double)eps));
        for (ptrdiff_t j = 0; j < d; j++) x[j] = (x[j] - mean) * rstd * g[j] + beta[j];
    }
}

static void tep_enc_softmax_scalar(float *s, ptrdiff_t ld, ptrdiff_t rows, ptrdiff_t n) {
    for (ptrdiff_t i = 0; i < rows; i++) {
        float *r = s + i * ld;
        float m = -INFINITY;
        for (ptrdiff_t j = 0; j < n; j++) m = r[j] > m ? r[j] : m;
        float tot = 0.0f;
        for (ptrdiff_t j = 0; j < n; j++) {
            r[j] = tep_exp2f((r[j] - m) * TEP_LOG2E);
            tot += r[j];
        }
        float inv = 1.0f / tot;
        for (ptrdiff_t j = 0; j < n; j++) r[j] *= inv;
    }
}

/* ---- AVX2 + FMA paths ------------------------------------------------------------------ */
#if TEP_HAVE_AVX2_PATH

TEP_AVX2 static inline __m256 tep_gelu256(__m256 x) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 z = _mm256_mul_ps(_mm256_and_ps(x, absmask), _mm256_set1_ps(TEP_INV_SQRT2));
    __m256 one = _mm256_set1_ps(1.0f);
    __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(TEP_AS_P), z, one));
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(TEP_AS_A5), t, _mm256_set1_ps(TEP_AS_A4));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(TEP_AS_A3));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(TEP_AS_A2));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(TEP_AS_A1));
    p = _mm256_mul_ps(p, t);
    __m256 e = tep_exp2_256(_mm256_mul_ps(_mm256_mul_ps(z, z), _mm256_set1_ps(-TEP_LOG2E)));
    __m256 h = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_mul_ps(p, e));
    __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
    return _mm256_blendv_ps(_mm256_sub_ps(x, h), h, neg);
}

TEP_AVX2 static void tep_enc_bias_gelu_avx2(float *x, ptrdiff_t ld, const float *b,
                                            ptrdiff_t rows, ptrdiff_t cols) {
    for (ptrdiff_t i = 0; i < rows; i++) {
        float *r = x + i * ld;
        ptrdiff_t j = 0;
        for (; j + 8 <= cols; j += 8)
            _mm256_storeu_ps(r + j, tep_gelu256(_mm256_add_ps(_mm256_loadu_ps(r + j),
                                                              _mm256_loadu_ps(b + j))));
        for (; j < cols; j++) r[j] = tep_gelu1(r[j] + b[j]);
    }
}

TEP_AVX2 static void tep_enc_add_ln_avx2(float *r, ptrdiff_t ldr, const float *y, ptrdiff_t ldy,
                                         const float *b, const float *g, const float *beta,
                                         ptrdiff_t rows, ptrdiff_t d, float eps) {
    if (d % 8) {  /* every BERT width is a multiple of 8; keep odd ones exact and simple */
        tep_enc_add_ln_scalar(r, ldr, y, ldy, b, g, beta, rows, d, eps);
        return;
    }
    for (ptrdiff_t i = 0; i < rows; i++) {
        float *x = r + i * ldr;
        const float *yy = y ? y + i * ldy : NULL;
        __m256 acc = _mm256_setzero_ps();
        for (ptrdiff_t j = 0; j < d; j += 8) {
            __m256 v = _mm256_loadu_ps(x + j);
            if (yy) v = _mm256_add_ps(v, _mm256_loadu_ps(yy + j));
            if (b) v = _mm256_add_ps(v, _mm256_loadu_ps(b + j));
            _mm256_storeu_ps(x + j, v);
            acc = _mm256_add_ps(acc, v);
        }
        float mean = tep_hsum256(acc) / (float)d;
        __m256 vm = _mm256_set1_ps(mean);
        acc = _mm256_setzero_ps();
        for (ptrdiff_t j = 0; j < d; j += 8) {
            __m256 c = _mm256_sub_ps(_mm256_loadu_ps(x + j), vm);
            acc = _mm256_fmadd_ps(c, c, acc);
        }
        float rstd = (float)(1.0 / sqrt((double)tep_hsum256(acc) / (double)d + (double)eps));
        __m256 vr = _mm256_set1_ps(rstd);
        for (ptrdiff_t j = 0; j < d; j += 8) {
            __m256 c = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm), vr);
            _mm256_storeu_ps(x + j, _mm256_fmadd_ps(c, _mm256_loadu_ps(g + j),
                                                    _mm256_loadu_ps(beta + j)));
        }
    }
}

TEP_AVX2 static void tep_enc_softmax_avx2(float *s, ptrdiff_t ld, ptrdiff_t rows, ptrdiff_t n) {
    const __m256 l2e = _mm256_set1_ps(TEP_LOG2E);
    for (ptrdiff_t i = 0; i < rows; i++) {
        float *r = s + i * ld;
        ptrdiff_t j;
        float m = -INFINITY;
        if (n >= 8) {
            __m256 vm = _mm256_loadu_ps(r);
            for (j = 8; j + 8 <= n; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(r + j));
            m = tep_hmax256(vm);
        } else {
            j = 0;
        }
        for (; j < n; j++) m = r[j] > m ? r[j] : m;
        __m256 vmx = _mm256_set1_ps(m), acc = _mm256_setzero_ps();
        for (j = 0; j + 8 <= n; j += 8) {
            __m256 e = tep_exp2_256(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(r + j), vmx), l2e));
            _mm256_storeu_ps(r + j, e);
            acc = _mm256_add_ps(acc, e);
        }
        float tot = tep_hsum256(acc);
        for (; j < n; j++) {
            r[j] = tep_exp2f((r[j] - m) * TEP_LOG2E);
            tot += r[j];
        }
        __m256 inv = _mm256_set1_ps(1.0f / tot);
        for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(r + j, _mm256_mul_ps(_mm256_loadu_ps(r + j), inv));
        for (; j < n; j++) r[j] *= 1.0f / tot;
    }
}
#endif

/* ---- dispatch --------------------------------------------------------------------------- */
typedef void (*tep_enc_bias_gelu_fn)(float *, ptrdiff_t, const float *, ptrdiff_t, ptrdiff_t);
typedef void (*tep_enc_add_ln_fn)(float *, ptrdiff_t, const float *, ptrdiff_t, const float *,
                                  const float *, const float *, ptrdiff_t, ptrdiff_t, float);
typedef void (*tep_enc_softmax_fn)(float *, ptrdiff_t, ptrdiff_t, ptrdiff_t);

static tep_enc_bias_gelu_fn tep_enc_bias_gelu = tep_enc_bias_gelu_scalar;
static tep_enc_add_ln_fn tep_enc_add_ln = tep_enc_add_ln_scalar;
static tep_enc_softmax_fn tep_enc_softmax = tep_enc_softmax_scalar;

/* x = x + b on `rows` rows of `cols` (plain loop: gcc vectorises it). */
static void tep_enc_bias_add(float *x, ptrdiff_t ld, const float *b, ptrdiff_t rows,
                             ptrdiff_t cols) {
    for (ptrdiff_t i = 0; i < rows; i++) {
        float *r = x + i * ld;
        for (ptrdiff_t j = 0; j < cols; j++) r[j] += b[j];
    }
}

/* Activation codes of tep_enc_bias_act. */
#define TEP_ACT_GELU_ERF 0
#define TEP_ACT_GELU_TANH 1
#define TEP_ACT_RELU 2

/* x = act(x + b). Only the erf GELU (what BERT checkpoints use) has a vector path. */
static void tep_enc_bias_act(float *x, ptrdiff_t ld, const float *b, ptrdiff_t rows,
                             ptrdiff_t cols, int act) {
    if (act == TEP_ACT_GELU_ERF) {
        tep_enc_bias_gelu(x, ld, b, rows, cols);
        return;
    }
    for (ptrdiff_t i = 0; i < rows; i++) {
        float *r = x + i * ld;
        for (ptrdiff_t j = 0; j < cols; j++) {
            float v = r[j] + b[j];
            if (act == TEP_ACT_RELU) {
                r[j] = v > 0.0f ? v : 0.0f;
            } else {  /* 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3))) */
                r[j] = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
            }
        }
    }
}

/* Use AVX2 when allowed and present; returns 1 when the AVX2 paths are in use. */
static int tep_enc_rows_init(int allow_avx2) {
#if TEP_HAVE_AVX2_PATH
    __builtin_cpu_init();
    if (allow_avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        tep_enc_bias_gelu = tep_enc_bias_gelu_avx2;
        tep_enc_add_ln = tep_enc_add_ln_avx2;
        tep_enc_softmax = tep_enc_softmax_avx2;
        return 1;
    }
#endif
    (void)allow_avx2;
    tep_enc_bias_gelu = tep_enc_bias_gelu_scalar;
    tep_enc_add_ln = tep_enc_add_ln_scalar;
    tep_enc_softmax = tep_enc_softmax_scalar;
    return 0;
}

#endif
