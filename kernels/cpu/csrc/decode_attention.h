/* The attention of one decode step (decode.c): one query per (row, head) over its cache row's slots 0..s
   (each row its own s: rows of a serving batch hold sequences of different lengths).

   Per (row b, query head h; KV head g = h // (nh / nkv), read in place), R() the model dtype's rounding:

       s_j = R(q · k_j) · hs^-½,  -inf where slot j is empty (position -1) or out of the window
       p_j = R(exp(s_j − max s) / Σ exp(…))            fp32 softmax, vector exp
       y   = R(Σ_j p_j v_j)

   `attend` is the generic form (fp32, or bf16 widened to fp32, VW head dims per FMA: 16 on AVX-512, 8 on AVX2;
   written once on simd.h's width-neutral vfloat). `attend_bf16` is the AVX512-BF16 one: q and p are bf16-exact
   (R-rounded), so both products go through _mm512_dpbf16_ps straight from the bf16 cache (exact products, fp32
   sums): q·k_j 32 dims an instruction, and p·V two keys an instruction, the rows v_j, v_j+1 interleaved
   (unpacklo/hi_epi16) so each lane holds (v_j[d], v_j+1[d]). Same roundings in both; only the summation order
   differs. Tests: tests/kernels/cpu/test_decode.py (both forms, at each tier, against the torch decode step and
   model.forward, head dims 8-96). */
#pragma once
#include <math.h>
#include <stdint.h>

#include "decode.h"
#include "gemv.h"

/* a key in slot with position kp is hidden from a query at `position`: an empty or pad slot (kp = -1), or older
   than the sliding window */
static inline int hidden(const Model *m, int64_t kp, int64_t position) {
    return kp < 0 || (m->window > 0 && position - kp >= m->window);
}

/* sc[0..s] holds scores (hidden slots -inf) with maximum mx: replace them by p = R(exp(sc - mx) / Σ exp(...)),
   VW slots at a time */
static void softmax_row(const Model *m, float *sc, int s, float mx) {
    vfloat acc = vzero(), vmx = vset1(mx);
    for (int j = 0; j <= s; j += VW) {
        const int n = s + 1 - j;
        vfloat e = vfirst(vexp(vsub(vloadn(sc, j, 0, n), vmx)), n);
        vstoren(sc, j, 0, e, n);
        acc = vadd(acc, e);
    }
    const vfloat sum = vset1(vsum(acc));
    for (int j = 0; j <= s; j += VW) {
        const int n = s + 1 - j;
        vstoren(sc, j, 0, vround(vdiv(vloadn(sc, j, 0, n), sum), m->bf), n);
    }
}
#ifdef __AVX512BF16__
/* The bf16 form of `attend` below (see the module docstring). After unpacklo/hi_epi16 of two rows, lane i of the
   lo / hi half holds dimension 8(i/4) + i%4 / 8(i/4) + 4 + i%4 of its 32-dim chunk. */
static void attend_bf16(const Model *m, int l, int b, int h, int s, int64_t position) {
    const int hs = m->hs, g = h / (m->nh / m->nkv), nqkv = (m->nh + 2 * m->nkv) * hs;
    const int64_t base = ((((int64_t)l * m->nrows + m->rows[b]) * m->nkv + g) * m->smax) * hs;
    const uint16_t *K = (const uint16_t *)m->k_cache + base, *V = (const uint16_t *)m->v_cache + base;
    const float *q = m->qkv + (int64_t)b * nqkv + (int64_t)h * hs;
    const int64_t *pos = m->pos + m->rows[b] * m->smax;
    float *sc = m->scores + ((int64_t)b * m->nh + h) * m->smax, mx = -INFINITY;
    uint16_t qb[hs + 32];
    for (int d = 0; d < hs; d++) qb[d] = f2bf(q[d]);
    for (int j = 0; j <= s; j++) {
        if (hidden(m, pos[j], position)) { sc[j] = -INFINITY; continue; }
        __m512 acc = _mm512_setzero_ps();
        for (int d = 0; d < hs; d += 32) {
            __mmask32 mk = MASK32(hs - d);
            acc = DPBF16(acc, _mm512_maskz_loadu_epi16(mk, K + (int64_t)j * hs + d),
                         _mm512_maskz_loadu_epi16(mk, qb + d));
        }
        sc[j] = R(m, _mm512_reduce_add_ps(acc)) * m->scale;
        if (sc[j] > mx) mx = sc[j];
    }
    softmax_row(m, sc, s, mx);
    for (int d0 = 0; d0 < hs; d0 += 64) {            /* 64 dims: two chunks of 32, each a lo and a hi half */
        __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        const int nd = hs - d0 < 64 ? hs - d0 : 64;
        const __mmask32 m0 = MASK32(nd), m1 = nd > 32 ? MASK32(nd - 32) : 0;
        for (int j = 0; j <= s; j += 2) {
            const int two = j + 1 <= s;
            const float p0 = sc[j], p1 = two ? sc[j + 1] : 0.f;
            if (p0 == 0.f && p1 == 0.f) continue;
            const uint16_t *v0 = V + (int64_t)j * hs + d0, *v1 = two ? v0 + hs : v0;
            __m512i pp = _mm512_set1_epi32((int)((uint32_t)f2bf(p1) << 16 | f2bf(p0)));
            __m512i x0 = _mm512_maskz_loadu_epi16(m0, v0), y0 = _mm512_maskz_loadu_epi16(m0, v1);
            a[0] = DPBF16(a[0], _mm512_unpacklo_epi16(x0, y0), pp);
            a[1] = DPBF16(a[1], _mm512_unpackhi_epi16(x0, y0), pp);
            if (m1) {
                __m512i x1 = _mm512_maskz_loadu_epi16(m1, v0 + 32), y1 = _mm512_maskz_loadu_epi16(m1, v1 + 32);
                a[2] = DPBF16(a[2], _mm512_unpacklo_epi16(x1, y1), pp);
                a[3] = DPBF16(a[3], _mm512_unpackhi_epi16(x1, y1), pp);
            }
        }
        float lanes[4][16];
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(lanes[c], a[c]);
        float *out = m->att + ((int64_t)b * m->nh + h) * hs + d0;
        for (int c = 0; c < 4; c++)
            for (int i = 0; i < 16; i++) {
                int d = (c / 2) * 32 + (i / 4) * 8 + (c % 2) * 4 + i % 4;
                if (d < nd) out[d] = R(m, lanes[c][i]);
            }
    }
}
#endif

/* row b, query head h over slots 0..s: att[b, h] = R(Σ_j R(softmax(s)_j) v_j), VW head dims per vector */
static void attend(const Model *m, int l, int b, int h, int s, int64_t position) {
    int hs = m->hs, g = h / (m->nh / m->nkv), nqkv = (m->nh + 2 * m->nkv) * hs;
    int64_t base = ((((int64_t)l * m->nrows + m->rows[b]) * m->nkv + g) * m->smax) * hs;
    const float *q = m->qkv + (int64_t)b * nqkv + (int64_t)h * hs;
    const int64_t *pos = m->pos + m->rows[b] * m->smax;
    float *sc = m->scores + ((int64_t)b * m->nh + h) * m->smax, mx = -INFINITY;
    for (int j = 0; j <= s; j++) {
        if (hidden(m, pos[j], position)) { sc[j] = -INFINITY; continue; }
        vfloat acc = vzero();
        for (int d = 0; d < hs; d += VW)
            acc = vfmadd(vloadn(q, d, 0, hs - d), vloadn(m->k_cache, base + (int64_t)j * hs + d, m->bf, hs - d), acc);
        sc[j] = R(m, vsum(acc)) * m->scale;
        if (sc[j] > mx) mx = sc[j];
    }
    softmax_row(m, sc, s, mx);
    for (int d0 = 0; d0 < hs; d0 += 4 * VW) {        /* up to four accumulators of VW dims in registers */
        int nd = hs - d0 < 4 * VW ? hs - d0 : 4 * VW;
        vfloat o0 = vzero(), o1 = o0, o2 = o0, o3 = o0;
        for (int j = 0; j <= s; j++) {
            float p = sc[j];
            if (p == 0.f) continue;
            const int64_t o = base + (int64_t)j * hs + d0;
            vfloat pv = vset1(p);
            o0 = vfmadd(pv, vloadn(m->v_cache, o, m->bf, nd), o0);
            if (nd > VW) o1 = vfmadd(pv, vloadn(m->v_cache, o + VW, m->bf, nd - VW), o1);
            if (nd > 2 * VW) o2 = vfmadd(pv, vloadn(m->v_cache, o + 2 * VW, m->bf, nd - 2 * VW), o2);
            if (nd > 3 * VW) o3 = vfmadd(pv, vloadn(m->v_cache, o + 3 * VW, m->bf, nd - 3 * VW), o3);
        }
        float out[4 * VW];
        vstoreu(out, o0); vstoreu(out + VW, o1);
        vstoreu(out + 2 * VW, o2); vstoreu(out + 3 * VW, o3);
        for (int d = 0; d < nd; d++) m->att[((int64_t)b * m->nh + h) * hs + d0 + d] = R(m, out[d]);
    }
}
