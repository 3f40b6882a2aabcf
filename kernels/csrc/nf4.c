/* NF4 on the CPU (kernels/nf4_cpu.py): the fused dequantize-GEMV of nf4.h over all output rows, and the
   dequantize into an fp32/bf16/fp16 buffer, bit-identical to bitsandbytes (kernels/nf4.py's reference). */
#include <stdint.h>
#ifdef __F16C__
#include <immintrin.h>
#endif

#include "nf4.h"

/* out[i] as `kind` (0 fp32, 1 bf16 rounded to nearest even as torch does, 2 fp16) */
static inline void store_one(void *out, int kind, int64_t i, float v) {
    if (kind == 0) ((float *)out)[i] = v;
    else if (kind == 1) ((uint16_t *)out)[i] = f2bf(v);
#ifdef __F16C__
    else ((uint16_t *)out)[i] = _cvtss_sh(v, 0);
#endif
}

/* 1 if fp16 output is supported (F16C, or AVX-512 which implies it), else the caller falls back to torch */
int nf4_has_fp16(void) {
#ifdef __F16C__
    return 1;
#else
    return 0;
#endif
}

/* out[i] = code[q_i] * absmax[i / bs] for flat i in [i0, i1); i0 a multiple of bs. */
static void nf4_dequant(const uint8_t *packed, const void *absmax, const float *code, const float *ncode,
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
                _mm512_storeu_si512((uint16_t *)out + i, (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
                continue;
            }
#endif
            for (int h = 0; h < 2; h++) {
                if (kind == 2)
                    _mm256_storeu_si256((__m256i *)((uint16_t *)out + i + 16 * h),
                                        _mm512_cvtps_ph(v[h], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                else
                    store16(out, i + 16 * h, kind, round16(v[h], kind), 0xffff);
            }
        }
#endif
        for (; i < e; i++) {
            uint8_t byte = packed[i / 2];
            store_one(out, kind, i, code[(i & 1) ? (byte & 15) : (byte >> 4)] * s);
        }
    }
}

/* The two entry points: [0, total) in one chunk per thread, chunk edges multiples of `align` (16 output rows for
   the GEMV, a block for the dequantize), one OpenMP region (torch's pool) instead of a fork/join in Python. */
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
    SPLIT(total, bs, threads, nf4_dequant(packed, absmax, code, ncode, nabs, offset, dq, bs, nbs, lo_, hi_, out,
                                          kind));
}
