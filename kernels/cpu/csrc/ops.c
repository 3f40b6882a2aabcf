/* RMSNorm, SwiGLU and RoPE for CPU inference, each one pass over the activation (kernels/cpu/ops.py states the math
   and holds the torch references). vround() = the activation dtype's rounding, at the places torch rounds. Rows
   split over the OpenMP threads. Written once on simd.h's width-neutral vectors: VW = 16 lanes on AVX-512, 8 on
   AVX2. */
#include <math.h>
#include <stdint.h>

#include "simd.h"

/* x, y (T, C) rows contiguous; w (C,). The sum of squares in VW fp32 lanes, then reduced. */
void rms_norm(const void *x, const void *w, void *y, int64_t T, int C, float eps, int bf, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        vfloat ss = vzero();
        for (int c = 0; c < C; c += VW) {
            vfloat v = vloadn(x, t * C + c, bf, C - c);
            ss = vfmadd(v, v, ss);
        }
        vfloat r = vset1(1.f / sqrtf(vsum(ss) / C + eps));
        for (int c = 0; c < C; c += VW) {
            vfloat h = vround(vmul(vloadn(x, t * C + c, bf, C - c), r), bf);
            vstoren(y, t * C + c, bf, vround(vmul(vloadn(w, c, bf, C - c), h), bf), C - c);
        }
    }
}

/* gu (T, 2I) rows contiguous: gate = gu[:, :I], up = gu[:, I:]; y (T, I) */
void swiglu(const void *gu, void *y, int64_t T, int I, int bf, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        for (int i = 0; i < I; i += VW) {
            vfloat g = vloadn(gu, t * 2 * I + i, bf, I - i), u = vloadn(gu, t * 2 * I + I + i, bf, I - i);
            vstoren(y, t * I + i, bf, vround(vmul(u, vround(vsilu(g), bf)), bf), I - i);
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
        for (int i = 0; i < half; i += VW) {
            const int n = half - i;
            vfloat x1 = vloadn(x, xo + i, bf, n), x2 = vloadn(x, xo + half + i, bf, n);
            vfloat c1 = vloadn(cos, co + i, bf, n), c2 = vloadn(cos, co + half + i, bf, n);
            vfloat s1 = vloadn(sin, co + i, bf, n), s2 = vloadn(sin, co + half + i, bf, n);
            vfloat nx2 = vsub(vzero(), x2);
            vstoren(y, yo + i, bf, vround(vadd(vround(vmul(x1, c1), bf), vround(vmul(nx2, s1), bf)), bf), n);
            vstoren(y, yo + half + i, bf, vround(vadd(vround(vmul(x2, c2), bf), vround(vmul(x1, s2), bf)), bf), n);
        }
        for (int i = rd; i < hs; i += VW)              /* the dims past rd pass through */
            vstoren(y, yo + i, bf, vloadn(x, xo + i, bf, hs - i), hs - i);
    }
}
