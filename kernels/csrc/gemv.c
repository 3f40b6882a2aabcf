/* Dense batch-1 GEMV for the decode path (kernels/cpu_gemv.py): y = x · Wᵀ, one row of x, fp32 or bf16 in and out
   with fp32 accumulation; gemv.h holds the AVX-512 body the decode step uses too (bf16 on the dot-product
   instruction where the CPU has it, widened to fp32 otherwise). The AVX2 tier below is the same loop on 8 lanes,
   bf16 widened. */
#include <stdint.h>

#define STORE_F32(i, v) (y[i] = (v))
#define STORE_BF16(i, v) (y[i] = f2bf(v))

#ifdef __AVX512F__
#include "gemv.h"

/* y (N,) = x (K,) · W (N, K)ᵀ, fp32 */
void gemv_f32(const float *W, const float *x, float *y, int N, int K, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        GEMV_BODY(float, 16, _mm512_loadu_ps, _mm512_maskz_loadu_ps, FMA32, MASK16, STORE_F32)
    }
}

#ifdef __AVX512BF16__
/* y (N,) = x (K,) · W (N, K)ᵀ, bf16 in and out, fp32 accumulation */
void gemv_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, int N, int K, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        GEMV_BODY(uint16_t, 32, _mm512_loadu_si512, _mm512_maskz_loadu_epi16, DPBF16, MASK32, STORE_BF16)
    }
}
#else
void gemv_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, int N, int K, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        GEMV_BODY(uint16_t, 16, BF16W_LOAD, BF16W_MLOAD, FMA32, MASK16, STORE_BF16)
    }
}
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#include "simd.h"

/* four weight rows against one x, four named accumulators (registers, no FMA latency chain); the K % 8 tail
   goes through load8's buffer, the N % 4 rows one at a time */
#define GEMV8(BF, STORE)                                                                                   \
    const int N4 = N - N % 4, Kf = K - K % 8;                                                              \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                      \
    for (int n0 = 0; n0 < N4; n0 += 4) {                                                                   \
        const int64_t o0 = (int64_t)n0 * K, o1 = o0 + K, o2 = o1 + K, o3 = o2 + K;                        \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                        \
        for (int k = 0; k < K; k += 8) {                                                                   \
            const int n = k < Kf ? 8 : K - k;                                                              \
            __m256 xv = load8(x, k, BF, n);                                                                \
            a0 = _mm256_fmadd_ps(load8(W, o0 + k, BF, n), xv, a0);                                         \
            a1 = _mm256_fmadd_ps(load8(W, o1 + k, BF, n), xv, a1);                                         \
            a2 = _mm256_fmadd_ps(load8(W, o2 + k, BF, n), xv, a2);                                         \
            a3 = _mm256_fmadd_ps(load8(W, o3 + k, BF, n), xv, a3);                                         \
        }                                                                                                  \
        STORE(n0, hsum8(a0)); STORE(n0 + 1, hsum8(a1)); STORE(n0 + 2, hsum8(a2)); STORE(n0 + 3, hsum8(a3)); \
    }                                                                                                      \
    for (int n = N4; n < N; n++) {                                                                         \
        __m256 a = _mm256_setzero_ps();                                                                    \
        for (int k = 0; k < K; k += 8)                                                                     \
            a = _mm256_fmadd_ps(load8(W, (int64_t)n * K + k, BF, K - k), load8(x, k, BF, K - k), a);       \
        STORE(n, hsum8(a));                                                                                \
    }

void gemv_f32(const float *W, const float *x, float *y, int N, int K, int threads) { GEMV8(0, STORE_F32) }
void gemv_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, int N, int K, int threads) { GEMV8(1, STORE_BF16) }
#endif
