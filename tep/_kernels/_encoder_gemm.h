/* Few-row matrix product against a weight matrix packed once, for the BERT encoder.
 *
 * Why: with a handful of tokens (one short sentence), a BLAS sgemm call spends most of
 * its time re-packing the weight matrix, which it does on every call — measured with perf
 * on all-MiniLM at 24 tokens: 64% of the encoder's time in OpenBLAS's packing routine,
 * 21% in its compute kernel. Packing the weights once, at load, and streaming the packed
 * panels through a register-blocked kernel removes that copy. Large batches still go to
 * BLAS, whose cache blocking wins once the packing is amortised over many rows.
 *
 * Packed layout (tep_pack_panels): W row-major [K, N] -> panels of TEP_PANEL columns,
 * panel p = W[:, 32p : 32p + 32] stored k-major ([K][32]), the last one zero-padded.
 *
 * Kernel: C[M, N] (row-major, ldc) = A[M, K] (row-major, lda) @ W for panels [p0, p1).
 * Blocks of up to 12 rows x 32 columns live in 24 AVX-512 registers across the K loop.
 * Only an AVX-512F path exists; tep_gemm_small_ok() says whether it can be used (the
 * caller falls back to BLAS otherwise).
 */
#ifndef TEP_ENCODER_GEMM_H
#define TEP_ENCODER_GEMM_H

#include <stddef.h>
#include <string.h>

#define TEP_PANEL 32

/* Pack W [K, N] (row-major) into out [ceil(N / 32)][K][32]. */
static void tep_pack_panels(const float *w, ptrdiff_t k, ptrdiff_t n, float *out) {
    ptrdiff_t n_panels = (n + TEP_PANEL - 1) / TEP_PANEL;
    for (ptrdiff_t p = 0; p < n_panels; p++) {
        ptrdiff_t c0 = p * TEP_PANEL, cols = n - c0 < TEP_PANEL ? n - c0 : TEP_PANEL;
        float *dst = out + p * k * TEP_PANEL;
        for (ptrdiff_t kk = 0; kk < k; kk++) {
            memcpy(dst + kk * TEP_PANEL, w + kk * n + c0, (size_t)cols * sizeof(float));
            for (ptrdiff_t j = cols; j < TEP_PANEL; j++) dst[kk * TEP_PANEL + j] = 0.0f;
        }
    }
}

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TEP_HAVE_AVX512_PATH 1
#define TEP_AVX512 __attribute__((target("avx512f,fma")))
#ifndef TEP_PF
#define TEP_PF (TEP_PANEL * 16)  /* prefetch distance in floats: 16 k-rows (2 KiB) ahead */
#endif

/* R rows (R a compile-time constant after inlining) x one 32-column panel. */
#define TEP_MK_BODY(R)                                                                      \
    do {                                                                                    \
        __m512 c0[R], c1[R];                                                                \
        for (int r = 0; r < R; r++) { c0[r] = _mm512_setzero_ps(); c1[r] = _mm512_setzero_ps(); } \
        const float *pk = panel;                                                            \
        for (ptrdiff_t kk = 0; kk < k; kk++, pk += TEP_PANEL) {                             \
            _mm_prefetch((const char *)(pk + TEP_PF), _MM_HINT_T0);                          \
            _mm_prefetch((const char *)(pk + TEP_PF + 16), _MM_HINT_T0);                     \
            __m512 b0 = _mm512_loadu_ps(pk), b1 = _mm512_loadu_ps(pk + 16);                 \
            for (int r = 0; r < R; r++) {                                                   \
                __m512 av = _mm512_set1_ps(a[r * lda + kk]);                                \
                c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);                                     \
                c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);                                     \
            }                                                                               \
        }                                                                                   \
        for (int r = 0; r < R; r++) {                                                       \
            _mm512_mask_storeu_ps(c + r * ldc, m0, c0[r]);                                  \
            _mm512_mask_storeu_ps(c + r * ldc + 16, m1, c1[r]);                             \
        }                                                                                   \
    } while (0)

TEP_AVX512 static void tep_mk12(const float *a, ptrdiff_t lda, ptrdiff_t k, const float *panel,
                                float *c, ptrdiff_t ldc, __mmask16 m0, __mmask16 m1) {
    TEP_MK_BODY(12);
}
TEP_AVX512 static void tep_mk6(const float *a, ptrdiff_t lda, ptrdiff_t k, const float *panel,
                               float *c, ptrdiff_t ldc, __mmask16 m0, __mmask16 m1) {
    TEP_MK_BODY(6);
}
TEP_AVX512 static void tep_mk4(const float *a, ptrdiff_t lda, ptrdiff_t k, const float *panel,
                               float *c, ptrdiff_t ldc, __mmask16 m0, __mmask16 m1) {
    TEP_MK_BODY(4);
}
TEP_AVX512 static void tep_mk2(const float *a, ptrdiff_t lda, ptrdiff_t k, const float *panel,
                               float *c, ptrdiff_t ldc, __mmask16 m0, __mmask16 m1) {
    TEP_MK_BODY(2);
}
TEP_AVX512 static void tep_mk1(const float *a, ptrdiff_t lda, ptrdiff_t k, const float *panel,
                               float *c, ptrdiff_t ldc, __mmask16 m0, __mmask16 m1) {
    TEP_MK_BODY(1);
}

TEP_AVX512 static void tep_gemm_small(const float *a, ptrdiff_t lda, ptrdiff_t m, ptrdiff_t k,
                                      const float *packed, ptrdiff_t n, float *c, ptrdiff_t ldc,
                                      ptrdiff_t p0, ptrdiff_t p1) {
    for (ptrdiff_t p = p0; p < p1; p++) {
        ptrdiff_t col = p * TEP_PANEL, cols = n - col < TEP_PANEL ? n - col : TEP_PANEL;
        __mmask16 m0 = cols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cols) - 1u);
        __mmask16 m1 = cols >= 32 ? (__mmask16)0xFFFF
                     : cols > 16 ? (__mmask16)((1u << (cols - 16)) - 1u) : (__mmask16)0;
        const float *panel = packed + p * k * TEP_PANEL;
        ptrdiff_t r = 0;
        for (; r + 12 <= m; r += 12) tep_mk12(a + r * lda, lda, k, panel, c + r * ldc + col, ldc, m0, m1);
        for (; r + 6 <= m; r += 6) tep_mk6(a + r * lda, lda, k, panel, c + r * ldc + col, ldc, m0, m1);
        for (; r + 4 <= m; r += 4) tep_mk4(a + r * lda, lda, k, panel, c + r * ldc + col, ldc, m0, m1);
        for (; r + 2 <= m; r += 2) tep_mk2(a + r * lda, lda, k, panel, c + r * ldc + col, ldc, m0, m1);
        for (; r < m; r++) tep_mk1(a + r * lda, lda, k, panel, c + r * ldc + col, ldc, m0, m1);
    }
}

static int tep_gemm_small_ok(int allow) {
    __builtin_cpu_init();
    return allow && __builtin_cpu_supports("avx512f") ? 1 : 0;
}
#else
#define TEP_HAVE_AVX512_PATH 0
static void tep_gemm_small(const float *a, ptrdiff_t lda, ptrdiff_t m, ptrdiff_t k,
                           const float *packed, ptrdiff_t n, float *c, ptrdiff_t ldc,
                           ptrdiff_t p0, ptrdiff_t p1) {
    (void)a; (void)lda; (void)m; (void)k; (void)packed; (void)n; (void)c; (void)ldc;
    (void)p0; (void)p1;
}
static int tep_gemm_small_ok(int allow) { (void)allow; return 0; }
#endif

#endif
