/* NF4 on the CPU (kernels/cpu/nf4.py): nf4.h's fused dequantize-GEMV and tile GEMM over all output rows, and the
   dequantize into an fp32/bf16/fp16 buffer, bit-identical to bitsandbytes (kernels/nf4.py's reference). */
#include <stdint.h>

#include "nf4.h"

/* 1 if fp16 output is supported (F16C, or AVX-512 which implies it), else the caller falls back to torch */
int nf4_has_fp16(void) {
#ifdef __F16C__
    return 1;
#else
    return 0;
#endif
}

/* The entry points: [0, total) in one chunk per thread (chunk c_ of at most `threads`), chunk edges multiples of
   `align` (16 output rows for the GEMV and the tile GEMM, a block for the dequantize), one OpenMP region (torch's
   pool) instead of a fork/join in Python. */
#define SPLIT(total, align, threads, BODY)                                                                  \
    do {                                                                                                  \
        int64_t step_ = ((total) + (threads) - 1) / (threads);                                            \
        step_ = (step_ + (align) - 1) / (align) * (align);                                                \
        if (step_ < (align)) step_ = (align);                                                             \
        const int nchunks_ = (int)(((total) + step_ - 1) / step_);                                        \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                 \
        for (int c_ = 0; c_ < nchunks_; c_++) {                                                           \
            const int64_t lo_ = c_ * step_, hi_ = lo_ + step_ < (total) ? lo_ + step_ : (total);          \
            BODY;                                                                                         \
        }                                                                                                 \
    } while (0)

/* y (M, N) fp32 = x · Wᵀ from xe, xo (M, K/2): x's even and odd columns in fp32 */
void nf4_gemv_all(const float *xe, const float *xo, int M, const uint8_t *packed, const void *absmax,
                  const float *code, const float *ncode, const float *nabs, float offset, int dq, int bs, int nbs,
                  int64_t N, int64_t K, float *y, int threads) {
    SPLIT(N, 16, threads, nf4_gemv(xe, xo, M, packed, absmax, code, ncode, nabs, offset, dq, bs, nbs, N, K,
                                   lo_, hi_, y));
}

/* out (total elements, row-major like W) = dequantize(W) as `kind` */
void nf4_dequant_all(const uint8_t *packed, const void *absmax, const float *code, const float *ncode,
                     const float *nabs, float offset, int dq, int bs, int nbs, int64_t total, void *out, int kind,
                     int threads) {
    SPLIT(total, bs, threads, nf4_dequant(packed, absmax, code, ncode, nabs, offset, dq, bs, nbs, lo_, hi_,
                                          (char *)out + lo_ * (kind ? 2 : 4), kind));
}

/* For kernels/cpu/nf4.py: whether this tier has the tile GEMM (without it the caller dequantizes the whole weight
   and runs torch's GEMM), and nf4.h's row limits at this tier */
void nf4_config(int *out) {
    out[0] = NF4_HAS_TILE, out[1] = NF4_GEMV_MAX_M, out[2] = NF4_TILE_MIN_M_BF16, out[3] = NF4_TILE_MIN_M_F32;
    out[4] = NF4_TILE_MAX_M, out[5] = NF4_TILE;
}

/* y (M, N) fp32 = x · Wᵀ for x (M, K) fp32 (kind 0) or bf16 (kind 1), M <= NF4_TILE_MAX_M, through nf4_gemm_tile;
   tiles: threads x NF4_TILE x K of scratch in x's dtype, one tile a thread */
void nf4_gemm_all(const void *x, int kind, int M, const uint8_t *packed, const void *absmax, const float *code,
                  const float *ncode, const float *nabs, float offset, int dq, int bs, int nbs, int64_t N, int64_t K,
                  void *tiles, float *y, int threads) {
#if NF4_HAS_TILE
    SPLIT(N, NF4_TILE, threads, for (int64_t n0 = lo_; n0 < hi_; n0 += NF4_TILE)
              nf4_gemm_tile(x, kind, M, packed, absmax, code, ncode, nabs, offset, dq, bs, nbs, N, K, n0,
                            n0 + NF4_TILE < hi_ ? n0 + NF4_TILE : hi_,
                            (char *)tiles + c_ * NF4_TILE * K * (kind ? 2 : 4), y));
#else
    (void)x, (void)kind, (void)M, (void)packed, (void)absmax, (void)code, (void)ncode, (void)nabs, (void)offset;
    (void)dq, (void)bs, (void)nbs, (void)N, (void)K, (void)tiles, (void)y, (void)threads;
#endif
}
