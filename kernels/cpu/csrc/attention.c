/* Causal prefill attention (kernels/cpu/attention.py states the math and the tiling): fp32, and bf16 on the bf16
   dot-product instruction when the CPU has AVX512-BF16. The fp32 form (bf16 widened, without that instruction) is
   written once on simd.h's width-neutral vfloat: VW = 16 lanes on AVX-512, 8 on AVX2, whose 16 registers take
   smaller tiles (KC, DC below). */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

#define QBLOCK 32
#ifdef __AVX512F__
#define KC 4                        /* vectors of keys per score tile */
#define DC 4                        /* vectors of head dims per p.V pass */
#else
#define KC 3                        /* 4 x 3 accumulators + 3 K vectors + q: the 16 registers */
#define DC 2                        /* 4 x 2 accumulators + V + 4 broadcast p */
#endif

/* the tier's vector exp on n floats in place, for the tests: torch.exp is the reference */
void exp_f32(float *x, int n) {
    for (int i = 0; i < n; i += VW) vstoren(x, i, 0, vexp(vloadn(x, i, 0, n - i)), n - i);
}

static inline float ld(const void *p, int64_t i, int bf) {
    return bf ? bf2f(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* a 4-row x VW*NK-key tile of scores, i0 the slot of its first query row: scaled, causally masked (key j visible
   to row r when j <= i0 + r), stored to srow, max into mx. The tile functions are inlined with NK constant so
   accumulators stay in registers; BY_NK picks that constant, min(n, KC), at run time. */
#if KC == 4
#define BY_NK(n, TILE, ...)                                                                                   \
    switch ((n) < 4 ? (n) : 4) {                                                                              \
        case 4: TILE(4, __VA_ARGS__); break;                                                                  \
        case 3: TILE(3, __VA_ARGS__); break;                                                                  \
        case 2: TILE(2, __VA_ARGS__); break;                                                                  \
        default: TILE(1, __VA_ARGS__); break;                                                                 \
    }
#else
#define BY_NK(n, TILE, ...)                                                                                   \
    switch ((n) < 3 ? (n) : 3) {                                                                              \
        case 3: TILE(3, __VA_ARGS__); break;                                                                  \
        case 2: TILE(2, __VA_ARGS__); break;                                                                  \
        default: TILE(1, __VA_ARGS__); break;                                                                 \
    }
#endif
static inline __attribute__((always_inline)) void store_tile(const int NK, vfloat acc[4][KC], int Tp, int i0, int j0,
                                                             float scale, float *srow, vfloat *mx) {
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < NK; c++) {
            vfloat sc = vfirst_else(vmul(acc[r][c], vset1(scale)), i0 + r - (j0 + VW * c) + 1, -INFINITY);
            vstoreu(srow + r * Tp + j0 + VW * c, sc);
            mx[r] = vmax(mx[r], sc);
        }
}

/* rows i0.. of y = acc / sum, rounded to the output dtype, row r at out + o + r * rstride, nd head dims from o
   (vectors past nd store nothing); unrolled, so the accumulators are indexed by constants and stay in registers */
static inline __attribute__((always_inline)) void store_rows(vfloat acc[4][DC], const float *inv, int nr, void *out,
                                                             int64_t o, int64_t rstride, int nd, int bf) {
    #pragma GCC unroll 4
    for (int r = 0; r < 4; r++) {
        if (r >= nr) break;
        #pragma GCC unroll 4
        for (int c = 0; c < DC; c++) {
            vfloat y = vround(vmul(acc[r][c], vset1(inv[r])), bf);
            vstoren(out, o + r * rstride + c * VW, bf, y, nd - c * VW);
        }
    }
}

/* acc[r][c] += p_rj · v_j over keys j <= last, V rows read by LOADV (full vectors, the hot case, or a head-dim
   tail): two loops, not a branch inside one, which on AVX2 (a tail through load8's buffer) spills acc */
#define PV_ROWS(LOADV)                                                                                        \
    for (int j = 0; j <= last; j++) {                                                                         \
        const float *vj = vg + (int64_t)j * hs + d0;                                                          \
        vfloat p[4];                                                                                          \
        for (int r = 0; r < 4; r++) p[r] = vset1(srow[r * Tp + j]);                                           \
        for (int c = 0; c < DC; c++) {                                                                        \
            vfloat vv = LOADV;                                                                                \
            for (int r = 0; r < 4; r++) acc[r][c] = vfmadd(p[r], vv, acc[r][c]);                              \
        }                                                                                                     \
    }

/* fp32: K transposed (ktg[d][j]), q already scaled */
static inline __attribute__((always_inline)) void qk_tile_f32(const int NK, const float *ktg, const float *qv, int Tp,
                                                              int hs, int i0, int j0, float *srow, vfloat *mx) {
    vfloat acc[4][KC];
    for (int r = 0; r < 4; r++) for (int c = 0; c < NK; c++) acc[r][c] = vzero();
    for (int d = 0; d < hs; d++) {
        vfloat kv[KC];
        for (int c = 0; c < NK; c++) kv[c] = vloadu(ktg + (int64_t)d * Tp + j0 + VW * c);
        for (int r = 0; r < 4; r++) {
            vfloat qb = vset1(qv[r * hs + d]);
            for (int c = 0; c < NK; c++) acc[r][c] = vfmadd(qb, kv[c], acc[r][c]);
        }
    }
    store_tile(NK, acc, Tp, i0, j0, 1.f, srow, mx);
}

/* q (B, nh, T, hs), k and v (B, nkv, S, hs) with any strides (in elements: sb, sh, st; the last dim is dense),
   S >= T, query i at slot S - T + i; out (B, T, nh, hs) dense. kt: scratch B*nkv*hs*Tp floats (K transposed, Tp = S
   rounded up to 64), vf: scratch B*nkv*S*hs floats (V widened), rows: scratch threads*4*Tp floats. */
void causal_attention(const void *q, const int64_t *sq, const void *k, const int64_t *sk, const void *v,
                      const int64_t *sv, void *out, float *kt, float *vf, float *rows, int B, int nh, int nkv,
                      int T, int S, int hs, float scale, int bf, int threads) {
    const int Tp = (S + 63) / 64 * 64, rep = nh / nkv, nqb = (T + QBLOCK - 1) / QBLOCK, start = S - T;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int task = 0; task < B * nkv * (Tp / 64); task++) {   /* per KV head and 64 keys: widen V, K^T */
            const int bg = task / (Tp / 64), j0 = task % (Tp / 64) * 64, b = bg / nkv, g = bg % nkv;
            float *ktg = kt + (int64_t)bg * hs * Tp, *vg = vf + (int64_t)bg * S * hs;
            for (int d = 0; d < hs; d++)
                for (int t = j0; t < j0 + 64; t++)
                    ktg[(int64_t)d * Tp + t] = t < S ? ld(k, b * sk[0] + g * sk[1] + t * sk[2] + d, bf) : 0.f;
            for (int t = j0; t < j0 + 64 && t < S; t++)
                for (int d = 0; d < hs; d++)
                    vg[(int64_t)t * hs + d] = ld(v, b * sv[0] + g * sv[1] + t * sv[2] + d, bf);
        }
        float *srow = rows + (int64_t)omp_get_thread_num() * 4 * Tp;   /* 4 rows of scores */
        #pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < B * nh * nqb; task++) {
            int qb = nqb - 1 - task % nqb, h = (task / nqb) % nh, b = task / (nqb * nh);   /* biggest first */
            int bg = b * nkv + h / rep;
            const float *ktg = kt + (int64_t)bg * hs * Tp, *vg = vf + (int64_t)bg * S * hs;
            for (int i0 = qb * QBLOCK; i0 < T && i0 < (qb + 1) * QBLOCK; i0 += 4) {
                const int nr = T - i0 < 4 ? T - i0 : 4, last = start + i0 + nr - 1, nkc = last / VW + 1;
                float qv[4 * hs];
                for (int r = 0; r < 4; r++)
                    for (int d = 0; d < hs; d++)
                        qv[r * hs + d] = r < nr ? ld(q, b * sq[0] + h * sq[1] + (i0 + r) * sq[2] + d, bf) * scale : 0.f;
                /* scores: four rows x up to KC * VW keys per tile, each K^T load feeding four FMAs */
                vfloat mx[4];
                for (int r = 0; r < 4; r++) mx[r] = vset1(-INFINITY);
                for (int j0 = 0; j0 <= last; j0 += KC * VW)
                    BY_NK(nkc - j0 / VW, qk_tile_f32, ktg, qv, Tp, hs, start + i0, j0, srow, mx)
                float inv[4];
                for (int r = 0; r < 4; r++) {           /* p = exp(s - max), masked keys give 0 */
                    vfloat m = vset1(vmaxall(mx[r])), sum = vzero();
                    for (int j0 = 0; j0 <= last; j0 += VW) {
                        vfloat e = vexp(vsub(vloadu(srow + r * Tp + j0), m));
                        vstoreu(srow + r * Tp + j0, e);
                        sum = vadd(sum, e);
                    }
                    inv[r] = 1.f / vsum(sum);
                }
                /* y = p.V: DC * VW head dims x four rows in 4 * DC accumulators, one load of V feeding four FMAs */
                for (int d0 = 0; d0 < hs; d0 += DC * VW) {
                    const int nd = hs - d0 < DC * VW ? hs - d0 : DC * VW;
                    vfloat acc[4][DC];
                    for (int r = 0; r < 4; r++) for (int c = 0; c < DC; c++) acc[r][c] = vzero();
                    if (nd == DC * VW) PV_ROWS(vloadu(vj + c * VW))
                    else PV_ROWS(vloadn(vj, c * VW, 0, nd - c * VW))   /* absent head dims load zeros */
                    store_rows(acc, inv, nr, out, (((int64_t)b * T + i0) * nh + h) * hs + d0, (int64_t)nh * hs, nd, bf);
                }
            }
        }
    }
}

/* bf16 with head dims in pairs: both products on _mm512_dpbf16_ps (bf16 pairs in, fp32 sums), as SDPA's bf16 path
   does them: scores in fp32, p = exp(s - max) rounded to bf16 for p.V, the sum over fp32 p.
   kp: scratch B*nkv*(hs/2)*Tp u32 (K as dim pairs, key-major within a pair: kp[dp][j] = k[j][2dp..2dp+1]),
   vp: scratch B*nkv*(Tp/2)*hs u32 (V as key pairs: vp[jp][d] = v[2jp..2jp+1][d]), Tp = S rounded up to 64,
   pad keys zero; rows: threads*4*Tp floats; prow: threads*4*Tp bf16. */
#ifdef __AVX512BF16__              /* -march=native on a CPU with avx512_bf16 */
int has_dpbf16(void) { return 1; }

/* masks of the (up to) four 16-lane vectors covering nd head dims; absent vectors get 0 (they load zeros) */
static inline void dim_masks(int nd, __mmask16 *mk) {
    for (int c = 0; c < 4; c++) mk[c] = MASK16(nd - c * 16);
}
static inline uint32_t ld32(const uint16_t *p) { uint32_t u; memcpy(&u, p, 4); return u; }

/* bf16: K as dim pairs (kpg[dp][j] = k[j][2dp..2dp+1]), q as pairs; scaled in the epilogue */
static inline __attribute__((always_inline)) void qk_tile(const int NK, const uint32_t *kpg, const uint32_t *qv,
                                                          int Tp, int hp, int i0, int j0, float scale, float *srow,
                                                          __m512 *mx) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++) for (int c = 0; c < NK; c++) acc[r][c] = _mm512_setzero_ps();
    for (int dp = 0; dp < hp; dp++) {
        __m512bh kv[4];
        for (int c = 0; c < NK; c++) kv[c] = (__m512bh)_mm512_loadu_si512(kpg + (int64_t)dp * Tp + j0 + 16 * c);
        for (int r = 0; r < 4; r++) {
            __m512bh qb = (__m512bh)_mm512_set1_epi32((int)qv[r * hp + dp]);
            for (int c = 0; c < NK; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qb, kv[c]);
        }
    }
    store_tile(NK, acc, Tp, i0, j0, scale, srow, mx);
}

void causal_attention_bf16(const uint16_t *q, const int64_t *sq, const uint16_t *k, const int64_t *sk,
                           const uint16_t *v, const int64_t *sv, uint16_t *out, uint32_t *kp, uint32_t *vp,
                           float *rows, uint16_t *prows, int B, int nh, int nkv, int T, int S, int hs, float scale,
                           int threads) {
    const int Tp = (S + 63) / 64 * 64, hp = hs / 2, rep = nh / nkv, nqb = (T + QBLOCK - 1) / QBLOCK, start = S - T;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int task = 0; task < B * nkv * (Tp / 64); task++) {   /* per KV head and 64 keys: pack K and V */
            const int bg = task / (Tp / 64), j0 = task % (Tp / 64) * 64, b = bg / nkv, g = bg % nkv;
            uint32_t *kpg = kp + (int64_t)bg * hp * Tp, *vpg = vp + (int64_t)bg * (Tp / 2) * hs;
            const uint16_t *kg = k + b * sk[0] + g * sk[1], *vgp = v + b * sv[0] + g * sv[1];
            for (int dp = 0; dp < hp; dp++)
                for (int j = j0; j < j0 + 64; j++)
                    kpg[(int64_t)dp * Tp + j] = j < S ? ld32(kg + (int64_t)j * sk[2] + 2 * dp) : 0;
            for (int jp = j0 / 2; jp < j0 / 2 + 32; jp++) {
                const uint16_t *v0 = vgp + (int64_t)(2 * jp) * sv[2], *v1 = v0 + sv[2];
                for (int d = 0; d < hs; d++)
                    vpg[(int64_t)jp * hs + d] = (2 * jp < S ? v0[d] : 0) | (uint32_t)(2 * jp + 1 < S ? v1[d] : 0) << 16;
            }
        }
        float *srow = rows + (int64_t)omp_get_thread_num() * 4 * Tp;
        uint16_t *prow = prows + (int64_t)omp_get_thread_num() * 4 * Tp;
        #pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < B * nh * nqb; task++) {
            int qb = nqb - 1 - task % nqb, h = (task / nqb) % nh, b = task / (nqb * nh);   /* biggest first */
            int bg = b * nkv + h / rep;
            const uint32_t *kpg = kp + (int64_t)bg * hp * Tp, *vpg = vp + (int64_t)bg * (Tp / 2) * hs;
            for (int i0 = qb * QBLOCK; i0 < T && i0 < (qb + 1) * QBLOCK; i0 += 4) {
                const int nr = T - i0 < 4 ? T - i0 : 4, last = start + i0 + nr - 1, nk16 = last / 16 + 1;
                uint32_t qv[4 * hp];
                for (int r = 0; r < 4; r++)
                    for (int dp = 0; dp < hp; dp++)
                        qv[r * hp + dp] =
                            r < nr ? ld32(q + b * sq[0] + h * sq[1] + (int64_t)(i0 + r) * sq[2] + 2 * dp) : 0;
                /* scores: four rows x up to 64 keys per tile, each K load feeding four dot products */
                __m512 mx[4];
                for (int r = 0; r < 4; r++) mx[r] = _mm512_set1_ps(-INFINITY);
                for (int j0 = 0; j0 <= last; j0 += 64)
                    BY_NK(nk16 - j0 / 16, qk_tile, kpg, qv, Tp, hp, start + i0, j0, scale, srow, mx)
                float inv[4];
                for (int r = 0; r < 4; r++) {           /* p = exp(s - max) in bf16; rows past the end get zeros */
                    __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx[r])), sum = _mm512_setzero_ps();
                    for (int j0 = 0; j0 < nk16 * 16; j0 += 16) {
                        __m512 e = r < nr ? exp512(_mm512_sub_ps(_mm512_loadu_ps(srow + r * Tp + j0), m))
                                          : _mm512_setzero_ps();
                        _mm256_storeu_si256((__m256i *)(prow + r * Tp + j0), (__m256i)_mm512_cvtneps_pbh(e));
                        sum = _mm512_add_ps(sum, e);
                    }
                    inv[r] = r < nr ? 1.f / _mm512_reduce_add_ps(sum) : 0.f;
                }
                /* y = p.V: key pairs x 64 head dims x four rows in 16 accumulators */
                const int np = (last + 2) / 2;
                for (int d0 = 0; d0 < hs; d0 += 64) {
                    const int nd = hs - d0 < 64 ? hs - d0 : 64;
                    __m512 acc[4][4];
                    for (int r = 0; r < 4; r++) for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
                    __mmask16 mk[4];
                    dim_masks(nd, mk);
                    for (int jp = 0; jp < np; jp++) {
                        const uint32_t *vj = vpg + (int64_t)jp * hs + d0;
                        __m512bh p[4];
                        for (int r = 0; r < 4; r++)
                            p[r] = (__m512bh)_mm512_set1_epi32((int)ld32(prow + r * Tp + 2 * jp));
                        for (int c = 0; c < 4; c++) {          /* absent head dims load zeros: no branch */
                            __m512bh vv = (__m512bh)_mm512_maskz_loadu_epi32(mk[c], vj + c * 16);
                            for (int r = 0; r < 4; r++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], p[r], vv);
                        }
                    }
                    store_rows(acc, inv, nr, out, (((int64_t)b * T + i0) * nh + h) * hs + d0, (int64_t)nh * hs, nd, 1);
                }
            }
        }
    }
}
#else
int has_dpbf16(void) { return 0; }
#endif
