"""The whole decode step of a dense Phi-3 in one native call: embedding → 30 layers → lm_head, for 1-16 rows.

At batch 1 a decode step reads every weight once (270 MB for the default model in bf16) and does almost nothing
else, so its speed limit is memory bandwidth. The same GEMV called from Python once per projection reaches ~30 GB/s
here (121 calls a token, each paying ctypes, allocation and an OpenMP fork/join), and the ~1,000 small torch ops
between them (norms, RoPE, attention over one query, SwiGLU) cost as much as the GEMVs themselves. This file does
the step as one C function with one OpenMP parallel region: the GEMVs split rows over the threads, attention
(kernels/cpu_decode_attention.py) splits (row, head) pairs, and the small vector ops run on one thread between
barriers. Python calls it once per step. Batches (left-padded rows, pad slots at position -1) stream each weight
once for all rows: two weight rows at a time against blocks of eight rows of x (bf16, batch 8: 18.5 ms a step vs the
torch step's 31).

It computes exactly what `DecodeStep` (engine/decode.py) computes, rounding where torch rounds. With R(v) = v
rounded to the model dtype (identity for fp32, round-to-nearest-even for bf16), per layer:

    h   = x · rsqrt(mean(x²) + eps)  (fp32);  xn = R(w_norm · R(h))            RMSNorm, transformers' order
    qkv = R(xn · W_qkvᵀ)                                                     fp32 accumulation, one rounding
    q,k = R(R(q·cos) + R(rot(q)·sin)) on the first rd dims                   rot(q) = (-q[rd/2:], q[:rd/2])
    s_j = R(q · k_j) · hs^-½  (+ -inf for empty or out-of-window slots)     fp32 softmax, p = R(softmax(s))
    y   = R(Σ_j p_j v_j);  x = R(x + R(y · W_oᵀ))
    x   = R(x + R(R(R(silu(g)) · u) · W_downᵀ)),  (g, u) = R(xn₂ · W_gate_upᵀ)

Only the summation order and exp's last ulp (kernels/native.py) differ from torch's kernels, so logits agree to
rounding (tests/kernels/test_cpu_decode.py compares them with `model.forward` and with the torch decode step).

Projections are dense fp32/bf16, or all NF4 (QLoRA's base model): then each projection runs kernels/nf4_cpu.py's
fused dequantize-GEMV, the very code the torch step calls per NF4 linear, on the same row split, so the sums are
the same; up to nf4_cpu.GEMV_MAX_M rows (beyond, the torch step dequantizes and runs a GEMM instead). NF4 reads a
quarter of the bytes: 168 vs 81 tok/s through the torch step for the default model in bf16, 3.4x transformers +
bitsandbytes (bench_generate.py). A LoRA projection, more than MAX_BATCH rows, or a missing compiler keeps the
torch step.

Legend: C hidden, nh/nkv query/KV heads, hs head dim, rd rotary dims, I intermediate, V vocabulary, S cache slots.
"""
from __future__ import annotations

import ctypes

import torch
from torch import nn

from phiforge.kernels import cpu_decode_attention, native, nf4_cpu
from phiforge.kernels.cpu_linear import is_plain
from phiforge.kernels.nf4 import NF4Weight

_SRC = native.VECMATH + nf4_cpu.SRC + r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    int B, L, C, nh, nkv, hs, rd, I, V, smax, window, bf, threads;
    float eps, scale;
    const void **in_norm, **qkv_w, **o_w, **post_norm, **gate_up_w, **down_w;   /* L pointers each */
    const void *final_norm, *lm_head, *embed, *cos, *sin;                       /* cos/sin: (smax, rd) */
    void *k_cache, *v_cache;                                                    /* (L, B, nkv, smax, hs) */
    int64_t *pos;                                                               /* (B, smax) */
    float *x, *xn, *qkv, *att, *proj, *gu, *mid, *scores;                       /* fp32 scratch, B rows */
    uint16_t *xb;                                                               /* bf16 GEMV input rows */
    int nf4;                        /* the four projections are NF4: their pointers point at an NF4Desc each */
    float *xe, *xo;                 /* NF4 GEMV input: even / odd columns of x, B rows */
} Model;

typedef struct {                    /* one NF4 weight (kernels/nf4.py's NF4Weight), for kernels/nf4_cpu.py's GEMV */
    const uint8_t *packed;
    const void *absmax;
    const float *code, *ncode, *nabs;
    float offset;
    int dq, bs, nbs;
} NF4Desc;

static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {                   /* round to nearest even, NaN stays NaN: torch's */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
static inline float R(const Model *m, float v) { return m->bf ? bf2f(f2bf(v)) : v; }
static inline float ld(const Model *m, const void *p, int64_t i) {
    return m->bf ? bf2f(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void st(const Model *m, void *p, int64_t i, float v) {
    if (m->bf) ((uint16_t *)p)[i] = f2bf(v); else ((float *)p)[i] = v;
}

/* Make x (K values, already representable in the model dtype) the next GEMV's input: bf16 GEMVs read m->xb. */
static void prep(const Model *m, const float *x, int K) {
    if (m->bf) for (int k = 0; k < K; k++) m->xb[k] = f2bf(x[k]);
}

#define MASK16(r) ((r) >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (r)) - 1))
#define MASK32(r) ((r) >= 32 ? 0xffffffffu : ((1u << (r)) - 1))

/* y[n] = R(Σ_k W[n, k] x[k]) for n < N, inside the parallel region: groups of four rows split over the threads,
   one load of x feeding four accumulators. The hot loop has full-width loads only; K % STEP and N % 4 leftovers
   go through masked loads and a one-row loop (masked loads in the hot loop, or the leftover rows as a branch in
   it, measured 15-50% slower). Ends with the barrier of `omp for`. One macro body for both dtypes: LOAD gives
   one vector, FMA accumulates in fp32. */
#define GEMV_BODY(T, STEP, LOAD, MLOAD, FMA, MASK)                                                        \
    const int N4 = N - N % 4, Kf = K - K % STEP;                                                           \
    _Pragma("omp single nowait")   /* N % 4 rows: the for-loop's barrier below waits for this thread too */ \
    for (int n = N4; n < N; n++) {                                                                         \
        __m512 a = _mm512_setzero_ps();                                                                    \
        for (int k = 0; k < K; k += STEP)                                                                  \
            a = FMA(a, MLOAD(MASK(K - k), W + (int64_t)n * K + k), MLOAD(MASK(K - k), x + k));             \
        y[n] = R(m, _mm512_reduce_add_ps(a));                                                              \
    }                                                                                                      \
    _Pragma("omp for schedule(static)")                                                                    \
    for (int n0 = 0; n0 < N4; n0 += 4) {                                                                  \
        const T *w0 = W + (int64_t)n0 * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;                      \
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                       \
        for (int k = 0; k < Kf; k += STEP) {                                                               \
            __typeof__(LOAD(x)) xv = LOAD(x + k);                                                         \
            a0 = FMA(a0, LOAD(w0 + k), xv); a1 = FMA(a1, LOAD(w1 + k), xv);                               \
            a2 = FMA(a2, LOAD(w2 + k), xv); a3 = FMA(a3, LOAD(w3 + k), xv);                               \
        }                                                                                                  \
        if (Kf < K) {                                                                                      \
            __typeof__(LOAD(x)) xv = MLOAD(MASK(K - Kf), x + Kf);                                         \
            a0 = FMA(a0, MLOAD(MASK(K - Kf), w0 + Kf), xv); a1 = FMA(a1, MLOAD(MASK(K - Kf), w1 + Kf), xv); \
            a2 = FMA(a2, MLOAD(MASK(K - Kf), w2 + Kf), xv); a3 = FMA(a3, MLOAD(MASK(K - Kf), w3 + Kf), xv); \
        }                                                                                                  \
        y[n0] = R(m, _mm512_reduce_add_ps(a0)); y[n0 + 1] = R(m, _mm512_reduce_add_ps(a1));               \
        y[n0 + 2] = R(m, _mm512_reduce_add_ps(a2)); y[n0 + 3] = R(m, _mm512_reduce_add_ps(a3));           \
    }

#define DPBF16(a, w, x) _mm512_dpbf16_ps(a, (__m512bh)(w), (__m512bh)(x))
#define FMA32(a, w, x) _mm512_fmadd_ps(w, x, a)
static void gemv_bf16(const Model *m, const uint16_t *W, const uint16_t *x, float *y, int N, int K) {
    GEMV_BODY(uint16_t, 32, _mm512_loadu_si512, _mm512_maskz_loadu_epi16, DPBF16, MASK32)
}
static void gemv_f32(const Model *m, const float *W, const float *x, float *y, int N, int K) {
    GEMV_BODY(float, 16, _mm512_loadu_ps, _mm512_maskz_loadu_ps, FMA32, MASK16)
}

/* The same for B > 1 rows of x (row stride K) into y (B, N): two weight rows at a time, each loaded once for a
   block of eight rows of x (2 x 8 accumulators, all in registers), so a batch streams the weights once instead of
   B times. A block always computes eight rows (missing ones re-read row b0 and are dropped): a fixed trip count is
   what keeps the accumulators in registers (a variable one measured 5x slower). */
#define GEMM_STEP(LOAD, FMA, xr0, k)                                                                       \
    _Pragma("GCC unroll 8")                                                                                \
    for (int b = 0; b < 8; b++) {                                                                          \
        __typeof__(wv0) xv = LOAD(xs[b] + k);                                                              \
        a0[b] = FMA(a0[b], wv0, xv); a1[b] = FMA(a1[b], wv1, xv);                                          \
    }
#define GEMM_BODY(T, STEP, LOAD, MLOAD, FMA, MASK)                                                        \
    const int N2 = N - N % 2, B = m->B, Kf = K - K % STEP;                                                 \
    _Pragma("omp for schedule(static)")                                                                    \
    for (int n0 = 0; n0 < N; n0 += 2) {                                                                   \
        const int rows = n0 < N2 ? 2 : 1;                                                                  \
        const T *w0 = W + (int64_t)n0 * K, *w1 = rows == 2 ? w0 + K : w0;                                 \
        for (int b0 = 0; b0 < B; b0 += 8) {                                                                \
            const int nb = B - b0 < 8 ? B - b0 : 8;                                                        \
            const T *xs[8];                                                                                \
            for (int b = 0; b < 8; b++) xs[b] = x + (int64_t)(b0 + (b < nb ? b : 0)) * K;                 \
            __m512 a0[8], a1[8];                                                                           \
            for (int b = 0; b < 8; b++) a0[b] = a1[b] = _mm512_setzero_ps();                              \
            for (int k = 0; k < Kf; k += STEP) {                                                           \
                __typeof__(LOAD(w0)) wv0 = LOAD(w0 + k), wv1 = LOAD(w1 + k);                               \
                GEMM_STEP(LOAD, FMA, xs, k)                                                                \
            }                                                                                              \
            if (Kf < K) {                                                                                  \
                __typeof__(LOAD(w0)) wv0 = MLOAD(MASK(K - Kf), w0 + Kf), wv1 = MLOAD(MASK(K - Kf), w1 + Kf); \
                _Pragma("GCC unroll 8")                                                                    \
                for (int b = 0; b < 8; b++) {                                                              \
                    __typeof__(wv0) xv = MLOAD(MASK(K - Kf), xs[b] + Kf);                                  \
                    a0[b] = FMA(a0[b], wv0, xv); a1[b] = FMA(a1[b], wv1, xv);                              \
                }                                                                                          \
            }                                                                                              \
            for (int b = 0; b < nb; b++) {                                                                 \
                y[(int64_t)(b0 + b) * N + n0] = R(m, _mm512_reduce_add_ps(a0[b]));                         \
                if (rows == 2) y[(int64_t)(b0 + b) * N + n0 + 1] = R(m, _mm512_reduce_add_ps(a1[b]));      \
            }                                                                                              \
        }                                                                                                  \
    }
static void gemm_bf16(const Model *m, const uint16_t *W, const uint16_t *x, float *y, int N, int K) {
    GEMM_BODY(uint16_t, 32, _mm512_loadu_si512, _mm512_maskz_loadu_epi16, DPBF16, MASK32)
}
static void gemm_f32(const Model *m, const float *W, const float *x, float *y, int N, int K) {
    GEMM_BODY(float, 16, _mm512_loadu_ps, _mm512_maskz_loadu_ps, FMA32, MASK16)
}

/* y (B, N) = R(x (B, K) · Wᵀ); bf16 GEMVs read x from m->xb (see prep) */
static void gemv(const Model *m, const void *W, const float *x, float *y, int N, int K) {
    if (m->B == 1) {
        if (m->bf) gemv_bf16(m, (const uint16_t *)W, m->xb, y, N, K);
        else gemv_f32(m, (const float *)W, x, y, N, K);
    } else {
        if (m->bf) gemm_bf16(m, (const uint16_t *)W, m->xb, y, N, K);
        else gemm_f32(m, (const float *)W, x, y, N, K);
    }
}

/* A decoder projection: the dense GEMV, or for an NF4 model kernels/nf4_cpu.py's fused dequantize-GEMV (the one
   the torch step runs, so the same sums), 16 output rows a task, then y rounded to the model dtype as the torch
   step's `.to(dtype)` does. */
static void proj(const Model *m, const void *W, const float *x, float *y, int N, int K) {
    if (!m->nf4) { gemv(m, W, x, y, N, K); return; }
    const NF4Desc *d = (const NF4Desc *)W;
    const int B = m->B, K2 = K / 2;
    #pragma omp single
    for (int b = 0; b < B; b++)
        for (int k = 0; k < K2; k++) {
            m->xe[(int64_t)b * K2 + k] = x[(int64_t)b * K + 2 * k];
            m->xo[(int64_t)b * K2 + k] = x[(int64_t)b * K + 2 * k + 1];
        }
    #pragma omp for schedule(static)
    for (int n0 = 0; n0 < N; n0 += 16) {
        const int n1 = n0 + 16 < N ? n0 + 16 : N;
        nf4_gemv(m->xe, m->xo, B, d->packed, d->absmax, d->code, d->ncode, d->nabs, d->offset, d->dq, d->bs,
                 d->nbs, N, K, n0, n1, y);
        for (int b = 0; b < B; b++)
            for (int n = n0; n < n1; n++) y[(int64_t)b * N + n] = R(m, y[(int64_t)b * N + n]);
    }
}

/* 16 values of a model-dtype array from index i (fewer when n < 16; the rest read as 0) as fp32 lanes */
static inline __m512 load16(const Model *m, const void *p, int64_t i, int n) {
    __mmask16 mk = MASK16(n);
    if (m->bf) return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, (const uint16_t *)p + i)), 16));
    return _mm512_maskz_loadu_ps(mk, (const float *)p + i);
}

/* every row: xn = R(w · R(x · rsqrt(mean(x²) + eps))); then xn becomes the GEMV input */
static void rmsnorm(const Model *m, const void *w, const float *x, float *xn) {
    for (int b = 0; b < m->B; b++) {
        const float *xr = x + (int64_t)b * m->C;
        float *yr = xn + (int64_t)b * m->C, ss = 0.f;
        for (int c = 0; c < m->C; c++) ss += xr[c] * xr[c];
        float r = 1.f / sqrtf(ss / m->C + m->eps);
        for (int c = 0; c < m->C; c++) yr[c] = R(m, ld(m, w, c) * R(m, xr[c] * r));
    }
    prep(m, xn, m->B * m->C);
}

static void rope(const Model *m, float *h, const void *cos, const void *sin) {  /* one head, in place */
    int half = m->rd / 2;
    float rot[m->rd];
    for (int d = 0; d < half; d++) { rot[d] = -h[d + half]; rot[d + half] = h[d]; }
    for (int d = 0; d < m->rd; d++) h[d] = R(m, R(m, h[d] * ld(m, cos, d)) + R(m, rot[d] * ld(m, sin, d)));
}

""" + cpu_decode_attention.SRC + r"""
/* logits (B, V) in the model dtype for tokens (B,) at positions (B,), written into cache slot `s` */
void decode_step(const Model *m, const int64_t *tokens, const int64_t *positions, int s, void *logits) {
    const int B = m->B, C = m->C, hs = m->hs, nh = m->nh, nkv = m->nkv, I = m->I;
    const int nqkv = (nh + 2 * nkv) * hs;
    for (int b = 0; b < B; b++) m->pos[(int64_t)b * m->smax + s] = positions[b];
    #pragma omp parallel num_threads(m->threads)
    {
        #pragma omp single
        {
            for (int b = 0; b < B; b++)
                for (int c = 0; c < C; c++) m->x[(int64_t)b * C + c] = ld(m, m->embed, tokens[b] * C + c);
            rmsnorm(m, m->in_norm[0], m->x, m->xn);
        }
        for (int l = 0; l < m->L; l++) {
            proj(m, m->qkv_w[l], m->xn, m->qkv, nqkv, C);
            #pragma omp single
            for (int b = 0; b < B; b++) {
                const int64_t t = positions[b] * m->rd;
                float *row = m->qkv + (int64_t)b * nqkv;
                for (int h = 0; h < nh + nkv; h++)
                    rope(m, row + (int64_t)h * hs, (const char *)m->cos + t * (m->bf ? 2 : 4),
                         (const char *)m->sin + t * (m->bf ? 2 : 4));
                for (int g = 0; g < nkv; g++) {
                    int64_t o = (((((int64_t)l * B + b) * nkv + g) * m->smax) + s) * hs;
                    for (int d = 0; d < hs; d++) {
                        st(m, m->k_cache, o + d, row[(int64_t)(nh + g) * hs + d]);
                        st(m, m->v_cache, o + d, row[(int64_t)(nh + nkv + g) * hs + d]);
                    }
                }
            }
            #pragma omp for schedule(static)
            for (int bh = 0; bh < B * nh; bh++)
                (m->bf ? attend_bf16 : attend)(m, l, bh / nh, bh % nh, s, positions[bh / nh]);
            #pragma omp single
            prep(m, m->att, B * nh * hs);
            proj(m, m->o_w[l], m->att, m->proj, C, nh * hs);
            #pragma omp single
            {
                for (int i = 0; i < B * C; i++) m->x[i] = R(m, m->x[i] + m->proj[i]);
                rmsnorm(m, m->post_norm[l], m->x, m->xn);
            }
            proj(m, m->gate_up_w[l], m->xn, m->gu, 2 * I, C);
            #pragma omp single
            {
                for (int b = 0; b < B; b++)                       /* mid = R(u · R(silu(g))) */
                    for (int i = 0; i < I; i += 16) {
                        __mmask16 mk = MASK16(I - i);
                        const float *g = m->gu + (int64_t)b * 2 * I + i, *u = g + I;
                        __m512 gv = _mm512_maskz_loadu_ps(mk, g);
                        __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
                        float sl[16], out[16];
                        _mm512_storeu_ps(sl, _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
                        for (int t = 0; t < 16 && i + t < I; t++) out[t] = R(m, u[t] * R(m, sl[t]));
                        _mm512_mask_storeu_ps(m->mid + (int64_t)b * I + i, mk, _mm512_loadu_ps(out));
                    }
                prep(m, m->mid, B * I);
            }
            proj(m, m->down_w[l], m->mid, m->proj, C, I);
            #pragma omp single
            {
                for (int i = 0; i < B * C; i++) m->x[i] = R(m, m->x[i] + m->proj[i]);
                rmsnorm(m, l + 1 < m->L ? m->in_norm[l + 1] : m->final_norm, m->x, m->xn);
            }
        }
        gemv(m, m->lm_head, m->xn, m->scores, m->V, C);
        #pragma omp for schedule(static)
        for (int64_t v = 0; v < (int64_t)B * m->V; v++) st(m, logits, v, m->scores[v]);
    }
}
"""

_P = ctypes.c_void_p


class _Model(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_int) for n in ("B", "L", "C", "nh", "nkv", "hs", "rd", "I", "V", "smax", "window",
                                             "bf", "threads")]
                + [("eps", ctypes.c_float), ("scale", ctypes.c_float)]
                + [(n, ctypes.POINTER(_P)) for n in ("in_norm", "qkv_w", "o_w", "post_norm", "gate_up_w", "down_w")]
                + [(n, _P) for n in ("final_norm", "lm_head", "embed", "cos", "sin", "k_cache", "v_cache", "pos",
                                     "x", "xn", "qkv", "att", "proj", "gu", "mid", "scores", "xb")]
                + [("nf4", ctypes.c_int), ("xe", _P), ("xo", _P)])


MAX_BATCH = 16                           # rows one step takes natively (weights stream once for all of them)
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable (the torch step runs)
enabled = True                           # a switch for A/B measurements (bench/bench_generate.py --ablations)


def _load() -> ctypes.CDLL | None:
    global _lib
    if _lib is False:
        _lib = native.build("cpu_decode", _SRC, need=("avx512f", "avx512_bf16"))
        if _lib is not None:
            _lib.decode_step.argtypes = [ctypes.POINTER(_Model), _P, _P, ctypes.c_int, _P]
            _lib.decode_step.restype = None
    return _lib


def _dense(module: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    """The weight of a plain linear (cpu_linear.is_plain) in `dtype`, contiguous, on the CPU; else None."""
    if not is_plain(module):
        return None
    w = module.weight
    return w if w.dtype == dtype and w.device.type == "cpu" and w.is_contiguous() else None


class NativeDecode:
    """`NativeDecode.create(model, cache, cos, sin)` → a callable `(tokens (B,), positions (B,)) -> logits (B, V)`,
    or None when the model or cache is outside what the C step covers (then the torch step runs). Writes slot
    `cache.length` of every row; the caller advances `cache.length`."""

    @classmethod
    def create(cls, model: nn.Module, cache, cos: torch.Tensor, sin: torch.Tensor) -> "NativeDecode | None":
        dtype = model.dtype
        if not enabled or dtype not in (torch.float32, torch.bfloat16) or cache.k.shape[1] > MAX_BATCH \
                or cache.k.dtype != dtype or cache.k.device.type != "cpu" or _load() is None:
            return None
        layers = list(model.model.layers)
        sites = [[getattr(getattr(layer, part), name) for layer in layers]
                 for part, name in (("self_attn", "qkv_proj"), ("self_attn", "o_proj"),
                                    ("mlp", "gate_up_proj"), ("mlp", "down_proj"))]
        mats = [[_dense(mod, dtype) for mod in ms] for ms in sites]
        if any(w is None for ws in mats for w in ws) and cache.k.shape[1] <= nf4_cpu.GEMV_MAX_M:
            mats = [[nf4_cpu.decode_weight(mod) for mod in ms] for ms in sites]   # an NF4 model (all four projections)
        lm_head = _dense(model.lm_head, dtype)
        norms = [layer.input_layernorm for layer in layers] + [layer.post_attention_layernorm for layer in layers] \
            + [model.model.norm]
        embed = model.model.embed_tokens.weight
        flat = [embed, cache.pos, cache.k, cache.v] + [n.weight for n in norms]  # read through raw pointers
        if any(w is None for ws in mats for w in ws) or lm_head is None \
                or any(type(n).__name__ != "RMSNorm" or n.weight.dtype != dtype for n in norms) \
                or embed.dtype != dtype or not all(t.is_contiguous() for t in flat):
            return None
        return cls(model, cache, mats, lm_head, cos, sin)

    def __init__(self, model, cache, mats, lm_head, cos, sin) -> None:
        cfg, dtype = model.config, model.dtype
        layers = list(model.model.layers)
        f32 = lambda n: torch.empty(n, dtype=torch.float32)  # noqa: E731
        C, hs, nh, nkv, inter = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, \
            cfg.intermediate_size
        self.cos, self.sin = cos.to(dtype).contiguous(), sin.to(dtype).contiguous()   # (S_max, rd)
        B, kmax = cache.k.shape[1], max(C, inter, nh * hs)    # kmax: the widest projection input
        self.scratch = dict(x=f32(B * C), xn=f32(B * C), qkv=f32(B * (nh + 2 * nkv) * hs), att=f32(B * nh * hs),
                            proj=f32(B * C), gu=f32(B * 2 * inter), mid=f32(B * inter),
                            scores=f32(B * max(nh * cache.max_len, cfg.vocab_size)),
                            xb=torch.empty(B * kmax, dtype=torch.int16))
        nf4 = isinstance(mats[0][0], NF4Weight)
        if nf4:  # the GEMV input split into even / odd columns
            self.scratch.update(xe=f32(B * kmax // 2), xo=f32(B * kmax // 2))
        ptrs = lambda ts: (_P * len(ts))(*[t.data_ptr() for t in ts])  # noqa: E731
        # NF4: each projection pointer points at its NF4Desc (kept alive in self._descs)
        self._descs = [[nf4_cpu.Desc.of(w) for w in ws] for ws in mats] if nf4 else None
        self._arrays = ([(_P * len(ds))(*[ctypes.addressof(d) for d in ds]) for ds in self._descs] if nf4
                        else [ptrs(ws) for ws in mats])
        self._arrays += [ptrs([l.input_layernorm.weight for l in layers]),
                         ptrs([l.post_attention_layernorm.weight for l in layers])]
        qkv, o, gu, down, in_norm, post_norm = self._arrays
        embed = model.model.embed_tokens.weight
        self._keep = (model, cache, mats, lm_head, embed)  # every pointer below stays valid while this lives
        self.m = _Model(B=B, L=len(layers), C=C, nh=nh, nkv=nkv, hs=hs, rd=cfg.rotary_dim, I=inter,
                        V=cfg.vocab_size, smax=cache.max_len, window=cfg.sliding_window or 0,
                        bf=int(dtype == torch.bfloat16), threads=torch.get_num_threads(), eps=cfg.rms_norm_eps,
                        scale=hs ** -0.5, in_norm=in_norm, qkv_w=qkv, o_w=o, post_norm=post_norm, gate_up_w=gu,
                        down_w=down, final_norm=model.model.norm.weight.data_ptr(), lm_head=lm_head.data_ptr(),
                        embed=embed.data_ptr(), cos=self.cos.data_ptr(), sin=self.sin.data_ptr(),
                        k_cache=cache.k.data_ptr(), v_cache=cache.v.data_ptr(), pos=cache.pos.data_ptr(),
                        nf4=int(nf4), **{k: t.data_ptr() for k, t in self.scratch.items()})
        self.cache, self.dtype, self.vocab, self.batch = cache, dtype, cfg.vocab_size, B

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions (B,) → logits (B, V); every row's K/V written into slot cache.length."""
        self.m.threads = torch.get_num_threads()
        tokens = tokens.to(torch.int64).contiguous()                                      # (B,)
        positions = positions.to(torch.int64).contiguous()                                # (B,)
        logits = torch.empty(self.batch, self.vocab, dtype=self.dtype)                    # (B, V)
        _lib.decode_step(ctypes.byref(self.m), tokens.data_ptr(), positions.data_ptr(), self.cache.length,
                         logits.data_ptr())
        return logits
