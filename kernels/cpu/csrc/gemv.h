/* The one dense GEMV/GEMM body, y = x · Wᵀ with W (N, K) row-major, used by gemv.c (cpu_gemv.py's batch-1 GEMV)
   and decode.c (every projection of the decode step). Both run inside an OpenMP parallel region and end with the
   barrier of `omp for`.

   The bodies are macros over one dtype description, expanded in a function that names W, x, y, N, K (and B for
   GEMM): T the weight element type, STEP the lanes one FMA consumes, LOAD / MLOAD(mask, p) a full / masked vector
   load, FMA(acc, w, x) the fp32-accumulating multiply-add, MASK(n) the tail mask, STORE(i, v) writes the fp32 sum
   v of output i (rounding it as the caller's dtype needs). Accumulators are the tier's vfloat (simd.h).
     AVX-512, fp32: 16 lanes, _mm512_fmadd_ps.  bf16: 32 lanes, _mm512_dpbf16_ps (32 bf16 pairs multiplied exactly
     and added into 16 fp32 lanes; AVX512-BF16), or without it 16 lanes widened to fp32 (BF16W_*).
     AVX2: 8 lanes, bf16 always widened; a "mask" is a lane count and a masked load goes through load8's buffer
     (only the tails do). F32_LOAD / F32_MLOAD, BF16W_*, FMA32 and MASKW name the tier's form, so a caller writes
     the fp32 and widened-bf16 bodies once for both tiers. */
#pragma once
#include <stdint.h>

#include "simd.h"

#ifdef __AVX512F__
#define FMA32(a, w, x) _mm512_fmadd_ps(w, x, a)
#ifdef __AVX512BF16__
#define DPBF16(a, w, x) _mm512_dpbf16_ps(a, (__m512bh)(w), (__m512bh)(x))
#endif
/* bf16 without the dot-product instruction: 16 bf16 widened exactly to fp32 lanes, then FMA32 (the products of
   two bf16 values are exact in fp32 either way; only the summation order differs) */
#define BF16W_LOAD(p) _mm512_castsi512_ps(_mm512_slli_epi32(                                               \
    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define BF16W_MLOAD(mk, p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(                      \
    _mm256_maskz_loadu_epi16(mk, p)), 16))
#define F32_LOAD _mm512_loadu_ps
#define F32_MLOAD _mm512_maskz_loadu_ps
#define MASKW MASK16
#define GEMM_XB 8                   /* rows of x per GEMM block: 2 x 8 accumulators of the 32 registers */
#elif defined(__AVX2__) && defined(__FMA__)
#define FMA32(a, w, x) _mm256_fmadd_ps(w, x, a)
#define BF16W_LOAD(p) _mm256_castsi256_ps(_mm256_slli_epi32(                                               \
    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define BF16W_MLOAD(n, p) load8(p, 0, 1, n)
#define F32_LOAD _mm256_loadu_ps
#define F32_MLOAD(n, p) load8(p, 0, 0, n)
#define MASKW(n) ((n) < 8 ? (n) : 8)
#define GEMM_XB 4                   /* 2 x 4 accumulators: 2 x 8 would spill out of the 16 registers */
#endif

/* GEMV, one row of x: the weight rows split over the threads in contiguous blocks, each row read start to end, so
   every thread reads its block of W as one sequential stream, the pattern the hardware prefetcher follows best
   (several rows interleaved, one load of x feeding several rows, are several streams at once, which it follows
   worse). x stays in L1. Two accumulators per row break the FMA latency chain; the K % (2 * STEP)
   tail goes through masked loads after the hot loop (MASK(n) of n >= STEP is a full mask). */
#define GEMV_BODY(T, STEP, LOAD, MLOAD, FMA, MASK, STORE)                                                 \
    const int K2 = K - K % (2 * STEP);                                                                     \
    _Pragma("omp for schedule(static)")                                                                    \
    for (int n = 0; n < N; n++) {                                                                         \
        const T *w = W + (int64_t)n * K;                                                                   \
        vfloat a0 = vzero(), a1 = a0;                                                                      \
        int k = 0;                                                                                         \
        for (; k < K2; k += 2 * STEP) {                                                                    \
            a0 = FMA(a0, LOAD(w + k), LOAD(x + k));                                                       \
            a1 = FMA(a1, LOAD(w + k + STEP), LOAD(x + k + STEP));                                         \
        }                                                                                                  \
        for (; k < K; k += STEP)                                                                           \
            a0 = FMA(a0, MLOAD(MASK(K - k), w + k), MLOAD(MASK(K - k), x + k));                            \
        STORE(n, vsum(vadd(a0, a1)));                                                                      \
    }

/* One output of the GEMM's sums for one row of x: weight row w against x, one FMA chain over k in STEP steps and
   one masked tail, then vsum: exactly what GEMM_ROW / GEMM_PAIR compute for each (row of x, weight row), so a
   batch-invariant step (decode.c) takes it for a single row without the GEMM's padding to GEMM_XB rows. The
   caller names K; `out` gets the fp32 sum. */
#define DOT1(T, STEP, LOAD, MLOAD, FMA, MASK, w, x, out)                                                   \
    {                                                                                                      \
        const int Kf1 = K - K % STEP;                                                                      \
        vfloat a0 = vzero();                                                                               \
        for (int k = 0; k < Kf1; k += STEP) a0 = FMA(a0, LOAD((w) + k), LOAD((x) + k));                    \
        if (Kf1 < K) a0 = FMA(a0, MLOAD(MASK(K - Kf1), (w) + Kf1), MLOAD(MASK(K - Kf1), (x) + Kf1));       \
        out = vsum(a0);                                                                                    \
    }

/* GEMV1: the one-row GEMV with the GEMM's sums (DOT1 per weight row), weight rows split over the threads. */
#define GEMV1_BODY(T, STEP, LOAD, MLOAD, FMA, MASK, STORE)                                                \
    _Pragma("omp for schedule(static)")                                                                    \
    for (int n = 0; n < N; n++) {                                                                         \
        float v;                                                                                           \
        DOT1(T, STEP, LOAD, MLOAD, FMA, MASK, W + (int64_t)n * K, x, v)                                    \
        STORE(n, v);                                                                                       \
    }

/* GEMM for B > 1 rows of x (row stride K) into y (B, N), streaming the weights once instead of B times. Up to
   GEMM_XB rows (one block of x) the step is still bound by reading the weights: one weight row at a time, as the
   GEMV does (one sequential stream per thread), each weight load feeding the block's GEMM_XB accumulators. More rows
   make it bound by the FMAs: two weight rows at a time (2 x GEMM_XB accumulators, all in registers), so each load
   of x feeds two. A block always computes GEMM_XB rows (missing ones re-read row b0 and are dropped): a fixed trip
   count is what keeps the accumulators in registers. STORE(i, v) gets the flat index b * N + n.
   Between two weight loads sit GEMM_XB (or 2 x GEMM_XB) multiply-adds, so a thread asks for the next cache line of
   its stream far less often than the GEMV does and the hardware prefetcher falls behind: the weights come from
   memory at a fraction of the GEMV's rate. Each micro-kernel therefore prefetches its weight rows GEMM_PF bytes
   ahead (on the first block of x; a later block re-reads lines already in L1). */
#define GEMM_PF 2048
#define GEMM_BODY(T, STEP, LOAD, MLOAD, FMA, MASK, STORE)                                                 \
    const int Kf = K - K % STEP;                                                                           \
    if (B <= GEMM_XB) {                                                                                    \
        _Pragma("omp for schedule(static)")                                                                \
        for (int n = 0; n < N; n++) {                                                                     \
            const T *w0 = W + (int64_t)n * K;                                                              \
            GEMM_ROW(T, STEP, LOAD, MLOAD, FMA, MASK, STORE, n, GEMM_PF)                                   \
        }                                                                                                  \
    } else {                                                                                               \
        const int N2 = N - N % 2;                                                                          \
        _Pragma("omp for schedule(static)")                                                                \
        for (int n0 = 0; n0 < N; n0 += 2) {                                                               \
            const int rows = n0 < N2 ? 2 : 1;                                                              \
            const T *w0 = W + (int64_t)n0 * K, *w1 = rows == 2 ? w0 + K : w0;                             \
            GEMM_PAIR(T, STEP, LOAD, MLOAD, FMA, MASK, STORE, n0, GEMM_PF)                                 \
        }                                                                                                  \
    }

/* GEMM_BODY's micro-kernel for up to GEMM_XB rows of x: weight row w0, of K values, against every row of x, into
   y's column n, prefetching the weight row PF bytes ahead (0: no prefetch). The caller names w0, Kf = K - K % STEP,
   x, B, N, K. */
#define GEMM_ROW(T, STEP, LOAD, MLOAD, FMA, MASK, STORE, n, PF)                                            \
        for (int b0 = 0; b0 < B; b0 += GEMM_XB) {                                                          \
            const int nb = B - b0 < GEMM_XB ? B - b0 : GEMM_XB;                                            \
            const T *xs[GEMM_XB];                                                                          \
            for (int b = 0; b < GEMM_XB; b++) xs[b] = x + (int64_t)(b0 + (b < nb ? b : 0)) * K;            \
            vfloat a0[GEMM_XB];                                                                            \
            for (int b = 0; b < GEMM_XB; b++) a0[b] = vzero();                                             \
            for (int k = 0; k < Kf; k += STEP) {                                                           \
                if (PF) _mm_prefetch((const char *)(w0 + k) + PF, _MM_HINT_T0);                            \
                __typeof__(LOAD(w0)) wv0 = LOAD(w0 + k);                                                   \
                _Pragma("GCC unroll 8")                                                                    \
                for (int b = 0; b < GEMM_XB; b++) a0[b] = FMA(a0[b], wv0, LOAD(xs[b] + k));                \
            }                                                                                              \
            if (Kf < K) {                                                                                  \
                __typeof__(LOAD(w0)) wv0 = MLOAD(MASK(K - Kf), w0 + Kf);                                   \
                _Pragma("GCC unroll 8")                                                                    \
                for (int b = 0; b < GEMM_XB; b++)                                                          \
                    a0[b] = FMA(a0[b], wv0, MLOAD(MASK(K - Kf), xs[b] + Kf));                              \
            }                                                                                              \
            for (int b = 0; b < nb; b++) STORE((int64_t)(b0 + b) * N + (n), vsum(a0[b]));                 \
        }

/* GEMM_BODY's micro-kernel: weight rows w0 and w1 (`rows` of them; w1 == w0 when 1), of K values each, against
   every row of x, into y's columns n and n + 1, prefetching PF bytes ahead as GEMM_ROW. The caller names w0, w1,
   rows, Kf = K - K % STEP, x, B, N, K: the NF4 tile GEMM (nf4.h) runs it, without prefetch, over weight rows it has
   just dequantized into a buffer that is still in cache. */
#define GEMM_PAIR(T, STEP, LOAD, MLOAD, FMA, MASK, STORE, n, PF)                                           \
        for (int b0 = 0; b0 < B; b0 += GEMM_XB) {                                                          \
            const int nb = B - b0 < GEMM_XB ? B - b0 : GEMM_XB;                                            \
            const T *xs[GEMM_XB];                                                                          \
            for (int b = 0; b < GEMM_XB; b++) xs[b] = x + (int64_t)(b0 + (b < nb ? b : 0)) * K;            \
            vfloat a0[GEMM_XB], a1[GEMM_XB];                                                               \
            for (int b = 0; b < GEMM_XB; b++) a0[b] = a1[b] = vzero();                                     \
            for (int k = 0; k < Kf; k += STEP) {                                                           \
                if (PF && b0 == 0) {                                                                       \
                    _mm_prefetch((const char *)(w0 + k) + PF, _MM_HINT_T0);                                \
                    _mm_prefetch((const char *)(w1 + k) + PF, _MM_HINT_T0);                                \
                }                                                                                          \
                __typeof__(LOAD(w0)) wv0 = LOAD(w0 + k), wv1 = LOAD(w1 + k);                               \
                _Pragma("GCC unroll 8")                                                                    \
                for (int b = 0; b < GEMM_XB; b++) {                                                        \
                    __typeof__(wv0) xv = LOAD(xs[b] + k);                                                  \
                    a0[b] = FMA(a0[b], wv0, xv); a1[b] = FMA(a1[b], wv1, xv);                              \
                }                                                                                          \
            }                                                                                              \
            if (Kf < K) {                                                                                  \
                __typeof__(LOAD(w0)) wv0 = MLOAD(MASK(K - Kf), w0 + Kf), wv1 = MLOAD(MASK(K - Kf), w1 + Kf); \
                _Pragma("GCC unroll 8")                                                                    \
                for (int b = 0; b < GEMM_XB; b++) {                                                        \
                    __typeof__(wv0) xv = MLOAD(MASK(K - Kf), xs[b] + Kf);                                  \
                    a0[b] = FMA(a0[b], wv0, xv); a1[b] = FMA(a1[b], wv1, xv);                              \
                }                                                                                          \
            }                                                                                              \
            for (int b = 0; b < nb; b++) {                                                                 \
                STORE((int64_t)(b0 + b) * N + (n), vsum(a0[b]));                                           \
                if (rows == 2) STORE((int64_t)(b0 + b) * N + (n) + 1, vsum(a1[b]));                        \
            }                                                                                              \
        }
