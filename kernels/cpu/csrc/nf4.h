/* The NF4 kernels (kernels/cpu/nf4.py states the format and the math): the dequantize, the fused dequantize-GEMV and
   the tile GEMM, shared by nf4.c (the per-projection entry points) and decode.c (the decode step calls them per
   projection, so both compute the same sums).

   The whole NF4 table is 16 fp32 values = one AVX-512 register, so the lookup is one vpermps per 16 weights. On
   AVX2 the table is two 8-lane registers: two vpermps and a blend on the index's bit 3 per 8 weights. Without
   either a scalar loop computes the same sums in another order. */
#pragma once
#include <stdint.h>
#ifdef __F16C__
#include <immintrin.h>
#endif

#include "gemv.h"
#include "simd.h"

/* Which kernel takes M rows of x (kernels/cpu/nf4.py reads these through nf4_config): the fused GEMV's fp32 FMAs
   grow with the rows while the weight bytes do not, so from NF4_TILE_MIN_M_* rows x goes to the tile GEMM (the
   dequantize paid once for all rows). With AVX512-BF16's dot product (32 products an instruction, twice an fp32
   FMA's) bf16 x wins there from 3 rows. fp32 x, and bf16 widened to fp32, do the GEMV's FMAs plus the dequantize,
   so the tile takes over only past the GEMV's rows. fp16 x stays on the GEMV up to NF4_GEMV_MAX_M rows. */
#define NF4_GEMV_MAX_M 4
#ifdef __AVX512BF16__
#define NF4_TILE_MIN_M_BF16 3
#else
#define NF4_TILE_MIN_M_BF16 (NF4_GEMV_MAX_M + 1)
#endif
#define NF4_TILE_MIN_M_F32 (NF4_GEMV_MAX_M + 1)
#define NF4_TILE_MAX_M 16   /* the decode step's most rows (kernels/cpu/decode.py's MAX_BATCH) */
#define NF4_TILE 16         /* weight rows the tile GEMM dequantizes at once */

/* absmax[b], or nested_code[a8[b]] * nested_absmax[b / nbs] + offset: two roundings, no FMA (-ffp-contract=off).
   A shift for the power-of-two group size: a 64-bit division per block would cost more than its 64 weights. */
static inline float nf4_scale(const void *absmax, const float *ncode, const float *nabs, float offset,
                              int dq, int nbs, int64_t b) {
    if (!dq) return ((const float *)absmax)[b];
    int64_t g = (nbs & (nbs - 1)) == 0 ? b >> __builtin_ctz(nbs) : b / nbs;
    return ncode[((const uint8_t *)absmax)[b]] * nabs[g] + offset;
}

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
/* code[q] for 8 indices q in 0..15 on AVX2: the 16-value table is two 8-lane registers, one vpermps each, and
   bit 3 of q (shifted up into the sign bit) picks between them */
static inline __m256 nf4_lookup8(__m256 lut0, __m256 lut1, __m256i q) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut0, q), _mm256_permutevar8x32_ps(lut1, q),
                            _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
}
#endif

/* out[i] as `kind` (0 fp32, 1 bf16 rounded to nearest even as torch does, 2 fp16) */
static inline void store_one(void *out, int kind, int64_t i, float v) {
    if (kind == 0) ((float *)out)[i] = v;
    else if (kind == 1) ((uint16_t *)out)[i] = f2bf(v);
#ifdef __F16C__
    else ((uint16_t *)out)[i] = _cvtss_sh(v, 0);
#endif
}

/* out[i - i0] = code[q_i] * absmax[i / bs] for flat i in [i0, i1); i0 a multiple of bs. */
static inline void nf4_dequant(const uint8_t *packed, const void *absmax, const float *code, const float *ncode,
                               const float *nabs, float offset, int dq, int bs, int nbs, int64_t i0, int64_t i1,
                               void *out, int kind) {
    for (int64_t b0 = i0, b = i0 / bs; b0 < i1; b0 += bs, b++) {
        float s = nf4_scale(absmax, ncode, nabs, offset, dq, nbs, b);
        int64_t e = b0 + bs < i1 ? b0 + bs : i1, i = b0;
#ifdef __AVX512F__
        __m512 lut = _mm512_loadu_ps(code), vs = _mm512_set1_ps(s);
        const __m512i even = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        const __m512i odd = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
        for (; i + 32 <= e; i += 32) {
            __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(packed + i / 2)));
            __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), lut), vs);
            __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(q, _mm512_set1_epi32(15)), lut), vs);
            __m512 v[2] = {_mm512_permutex2var_ps(hi, even, lo), _mm512_permutex2var_ps(hi, odd, lo)};
#ifdef __AVX512BF16__
            if (kind == 1) {  /* one instruction rounds both halves to bf16 (nearest even, as torch does) */
                _mm512_storeu_si512((uint16_t *)out + (i - i0), (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
                continue;
            }
#endif
            for (int h = 0; h < 2; h++) {
                if (kind == 2)
                    _mm256_storeu_si256((__m256i *)((uint16_t *)out + (i - i0) + 16 * h),
                                        _mm512_cvtps_ph(v[h], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                else
                    store16(out, i - i0 + 16 * h, kind, round16(v[h], kind), 0xffff);
            }
        }
#elif defined(__AVX2__) && defined(__FMA__)
        /* 16 weights a step; unpack + permute2f128 put hi/lo back in element order */
        const __m256 lut0 = _mm256_loadu_ps(code), lut1 = _mm256_loadu_ps(code + 8), vs = _mm256_set1_ps(s);
        for (; i + 16 <= e; i += 16) {
            __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(packed + i / 2)));
            __m256 hi = _mm256_mul_ps(nf4_lookup8(lut0, lut1, _mm256_srli_epi32(q, 4)), vs);
            __m256 lo = _mm256_mul_ps(nf4_lookup8(lut0, lut1, _mm256_and_si256(q, _mm256_set1_epi32(15))), vs);
            __m256 a = _mm256_unpacklo_ps(hi, lo), b = _mm256_unpackhi_ps(hi, lo);  /* h0 l0 h1 l1 | h4 l4 h5 l5 */
            __m256 v[2] = {_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31)};
            for (int h = 0; h < 2; h++) {
                if (kind == 2)
                    _mm_storeu_si128((__m128i *)((uint16_t *)out + (i - i0) + 8 * h),
                                     _mm256_cvtps_ph(v[h], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                else
                    store8(out, i - i0 + 8 * h, kind, round8(v[h], kind), 8);
            }
        }
#endif
        for (; i < e; i++) {
            uint8_t byte = packed[i / 2];
            store_one(out, kind, i - i0, code[(i & 1) ? (byte & 15) : (byte >> 4)] * s);
        }
    }
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
                __m256 hi = _mm256_mul_ps(nf4_lookup8(lut0, lut1, _mm256_srli_epi32(q, 4)), vs);
                __m256 lo = _mm256_mul_ps(nf4_lookup8(lut0, lut1, _mm256_and_si256(q, low4)), vs);
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

/* The tile GEMM, for NF4_TILE_MIN_M_* <= M <= NF4_TILE_MAX_M rows of x, fp32 (kind 0) or bf16 (kind 1): weight rows
   [n0, n1) (at most NF4_TILE) are dequantized in x's dtype into `tile` (n1 - n0 rows of K), bit-identical to the
   whole-weight dequantize torch's path runs, and the dense GEMM's micro-kernel (gemv.h's GEMM_PAIR) multiplies them
   with x while they are still in cache: the products and fp32 sums of a dense model's GEMM, without writing the
   whole dequantized weight out to memory and reading it back. x (M, K), y (M, N) fp32. */
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define NF4_HAS_TILE 1
#define NF4_TILE_STORE(i, v) (y[i] = (v))
static inline void nf4_gemm_tile(const void *xv, int kind, int B, const uint8_t *packed, const void *absmax,
                                 const float *code, const float *ncode, const float *nabs, float offset, int dq,
                                 int bs, int nbs, int64_t N, int64_t K, int64_t n0, int64_t n1, void *tile,
                                 float *y) {
    nf4_dequant(packed, absmax, code, ncode, nabs, offset, dq, bs, nbs, n0 * K, n1 * K, tile, kind);
    if (B == 1) {  /* GEMM_PAIR's sums without its padding to GEMM_XB rows of x (the batch-invariant single row) */
        for (int64_t r = 0; r < n1 - n0; r++) {
            float v;
            if (kind == 0) {
                DOT1(float, VW, F32_LOAD, F32_MLOAD, FMA32, MASKW, (const float *)tile + r * K, (const float *)xv, v)
            } else {
#ifdef __AVX512BF16__
                DOT1(uint16_t, 32, _mm512_loadu_si512, _mm512_maskz_loadu_epi16, DPBF16, MASK32,
                     (const uint16_t *)tile + r * K, (const uint16_t *)xv, v)
#else
                DOT1(uint16_t, VW, BF16W_LOAD, BF16W_MLOAD, FMA32, MASKW, (const uint16_t *)tile + r * K,
                     (const uint16_t *)xv, v)
#endif
            }
            y[n0 + r] = v;
        }
        return;
    }
    for (int64_t r = 0; r < n1 - n0; r += 2) {
        const int rows = n1 - n0 - r >= 2 ? 2 : 1;
        if (kind == 0) {
            const float *x = (const float *)xv, *w0 = (const float *)tile + r * K, *w1 = rows == 2 ? w0 + K : w0;
            const int64_t Kf = K - K % VW;
            GEMM_PAIR(float, VW, F32_LOAD, F32_MLOAD, FMA32, MASKW, NF4_TILE_STORE, n0 + r, 0)
            continue;
        }
        const uint16_t *x = (const uint16_t *)xv, *w0 = (const uint16_t *)tile + r * K;
        const uint16_t *w1 = rows == 2 ? w0 + K : w0;
#ifdef __AVX512BF16__
        const int64_t Kf = K - K % 32;
        GEMM_PAIR(uint16_t, 32, _mm512_loadu_si512, _mm512_maskz_loadu_epi16, DPBF16, MASK32, NF4_TILE_STORE,
                  n0 + r, 0)
#else
        const int64_t Kf = K - K % VW;
        GEMM_PAIR(uint16_t, VW, BF16W_LOAD, BF16W_MLOAD, FMA32, MASKW, NF4_TILE_STORE, n0 + r, 0)
#endif
    }
}
#else
#define NF4_HAS_TILE 0
#endif
