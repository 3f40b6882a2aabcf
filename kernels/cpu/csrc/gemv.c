/* Dense batch-1 GEMV for the decode path (kernels/cpu/gemv.py): y = x · Wᵀ, one row of x, fp32 or bf16 in and out
   with fp32 accumulation. The body is gemv.h's, the one the decode step runs too, at either tier: AVX-512 (bf16 on
   the dot-product instruction where the CPU has it, widened to fp32 otherwise) or AVX2 (8 lanes, bf16 widened). */
#include <stdint.h>

#include "gemv.h"

#define STORE_F32(i, v) (y[i] = (v))
#define STORE_BF16(i, v) (y[i] = f2bf(v))

/* y (N,) = x (K,) · W (N, K)ᵀ, fp32 */
void gemv_f32(const float *W, const float *x, float *y, int N, int K, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        GEMV_BODY(float, VW, F32_LOAD, F32_MLOAD, FMA32, MASKW, STORE_F32)
    }
}

/* y (N,) = x (K,) · W (N, K)ᵀ, bf16 in and out, fp32 accumulation */
void gemv_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, int N, int K, int threads) {
    #pragma omp parallel num_threads(threads)
    {
#ifdef __AVX512BF16__
        GEMV_BODY(uint16_t, 32, _mm512_loadu_si512, _mm512_maskz_loadu_epi16, DPBF16, MASK32, STORE_BF16)
#else
        GEMV_BODY(uint16_t, VW, BF16W_LOAD, BF16W_MLOAD, FMA32, MASKW, STORE_BF16)
#endif
    }
}
