/* The fused NF4 dequantize-GEMV (kernels/nf4_cpu.py states the format and the math), shared by nf4.c (the
   per-projection entry points) and decode.c (the decode step calls it per projection, so both compute the same
   sums on the same row split).

   The whole NF4 table is 16 fp32 values = one AVX-512 register, so the lookup is one vpermps per 16 weights. On
   AVX2 the table is two 8-lane registers: two vpermps and a blend on the index's bit 3 per 8 weights. Without
   either a scalar loop computes the same sums in another order. */
#pragma once
#include <stdint.h>

#include "simd.h"

/* absmax[b], or nested_code[a8[b]] * nested_absmax[b / nbs] + offset: two roundings, no FMA (-ffp-contract=off).
   A shift for the power-of-two group size: a 64-bit division per block would cost more than its 64 weights. */
static inline float nf4_scale(const void *absmax, const float *ncode, const float *nabs, float offset,
                              int dq, int nbs, int64_t b) {
    if (!dq) return ((const float *)absmax)[b];
    int64_t g = (nbs & (nbs - 1)) == 0 ? b >> __builtin_ctz(nbs) : b / nbs;
    return ncode[((const uint8_t *)absmax)[b]] * nabs[g] + offset;
}

/* y[m, n] = sum_k x[m, k] W[n, k] for rows n in [n0, n1); needs K % bs == 0 (bs a multiple of 32), M <= 8.
   xe, xo: (M, K/2) fp32 even and odd columns of x. y: (M, N) fp32. Inlined with M as a literal where it matters,
   so the accumulators live in registers. Each row of x keeps four FMA chains (hi/lo nibbles x two 16-byte halves):
   one chain would wait out the FMA latency on every 32 weights and run at half the memory speed. */
static inline __attribute__((always_inline)) void nf4_gemv_rows(
        const float *xe, const float *xo, const int M, const uint8_t *packed, const void *absmax,
        const float *code, const float *ncode, const float *nabs, float offset, int dq, int bs, int nbs,
        int64_t N, int64_t K, int64_t n0, int64_t n1, float *y) {
    int64_t K2 = K / 2;
#ifdef __AVX512F__
    const __m512 lut = _mm512_loadu_ps(code);
    const __m512i low4 = _mm512_set1_epi32(15);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = packed + n * K2;
        __m512 acc[4][8];
        for (int c = 0; c < 4; c++)
            for (int m = 0; m < M; m++) acc[c][m] = _mm512_setzero_ps();
        for (int64_t k = 0, b = n * (K / bs); k < K; k += bs, b++) {
            __m512 vs = _mm512_set1_ps(nf4_scale(absmax, ncode, nabs, offset, dq, nbs, b));
            for (int64_t j = k / 2; j < (k + bs) / 2; j += 16) {
                int c = (int)(j >> 4) & 1;  /* alternate 16-byte halves between two pairs of chains */
                __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + j)));
                __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), lut), vs);
                __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(q, low4), lut), vs);
                for (int m = 0; m < M; m++) {
                    acc[2 * c][m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xe + m * K2 + j), acc[2 * c][m]);
                    acc[2 * c + 1][m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xo + m * K2 + j), acc[2 * c + 1][m]);
                }
            }
        }
        for (int m = 0; m < M; m++)
            y[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0][m], acc[1][m]),
                                                              _mm512_add_ps(acc[2][m], acc[3][m])));
    }
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 lut0 = _mm256_loadu_ps(code), lut1 = _mm256_loadu_ps(code + 8);
    const __m256i low4 = _mm256_set1_epi32(15);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = packed + n * K2;
        __m256 acc[4][8];
        for (int c = 0; c < 4; c++)
            for (int m = 0; m < M; m++) acc[c][m] = _mm256_setzero_ps();
        for (int64_t k = 0, b = n * (K / bs); k < K; k += bs, b++) {
            __m256 vs = _mm256_set1_ps(nf4_scale(absmax, ncode, nabs, offset, dq, nbs, b));
            for (int64_t j = k / 2; j < (k + bs) / 2; j += 8) {
                int c = (int)(j >> 3) & 1;  /* alternate 8-byte halves between two pairs of chains */
                __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + j)));
                __m256i qh = _mm256_srli_epi32(q, 4), ql = _mm256_and_si256(q, low4);
                __m256 hi = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut0, qh), _mm256_permutevar8x32_ps(lut1, qh),
                                             _mm256_castsi256_ps(_mm256_slli_epi32(qh, 28)));
                __m256 lo = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut0, ql), _mm256_permutevar8x32_ps(lut1, ql),
                                             _mm256_castsi256_ps(_mm256_slli_epi32(ql, 28)));
                hi = _mm256_mul_ps(hi, vs);
                lo = _mm256_mul_ps(lo, vs);
                for (int m = 0; m < M; m++) {
                    acc[2 * c][m] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xe + m * K2 + j), acc[2 * c][m]);
                    acc[2 * c + 1][m] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xo + m * K2 + j), acc[2 * c + 1][m]);
                }
            }
        }
        for (int m = 0; m < M; m++)
            y[m * N + n] = hsum8(_mm256_add_ps(_mm256_add_ps(acc[0][m], acc[1][m]), _mm256_add_ps(acc[2][m], acc[3][m])));
    }
#else
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = packed + n * K2;
        float acc[8] = {0};
        for (int64_t k = 0, b = n * (K / bs); k < K; k += bs, b++) {
            float s = nf4_scale(absmax, ncode, nabs, offset, dq, nbs, b);
            for (int64_t j = k / 2; j < (k + bs) / 2; j++) {
                float hi = code[row[j] >> 4] * s, lo = code[row[j] & 15] * s;
                for (int m = 0; m < M; m++) acc[m] += hi * xe[m * K2 + j] + lo * xo[m * K2 + j];
            }
        }
        for (int m = 0; m < M; m++) y[m * N + n] = acc[m];
    }
#endif
}

/* batch 1 (decode, the case that matters) specialised */
static inline void nf4_gemv(const float *xe, const float *xo, int M, const uint8_t *packed, const void *absmax,
                            const float *code, const float *ncode, const float *nabs, float offset, int dq, int bs,
                            int nbs, int64_t N, int64_t K, int64_t n0, int64_t n1, float *y) {
    if (M == 1)
        nf4_gemv_rows(xe, xo, 1, packed, absmax, code, ncode, nabs, offset, dq, bs, nbs, N, K, n0, n1, y);
    else
        nf4_gemv_rows(xe, xo, M, packed, absmax, code, ncode, nabs, offset, dq, bs, nbs, N, K, n0, n1, y);
}
