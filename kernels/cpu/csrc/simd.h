/* What every CPU kernel shares: the vector exp and SiLU, bf16 rounding (scalar and 16 lanes), tail masks, and
   16-lane loads/stores of fp32 or bf16 arrays. One home each, so the roundings of every kernel are the same code.

   bf16 rounding is torch's: round to nearest even (add 0x7fff plus the lowest kept bit, keep the top half),
   NaN stays NaN. The vector part comes in two tiers, chosen by the compile flags (kernels/cpu/native.py builds each
   library once per tier the CPU runs): 16 lanes on AVX-512 (F, BW, VL), or 8 lanes on AVX2 + FMA, where tails
   go through a small buffer instead of a mask register. The scalar part compiles anywhere. */
#pragma once
#include <stdint.h>
#include <string.h>

static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t f2bf(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

#ifdef __AVX512F__
#include <immintrin.h>

/* lanes 0..n-1 of a 16- or 32-lane vector (all when n >= width) */
#define MASK16(n) ((n) >= 16 ? (__mmask16)0xffff : (n) <= 0 ? (__mmask16)0 : (__mmask16)((1u << (n)) - 1))
#define MASK32(n) ((n) >= 32 ? (__mmask32)0xffffffffu : (n) <= 0 ? (__mmask32)0 : (__mmask32)((1u << (n)) - 1))

/* R(v): 16 lanes rounded to bf16 precision and kept as fp32 when bf, else v unchanged */
static inline __m512 round16(__m512 v, int bf) {
    if (!bf) return v;
    __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                 _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    r = _mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u));
    return _mm512_mask_mov_ps(_mm512_castsi512_ps(r), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
}

/* 16 lanes of an fp32 or bf16 array from element i (bf16 widened exactly); masked-off lanes read 0 */
static inline __m512 load16(const void *p, int64_t i, int bf, __mmask16 mk) {
    if (!bf) return _mm512_maskz_loadu_ps(mk, (const float *)p + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
        _mm256_maskz_loadu_epi16(mk, (const uint16_t *)p + i)), 16));
}

/* the inverse of load16 for a v already rounded by round16 (bf16 keeps the top half of each lane) */
static inline void store16(void *p, int64_t i, int bf, __m512 v, __mmask16 mk) {
    if (!bf) { _mm512_mask_storeu_ps((float *)p + i, mk, v); return; }
    __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16));
    _mm256_mask_storeu_epi16((uint16_t *)p + i, mk, h);
}

/* exp(x) for 16 fp32 lanes: Cody-Waite reduction x = n·ln2 + r (ln2 in two parts, so n·hi is exact), a degree-6
   Taylor polynomial on |r| <= ln2/2, then 2^n by scalef. At most 2 ulp from torch.exp
   (tests/kernels/cpu/test_attention.py), 0 below -87, inf above ~88.7, NaN kept. */
static inline __m512 exp512(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.0f);
    __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    __m512 xc = _mm512_max_ps(x, lo);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    __m512 e = _mm512_maskz_mov_ps(~under, _mm512_scalef_ps(p, n));
    return _mm512_mask_mov_ps(e, nan, x);
}

/* silu(g) = g / (1 + exp(-g)), unrounded: SwiGLU in ops.c and in the decode step, each rounding after it */
static inline __m512 silu512(__m512 g) {
    __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
    return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e));
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* R(v) on 8 lanes: to bf16 and back when bf, NaN kept */
static inline __m256 round8(__m256 v, int bf) {
    if (!bf) return v;
    __m256i u = _mm256_castps_si256(v);
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                 _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    r = _mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u));
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

/* 8 lanes of an fp32 or bf16 array from element i; n < 8 reads n lanes and zeros (through a buffer) */
static inline __m256 load8(const void *p, int64_t i, int bf, int n) {
    if (n >= 8) {
        if (!bf) return _mm256_loadu_ps((const float *)p + i);
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(
            _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))), 16));
    }
    float t[8] = {0};
    for (int k = 0; k < n; k++) t[k] = bf ? bf2f(((const uint16_t *)p)[i + k]) : ((const float *)p)[i + k];
    return _mm256_loadu_ps(t);
}

/* the inverse of load8 for a v already rounded by round8; n < 8 stores the first n lanes */
static inline void store8(void *p, int64_t i, int bf, __m256 v, int n) {
    float t[8];
    if (n >= 8 && !bf) { _mm256_storeu_ps((float *)p + i, v); return; }
    if (n >= 8) {   /* bf16: the high halves (v is already rounded), packed 8 x 32 -> 8 x 16 bits */
        __m256i u = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
        __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
        _mm_storeu_si128((__m128i *)((uint16_t *)p + i), h);
        return;
    }
    _mm256_storeu_ps(t, v);
    for (int k = 0; k < (n < 8 ? n : 8); k++) {
        if (bf) { uint32_t u; memcpy(&u, &t[k], 4); ((uint16_t *)p)[i + k] = (uint16_t)(u >> 16); }
        else ((float *)p)[i + k] = t[k];
    }
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* exp(x) on 8 lanes, exp512's method: 2^n built in the exponent field, in two factors so that n = 128 (x near
   88.7) stays representable; 0 below -87, inf above ~88.7, NaN kept */
static inline __m256 exp256(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ), nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(89.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
    __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
    __m256 e = _mm256_andnot_ps(under, _mm256_mul_ps(_mm256_mul_ps(p, s1), s2));
    return _mm256_blendv_ps(e, x, nan);
}

static inline __m256 silu256(__m256 g) {
    __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
    return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e));
}
#endif

/* The tier's vector, width-neutral, for code written once for both tiers (the decode step): VW fp32 lanes, and
   n-lane loads/stores (lanes past n read 0 / are left alone; n >= VW means all). Each is the tier's form above, so
   a kernel written on these computes on AVX-512 exactly what its 16-lane form did. */
#if defined(__AVX512F__)
#define VW 16
typedef __m512 vfloat;
#define vzero _mm512_setzero_ps
#define vset1 _mm512_set1_ps
#define vadd _mm512_add_ps
#define vsub _mm512_sub_ps
#define vdiv _mm512_div_ps
#define vfmadd _mm512_fmadd_ps
#define vsum _mm512_reduce_add_ps
#define vexp exp512
#define vsilu silu512
#define vround round16
#define vstoreu _mm512_storeu_ps
#define vloadu _mm512_loadu_ps
#define vmul _mm512_mul_ps
#define vmax _mm512_max_ps
#define vmaxall _mm512_reduce_max_ps
static inline vfloat vloadn(const void *p, int64_t i, int bf, int64_t n) { return load16(p, i, bf, MASK16(n)); }
static inline void vstoren(void *p, int64_t i, int bf, vfloat v, int64_t n) { store16(p, i, bf, v, MASK16(n)); }
static inline vfloat vfirst(vfloat v, int64_t n) { return _mm512_maskz_mov_ps(MASK16(n), v); }  /* lanes past n: 0 */
static inline vfloat vfirst_else(vfloat v, int64_t n, float fill) {                         /* lanes past n: fill */
    return _mm512_mask_mov_ps(_mm512_set1_ps(fill), MASK16(n), v);
}
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
typedef __m256 vfloat;
#define vzero _mm256_setzero_ps
#define vset1 _mm256_set1_ps
#define vadd _mm256_add_ps
#define vsub _mm256_sub_ps
#define vdiv _mm256_div_ps
#define vfmadd _mm256_fmadd_ps
#define vsum hsum8
#define vexp exp256
#define vsilu silu256
#define vround round8
#define vstoreu _mm256_storeu_ps
#define vloadu _mm256_loadu_ps
#define vmul _mm256_mul_ps
#define vmax _mm256_max_ps
static inline float vmaxall(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
static inline vfloat vloadn(const void *p, int64_t i, int bf, int64_t n) { return load8(p, i, bf, n < 8 ? (int)n : 8); }
static inline void vstoren(void *p, int64_t i, int bf, vfloat v, int64_t n) { store8(p, i, bf, v, n < 8 ? (int)n : 8); }
static inline vfloat vfirst_else(vfloat v, int64_t n, float fill) {
    __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(n < 8 ? (int)n : 8), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_blendv_ps(_mm256_set1_ps(fill), v, _mm256_castsi256_ps(keep));
}
static inline vfloat vfirst(vfloat v, int64_t n) { return vfirst_else(v, n, 0.f); }
#endif
