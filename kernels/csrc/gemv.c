/* Dense batch-1 GEMV for the decode path (kernels/cpu_gemv.py): y = x · Wᵀ, one row of x, fp32 or bf16 in and out
   with fp32 accumulation; gemv.h holds the body the decode step uses too. */
#include <stdint.h>

#include "gemv.h"

#define STORE_F32(i, v) (y[i] = (v))
#define STORE_BF16(i, v) (y[i] = f2bf(v))

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
int has_bf16(void) { return 1; }
#else
int has_bf16(void) { return 0; }  /* bf16 needs AVX512-BF16: torch runs it */
#endif
