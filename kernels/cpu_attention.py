"""Causal attention for a prefill on the CPU, in C: y = softmax(q·kᵀ·hs^-½ + causal) · v, fp32 or bf16.

torch's CPU flash-attention kernel (what `scaled_dot_product_attention(is_causal=True)` runs) spends ~3.5 ms per
layer on the default model's 512-token prefill, a third of the whole prefill: it computes full query × key blocks
and exponentiates the masked half too. This kernel does only the causal triangle, four query rows at a time:

    s_j = (q_i · k_j) · hs^-½   for j ≤ S − T + i  (the query's own slot; S = T for a fresh prefill)
    p_j = exp(s_j − max_j s) / Σ_j exp(…)           fp32, kernels/native.py's vector exp (≤ 2 ulp)
    y_i = Σ_j p_j v_j                                rounded once to the model dtype

fp32 (and bf16 with an odd head dim): everything in fp32 (bf16 widened exactly), K transposed once per KV head,
4 query rows x 64 keys a tile (16 accumulators, each K load feeding four FMAs). bf16: both products on the CPU's
bf16 dot-product instruction (_mm512_dpbf16_ps: a pair of bf16 products added into fp32), the way SDPA's bf16 path
rounds — scores in fp32 (bf16 products are exact in fp32), exp(s − max) rounded to bf16 for p·v, the sum over the
fp32 values; K packed as dim pairs, V as key pairs, the same tiles. At 512 tokens (9 heads, 3 KV heads, hs 64, 2
threads): fp32 0.9 ms a layer, bf16 0.55-0.7 ms, SDPA 3.2-3.6 ms (bench/bench_cpu_kernels.py).

Grouped-query heads read their KV head (h // rep) in place, and the output is written as (B, T, nh·hs), the
layout o_proj takes, so no transpose copy follows. Work splits over (row, head, 32-query block) tasks, dynamically
scheduled (later blocks have more keys).

Keys may run ahead of the queries: with S keys and T ≤ S queries, query i sits at slot S − T + i and sees keys
0 … S − T + i, the triangle aligned bottom-right — a prefill chunk after cached tokens (a long prompt's later
chunks, a chat's next turn). Only causal masks: padding, window or packing masks keep SDPA, as do autograd
(training), other devices, and machines without a compiler.

Legend: B rows, T queries, S keys (≥ T), nh/nkv query/KV heads, hs head dim.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from phiforge.kernels import native

_SRC = native.VECMATH + r"""
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define QBLOCK 32

/* exp512 on n floats in place, for the tests: torch.exp is the reference */
void exp_f32(float *x, int n) {
    for (int i = 0; i < n; i += 16) {
        __mmask16 mk = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(x + i, mk, exp512(_mm512_maskz_loadu_ps(mk, x + i)));
    }
}

static inline float ld(const void *p, int64_t i, int bf) {
    if (!bf) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16; float f; memcpy(&f, &u, 4); return f;
}

/* a 4-row x 16*NK-key tile of scores, i0 the slot of its first query row: scaled, causally masked (key j visible
   to row r when j <= i0 + r), stored to srow, max into mx. The tile functions are inlined with NK constant so
   accumulators stay in registers; BY_NK picks that constant, min(n, 4), at run time. */
#define BY_NK(n, TILE, ...)                                                                                   \
    switch ((n) < 4 ? (n) : 4) {                                                                              \
        case 4: TILE(4, __VA_ARGS__); break;                                                                  \
        case 3: TILE(3, __VA_ARGS__); break;                                                                  \
        case 2: TILE(2, __VA_ARGS__); break;                                                                  \
        default: TILE(1, __VA_ARGS__); break;                                                                 \
    }
static inline __attribute__((always_inline)) void store_tile(const int NK, __m512 acc[4][4], int Tp, int i0, int j0,
                                                             float scale, float *srow, __m512 *mx) {
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < NK; c++) {
            int n = i0 + r - (j0 + 16 * c) + 1;
            __mmask16 ok = n >= 16 ? 0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1);
            __m512 sc = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), ok,
                                           _mm512_mul_ps(acc[r][c], _mm512_set1_ps(scale)));
            _mm512_storeu_ps(srow + r * Tp + j0 + 16 * c, sc);
            mx[r] = _mm512_max_ps(mx[r], sc);
        }
}

/* masks of the (up to) four 16-lane vectors covering nd head dims; absent vectors get 0 (they load zeros) */
static inline void dim_masks(int nd, __mmask16 *mk) {
    for (int c = 0; c < 4; c++)
        mk[c] = nd - c * 16 >= 16 ? 0xffff : nd <= c * 16 ? 0 : (__mmask16)((1u << (nd - c * 16)) - 1);
}

/* rows i0.. of y = acc / sum, rounded to the output dtype, row r at out + o + r * rstride; unrolled, so the
   accumulators are indexed by constants and stay in registers */
static inline __attribute__((always_inline)) void store_rows(__m512 acc[4][4], const float *inv, int nr, void *out,
                                                             int64_t o, int64_t rstride, const __mmask16 *mk, int bf) {
    #pragma GCC unroll 4
    for (int r = 0; r < 4; r++) {
        if (r >= nr) break;
        #pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            __m512 y = round16(_mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv[r])), bf);
            int64_t at = o + r * rstride + c * 16;
            if (!bf) { _mm512_mask_storeu_ps((float *)out + at, mk[c], y); continue; }
            __m256i yb = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(y), 16));
            _mm256_mask_storeu_epi16((uint16_t *)out + at, mk[c], yb);
        }
    }
}

/* fp32: K transposed (ktg[d][j]), q already scaled */
static inline __attribute__((always_inline)) void qk_tile_f32(const int NK, const float *ktg, const float *qv, int Tp,
                                                              int hs, int i0, int j0, float *srow, __m512 *mx) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++) for (int c = 0; c < NK; c++) acc[r][c] = _mm512_setzero_ps();
    for (int d = 0; d < hs; d++) {
        __m512 kv[4];
        for (int c = 0; c < NK; c++) kv[c] = _mm512_loadu_ps(ktg + (int64_t)d * Tp + j0 + 16 * c);
        for (int r = 0; r < 4; r++) {
            __m512 qb = _mm512_set1_ps(qv[r * hs + d]);
            for (int c = 0; c < NK; c++) acc[r][c] = _mm512_fmadd_ps(qb, kv[c], acc[r][c]);
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
                const int nr = T - i0 < 4 ? T - i0 : 4, last = start + i0 + nr - 1, nk16 = last / 16 + 1;
                float qv[4 * hs];
                for (int r = 0; r < 4; r++)
                    for (int d = 0; d < hs; d++)
                        qv[r * hs + d] = r < nr ? ld(q, b * sq[0] + h * sq[1] + (i0 + r) * sq[2] + d, bf) * scale : 0.f;
                /* scores: four rows x up to 64 keys per tile, each K^T load feeding four FMAs */
                __m512 mx[4];
                for (int r = 0; r < 4; r++) mx[r] = _mm512_set1_ps(-INFINITY);
                for (int j0 = 0; j0 <= last; j0 += 64)
                    BY_NK(nk16 - j0 / 16, qk_tile_f32, ktg, qv, Tp, hs, start + i0, j0, srow, mx)
                float inv[4];
                for (int r = 0; r < 4; r++) {           /* p = exp(s - max), masked keys give 0 */
                    __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx[r])), sum = _mm512_setzero_ps();
                    for (int j0 = 0; j0 <= last; j0 += 16) {
                        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(srow + r * Tp + j0), m));
                        _mm512_storeu_ps(srow + r * Tp + j0, e);
                        sum = _mm512_add_ps(sum, e);
                    }
                    inv[r] = 1.f / _mm512_reduce_add_ps(sum);
                }
                /* y = p.V: 64 head dims x four rows in 16 accumulators, one load of V feeding four FMAs */
                for (int d0 = 0; d0 < hs; d0 += 64) {
                    const int nd = hs - d0 < 64 ? hs - d0 : 64;
                    __m512 acc[4][4];
                    for (int r = 0; r < 4; r++) for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
                    __mmask16 mk[4];
                    dim_masks(nd, mk);
                    for (int j = 0; j <= last; j++) {
                        const float *vj = vg + (int64_t)j * hs + d0;
                        __m512 p[4];
                        for (int r = 0; r < 4; r++) p[r] = _mm512_set1_ps(srow[r * Tp + j]);
                        for (int c = 0; c < 4; c++) {          /* absent head dims load zeros: no branch */
                            __m512 vv = _mm512_maskz_loadu_ps(mk[c], vj + c * 16);
                            for (int r = 0; r < 4; r++) acc[r][c] = _mm512_fmadd_ps(p[r], vv, acc[r][c]);
                        }
                    }
                    store_rows(acc, inv, nr, out, (((int64_t)b * T + i0) * nh + h) * hs + d0, (int64_t)nh * hs, mk, bf);
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
                    store_rows(acc, inv, nr, out, (((int64_t)b * T + i0) * nh + h) * hs + d0, (int64_t)nh * hs, mk, 1);
                }
            }
        }
    }
}
#else
int has_dpbf16(void) { return 0; }
#endif
"""

_lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable (SDPA runs)
enabled = True                           # a switch for A/B measurements (bench/bench_generate.py --ablations)


def _load() -> ctypes.CDLL | None:
    global _lib
    if _lib is False:
        _lib = native.build("cpu_attention", _SRC, need=("avx512f",))
        if _lib is not None:
            P, I = ctypes.c_void_p, ctypes.c_int
            _lib.causal_attention.argtypes = [P] * 10 + [I] * 6 + [ctypes.c_float, I, I]
            _lib.causal_attention.restype = None
            _lib.exp_f32.argtypes = [P, I]
            if _lib.has_dpbf16():
                _lib.causal_attention_bf16.argtypes = [P] * 11 + [I] * 6 + [ctypes.c_float, I]
                _lib.causal_attention_bf16.restype = None
    return _lib


def supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    return (enabled and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
            and k.dtype == q.dtype and k.shape[2] >= q.shape[2] and q.stride(-1) == 1 and k.stride(-1) == 1
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)) and _load() is not None)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, nh, T, hs), k, v (B, nkv, S, hs), S ≥ T → (B, T, nh·hs): causal softmax attention, scale hs^-½, query
    i at slot S − T + i (a chunk after S − T cached tokens) seeing keys 0 … S − T + i.
    SDPA (and a transpose) when `supports` says no."""
    if not (q.dim() == k.dim() == 4 and k.shape == v.shape and q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3]
            and q.shape[1] % k.shape[1] == 0 and k.shape[2] >= q.shape[2]):
        raise ValueError(f"causal_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected "
                         "q (B, nh, T, hs) and k, v (B, nkv, S, hs) with nh a multiple of nkv and S >= T")
    B, nh, T, hs = q.shape
    nkv, S = k.shape[1], k.shape[2]
    if not (supports(q, k) and v.stride(-1) == 1 and v.dtype == q.dtype):
        # SDPA's is_causal aligns the triangle top-left; a chunk after cached tokens needs it bottom-right
        mask = None if S == T else torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=S == T,
                                           enable_gqa=nkv != nh)                               # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, nh * hs)                                    # (B, T, nh·hs)
    Tp, threads = -(-S // 64) * 64, torch.get_num_threads()                                 # Tp: keys padded
    out = torch.empty(B, T, nh * hs, dtype=q.dtype)                                         # (B, T, nh·hs)
    strides = [torch.tensor(t.stride()[:3], dtype=torch.int64) for t in (q, k, v)]
    if q.dtype == torch.bfloat16 and hs % 2 == 0 and _lib.has_dpbf16():
        kp = torch.empty(B * nkv * hs // 2 * Tp, dtype=torch.int32)                         # K as dim pairs
        vp = torch.empty(B * nkv * Tp // 2 * hs, dtype=torch.int32)                         # V as key pairs
        rows, prows = torch.empty(threads * 4 * Tp), torch.empty(threads * 4 * Tp, dtype=torch.bfloat16)
        _lib.causal_attention_bf16(q.data_ptr(), strides[0].data_ptr(), k.data_ptr(), strides[1].data_ptr(),
                                   v.data_ptr(), strides[2].data_ptr(), out.data_ptr(), kp.data_ptr(), vp.data_ptr(),
                                   rows.data_ptr(), prows.data_ptr(), B, nh, nkv, T, S, hs, hs ** -0.5, threads)
        return out
    kt = torch.empty(B * nkv * hs * Tp)                                                     # K transposed
    vf = torch.empty(B * nkv * S * hs)                                                      # V widened
    rows = torch.empty(threads * 4 * Tp)
    _lib.causal_attention(q.data_ptr(), strides[0].data_ptr(), k.data_ptr(), strides[1].data_ptr(), v.data_ptr(),
                          strides[2].data_ptr(), out.data_ptr(), kt.data_ptr(), vf.data_ptr(), rows.data_ptr(),
                          B, nh, nkv, T, S, hs, hs ** -0.5, int(q.dtype == torch.bfloat16), threads)
    return out


def causal_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same math in fp64 torch: q (B, nh, T, hs), k, v (B, nkv, S, hs) → (B, T, nh·hs) float64."""
    B, nh, T, hs = q.shape
    S, rep = k.shape[2], nh // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)        # (B, nh, S, hs)
    s = q.double() @ k.transpose(-1, -2) * hs ** -0.5                                       # (B, nh, T, S)
    s = s.masked_fill(torch.ones(T, S, dtype=torch.bool).triu(S - T + 1), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, nh * hs)                       # (B, T, nh·hs)
