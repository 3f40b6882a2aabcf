/* RMSNorm, SwiGLU and RoPE for CPU inference, each one pass over the activation (kernels/cpu_ops.py states the math
   and holds the torch references). R() = round16 / round8: the activation dtype's rounding, at the places torch
   rounds. Rows split over the OpenMP threads. Two tiers (simd.h): 16 lanes on AVX-512, 8 on AVX2. */
#include <math.h>
#include <stdint.h>

#include "simd.h"

#ifdef __AVX512F__
/* x, y (T, C) rows contiguous; w (C,) */
void rms_norm(const void *x, const void *w, void *y, int64_t T, int C, float eps, int bf, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        __m512 ss = _mm512_setzero_ps();
        for (int c = 0; c < C; c += 16) {
            __m512 v = load16(x, t * C + c, bf, MASK16(C - c));
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        __m512 r = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(ss) / C + eps));
        for (int c = 0; c < C; c += 16) {
            __mmask16 mk = MASK16(C - c);
            __m512 h = round16(_mm512_mul_ps(load16(x, t * C + c, bf, mk), r), bf);
            store16(y, t * C + c, bf, round16(_mm512_mul_ps(load16(w, c, bf, mk), h), bf), mk);
        }
    }
}

/* gu (T, 2I) rows contiguous: gate = gu[:, :I], up = gu[:, I:]; y (T, I) */
void swiglu(const void *gu, void *y, int64_t T, int I, int bf, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        for (int i = 0; i < I; i += 16) {
            __mmask16 mk = MASK16(I - i);
            __m512 g = load16(gu, t * 2 * I + i, bf, mk), u = load16(gu, t * 2 * I + I + i, bf, mk);
            store16(y, t * I + i, bf, round16(_mm512_mul_ps(u, round16(silu512(g), bf)), bf), mk);
        }
    }
}

/* x, y (B, h, T, hs) with element strides sx*, sy* for B, h, T (head dims dense); cos, sin (B, T, rd) dense.
   transformers' apply_rotary_pos_emb in its op order: x*cos, rotate_half(x)*sin, then the sum, each rounded. */
void rotary(const void *x, int64_t sx0, int64_t sx1, int64_t sx2, const void *cos, const void *sin, void *y,
            int64_t sy0, int64_t sy1, int64_t sy2, int B, int H, int T, int hs, int rd, int bf, int threads) {
    const int half = rd / 2;
    #pragma omp parallel for collapse(3) num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; b++)
    for (int64_t h = 0; h < H; h++)
    for (int64_t t = 0; t < T; t++) {
        const int64_t xo = b * sx0 + h * sx1 + t * sx2, yo = b * sy0 + h * sy1 + t * sy2;
        const int64_t co = (b * T + t) * rd;
        for (int i = 0; i < half; i += 16) {
            __mmask16 mk = MASK16(half - i);
            __m512 x1 = load16(x, xo + i, bf, mk), x2 = load16(x, xo + half + i, bf, mk);
            __m512 c1 = load16(cos, co + i, bf, mk), c2 = load16(cos, co + half + i, bf, mk);
            __m512 s1 = load16(sin, co + i, bf, mk), s2 = load16(sin, co + half + i, bf, mk);
            __m512 nx2 = _mm512_sub_ps(_mm512_setzero_ps(), x2);
            store16(y, yo + i, bf, round16(_mm512_add_ps(round16(_mm512_mul_ps(x1, c1), bf),
                                                         round16(_mm512_mul_ps(nx2, s1), bf)), bf), mk);
            store16(y, yo + half + i, bf, round16(_mm512_add_ps(round16(_mm512_mul_ps(x2, c2), bf),
                                                                round16(_mm512_mul_ps(x1, s2), bf)), bf), mk);
        }
        for (int i = rd; i < hs; i += 16)              /* the dims past rd pass through */
            store16(y, yo + i, bf, load16(x, xo + i, bf, MASK16(hs - i)), MASK16(hs - i));
    }
}

#else
void rms_norm(const void *x, const void *w, void *y, int64_t T, int C, float eps, int bf, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        __m256 ss = _mm256_setzero_ps();
        for (int c = 0; c < C; c += 8) {
            __m256 v = load8(x, t * C + c, bf, C - c);
            ss = _mm256_fmadd_ps(v, v, ss);
        }
        __m256 r = _mm256_set1_ps(1.f / sqrtf(hsum8(ss) / C + eps));
        for (int c = 0; c < C; c += 8) {
            __m256 h = round8(_mm256_mul_ps(load8(x, t * C + c, bf, C - c), r), bf);
            store8(y, t * C + c, bf, round8(_mm256_mul_ps(load8(w, c, bf, C - c), h), bf), C - c);
        }
    }
}

void swiglu(const void *gu, void *y, int64_t T, int I, int bf, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        for (int i = 0; i < I; i += 8) {
            __m256 g = load8(gu, t * 2 * I + i, bf, I - i), u = load8(gu, t * 2 * I + I + i, bf, I - i);
            store8(y, t * I + i, bf, round8(_mm256_mul_ps(u, round8(silu256(g), bf)), bf), I - i);
        }
    }
}

void rotary(const void *x, int64_t sx0, int64_t sx1, int64_t sx2, const void *cos, const void *sin, void *y,
            int64_t sy0, int64_t sy1, int64_t sy2, int B, int H, int T, int hs, int rd, int bf, int threads) {
    const int half = rd / 2;
    #pragma omp parallel for collapse(3) num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; b++)
    for (int64_t h = 0; h < H; h++)
    for (int64_t t = 0; t < T; t++) {
        const int64_t xo = b * sx0 + h * sx1 + t * sx2, yo = b * sy0 + h * sy1 + t * sy2;
        const int64_t co = (b * T + t) * rd;
        for (int i = 0; i < half; i += 8) {
            const int n = half - i;
            __m256 x1 = load8(x, xo + i, bf, n), x2 = load8(x, xo + half + i, bf, n);
            __m256 c1 = load8(cos, co + i, bf, n), c2 = load8(cos, co + half + i, bf, n);
            __m256 s1 = load8(sin, co + i, bf, n), s2 = load8(sin, co + half + i, bf, n);
            __m256 nx2 = _mm256_sub_ps(_mm256_setzero_ps(), x2);
            __m256 y1 = round8(_mm256_add_ps(round8(_mm256_mul_ps(x1, c1), bf), round8(_mm256_mul_ps(nx2, s1), bf)), bf);
            __m256 y2 = round8(_mm256_add_ps(round8(_mm256_mul_ps(x2, c2), bf), round8(_mm256_mul_ps(x1, s2), bf)), bf);
            store8(y, yo + i, bf, y1, n);
            store8(y, yo + half + i, bf, y2, n);
        }
        for (int i = rd; i < hs; i += 8)
            store8(y, yo + i, bf, load8(x, xo + i, bf, hs - i), hs - i);
    }
}
#endif
