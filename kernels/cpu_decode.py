"""The whole batch-1 decode step of a dense Phi-3 in one native call: embedding → 30 layers → lm_head.

At batch 1 a decode step reads every weight once (270 MB for the default model in bf16) and does almost nothing
else, so its speed limit is memory bandwidth. The same GEMV called from Python once per projection reaches ~30
GB/s here (121 calls a token, each paying ctypes, allocation and an OpenMP fork/join), and the ~1,000 small torch
ops between them (norms, RoPE, attention over one query, SwiGLU) cost as much as the GEMVs themselves. This file
does the step as one C function with one OpenMP parallel region: the GEMVs split rows over the threads, attention
splits heads, and the small vector ops run on one thread between barriers. Python calls it once per token.

It computes exactly what `DecodeStep` (engine/decode.py) computes, rounding where torch rounds. With R(v) = v
rounded to the model dtype (identity for fp32, round-to-nearest-even for bf16), per layer:

    h   = x · rsqrt(mean(x²) + eps)  (fp32);  xn = R(w_norm · R(h))            RMSNorm, transformers' order
    qkv = R(xn · W_qkvᵀ)                                                     fp32 accumulation, one rounding
    q,k = R(R(q·cos) + R(rot(q)·sin)) on the first rd dims                   rot(q) = (-q[rd/2:], q[:rd/2])
    s_j = R(q · k_j) · hs^-½  (+ -inf for empty or out-of-window slots)     fp32 softmax, p = R(softmax(s))
    y   = R(Σ_j p_j v_j);  x = R(x + R(y · W_oᵀ))
    x   = R(x + R(R(R(silu(g)) · u) · W_downᵀ)),  (g, u) = R(xn₂ · W_gate_upᵀ)

Only the summation order differs from torch's kernels, so logits agree to rounding (tests/test_cpu_decode.py
compares them with `model.forward` and with the torch decode step). Dense fp32/bf16 weights only: an NF4 or
LoRA projection, a batch, or a missing compiler keeps the torch step.

Legend: C hidden, nh/nkv query/KV heads, hs head dim, rd rotary dims, I intermediate, V vocabulary, S cache slots.
"""
from __future__ import annotations

import ctypes

import torch
from torch import nn

from phiforge.kernels import native
from phiforge.kernels.cpu_linear import Linear

_SRC = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    int L, C, nh, nkv, hs, rd, I, V, smax, window, bf, threads;
    float eps, scale;
    const void **in_norm, **qkv_w, **o_w, **post_norm, **gate_up_w, **down_w;   /* L pointers each */
    const void *final_norm, *lm_head, *embed, *cos, *sin;                       /* cos/sin: (smax, rd) */
    void *k_cache, *v_cache;                                                    /* (L, 1, nkv, smax, hs) */
    int64_t *pos;                                                               /* (smax,) */
    float *x, *xn, *qkv, *att, *proj, *gu, *mid, *scores;                       /* fp32 scratch */
    uint16_t *xb;                                                               /* bf16 GEMV input */
} Model;

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
   it, measured 15-50% slower). Ends with the barrier of `omp for`. One macro body for both dtypes: LOAD gives one vector, FMA accumulates in fp32. */
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
static void gemv(const Model *m, const void *W, const float *x, float *y, int N, int K) {
    if (m->bf) gemv_bf16(m, (const uint16_t *)W, m->xb, y, N, K);
    else gemv_f32(m, (const float *)W, x, y, N, K);
}

/* 16 values of a model-dtype array from index i (fewer when n < 16; the rest read as 0) as fp32 lanes */
static inline __m512 load16(const Model *m, const void *p, int64_t i, int n) {
    __mmask16 mk = MASK16(n);
    if (m->bf) return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, (const uint16_t *)p + i)), 16));
    return _mm512_maskz_loadu_ps(mk, (const float *)p + i);
}

/* xn = R(w · R(x · rsqrt(mean(x²) + eps))), then xn becomes the GEMV input */
static void rmsnorm(const Model *m, const void *w, const float *x, float *xn) {
    float ss = 0.f;
    for (int c = 0; c < m->C; c++) ss += x[c] * x[c];
    float r = 1.f / sqrtf(ss / m->C + m->eps);
    for (int c = 0; c < m->C; c++) xn[c] = R(m, ld(m, w, c) * R(m, x[c] * r));
    prep(m, xn, m->C);
}

static void rope(const Model *m, float *h, const void *cos, const void *sin) {  /* one head, in place */
    int half = m->rd / 2;
    float rot[m->rd];
    for (int d = 0; d < half; d++) { rot[d] = -h[d + half]; rot[d + half] = h[d]; }
    for (int d = 0; d < m->rd; d++) h[d] = R(m, R(m, h[d] * ld(m, cos, d)) + R(m, rot[d] * ld(m, sin, d)));
}

/* one query head h over slots 0..s: att[h] = R(Σ_j R(softmax(s)_j) v_j), 16 head dims per vector */
static void attend(const Model *m, int l, int h, int s, int64_t position) {
    int hs = m->hs, g = h / (m->nh / m->nkv);
    int64_t base = (((int64_t)l * m->nkv + g) * m->smax) * hs;
    const float *q = m->qkv + (int64_t)h * hs;
    float *sc = m->scores + (int64_t)h * m->smax, mx = -INFINITY;
    for (int j = 0; j <= s; j++) {
        int64_t kp = m->pos[j];
        if (kp < 0 || (m->window > 0 && position - kp >= m->window)) { sc[j] = -INFINITY; continue; }
        __m512 acc = _mm512_setzero_ps();
        for (int d = 0; d < hs; d += 16)
            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(MASK16(hs - d), q + d),
                                  load16(m, m->k_cache, base + (int64_t)j * hs + d, hs - d), acc);
        sc[j] = R(m, _mm512_reduce_add_ps(acc)) * m->scale;
        if (sc[j] > mx) mx = sc[j];
    }
    float sum = 0.f;
    for (int j = 0; j <= s; j++) { sc[j] = expf(sc[j] - mx); sum += sc[j]; }
    for (int d0 = 0; d0 < hs; d0 += 64) {            /* up to four accumulators of 16 dims in registers */
        int nd = hs - d0 < 64 ? hs - d0 : 64;
        __m512 o0 = _mm512_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
        for (int j = 0; j <= s; j++) {
            float p = R(m, sc[j] / sum);
            if (p == 0.f) continue;
            const int64_t o = base + (int64_t)j * hs + d0;
            __m512 pv = _mm512_set1_ps(p);
            o0 = _mm512_fmadd_ps(pv, load16(m, m->v_cache, o, nd), o0);
            if (nd > 16) o1 = _mm512_fmadd_ps(pv, load16(m, m->v_cache, o + 16, nd - 16), o1);
            if (nd > 32) o2 = _mm512_fmadd_ps(pv, load16(m, m->v_cache, o + 32, nd - 32), o2);
            if (nd > 48) o3 = _mm512_fmadd_ps(pv, load16(m, m->v_cache, o + 48, nd - 48), o3);
        }
        float out[64];
        _mm512_storeu_ps(out, o0); _mm512_storeu_ps(out + 16, o1);
        _mm512_storeu_ps(out + 32, o2); _mm512_storeu_ps(out + 48, o3);
        for (int d = 0; d < nd; d++) m->att[(int64_t)h * hs + d0 + d] = R(m, out[d]);
    }
}

/* logits (V,) in the model dtype for `token` at `position`, written into cache slot `s` */
void decode_step(const Model *m, int64_t token, int64_t position, int s, void *logits) {
    const int C = m->C, hs = m->hs, nh = m->nh, nkv = m->nkv, I = m->I;
    const int nqkv = (nh + 2 * nkv) * hs;
    m->pos[s] = position;
    #pragma omp parallel num_threads(m->threads)
    {
        #pragma omp single
        {
            for (int c = 0; c < C; c++) m->x[c] = ld(m, m->embed, token * C + c);
            rmsnorm(m, m->in_norm[0], m->x, m->xn);
        }
        for (int l = 0; l < m->L; l++) {
            gemv(m, m->qkv_w[l], m->xn, m->qkv, nqkv, C);
            #pragma omp single
            {
                const int64_t t = position * m->rd;
                for (int h = 0; h < nh + nkv; h++)
                    rope(m, m->qkv + (int64_t)h * hs, (const char *)m->cos + t * (m->bf ? 2 : 4),
                         (const char *)m->sin + t * (m->bf ? 2 : 4));
                for (int g = 0; g < nkv; g++) {
                    int64_t o = ((((int64_t)l * nkv + g) * m->smax) + s) * hs;
                    for (int d = 0; d < hs; d++) {
                        st(m, m->k_cache, o + d, m->qkv[(int64_t)(nh + g) * hs + d]);
                        st(m, m->v_cache, o + d, m->qkv[(int64_t)(nh + nkv + g) * hs + d]);
                    }
                }
            }
            #pragma omp for schedule(static)
            for (int h = 0; h < nh; h++) attend(m, l, h, s, position);
            #pragma omp single
            prep(m, m->att, nh * hs);
            gemv(m, m->o_w[l], m->att, m->proj, C, nh * hs);
            #pragma omp single
            {
                for (int c = 0; c < C; c++) m->x[c] = R(m, m->x[c] + m->proj[c]);
                rmsnorm(m, m->post_norm[l], m->x, m->xn);
            }
            gemv(m, m->gate_up_w[l], m->xn, m->gu, 2 * I, C);
            #pragma omp single
            {
                for (int i = 0; i < I; i++) {
                    float g = m->gu[i];
                    m->mid[i] = R(m, m->gu[I + i] * R(m, g / (1.f + expf(-g))));
                }
                prep(m, m->mid, I);
            }
            gemv(m, m->down_w[l], m->mid, m->proj, C, I);
            #pragma omp single
            {
                for (int c = 0; c < C; c++) m->x[c] = R(m, m->x[c] + m->proj[c]);
                rmsnorm(m, l + 1 < m->L ? m->in_norm[l + 1] : m->final_norm, m->x, m->xn);
            }
        }
        gemv(m, m->lm_head, m->xn, m->scores, m->V, C);
        #pragma omp for schedule(static)
        for (int v = 0; v < m->V; v++) st(m, logits, v, m->scores[v]);
    }
}
"""

_P = ctypes.c_void_p


class _Model(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_int) for n in ("L", "C", "nh", "nkv", "hs", "rd", "I", "V", "smax", "window", "bf",
                                             "threads")]
                + [("eps", ctypes.c_float), ("scale", ctypes.c_float)]
                + [(n, ctypes.POINTER(_P)) for n in ("in_norm", "qkv_w", "o_w", "post_norm", "gate_up_w", "down_w")]
                + [(n, _P) for n in ("final_norm", "lm_head", "embed", "cos", "sin", "k_cache", "v_cache", "pos",
                                     "x", "xn", "qkv", "att", "proj", "gu", "mid", "scores", "xb")])


_lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable (the torch step runs)
enabled = True                           # a switch for A/B measurements (bench/bench_generate.py --ablations)


def _load() -> ctypes.CDLL | None:
    global _lib
    if _lib is False:
        _lib = native.build("cpu_decode", _SRC, need=("avx512f", "avx512_bf16"))
        if _lib is not None:
            _lib.decode_step.argtypes = [ctypes.POINTER(_Model), ctypes.c_int64, ctypes.c_int64, ctypes.c_int, _P]
            _lib.decode_step.restype = None
    return _lib


def _dense(module: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    """The weight of a plain linear (nn.Linear or its drop-in subclass, no bias, no hooks), else None."""
    w = getattr(module, "weight", None)
    plain = (type(module) in (nn.Linear, Linear) and module.bias is None and not module._forward_hooks
             and not module._forward_pre_hooks)
    ok = plain and w is not None and w.dtype == dtype and w.device.type == "cpu" and w.is_contiguous()
    return w if ok else None


class NativeDecode:
    """`NativeDecode.create(model, cache)` → a callable `(token, position) -> logits (1, V)`, or None when the model
    or cache is outside what the C step covers (then the torch step runs). Writes slot `cache.length`; the caller
    advances `cache.length`."""

    @classmethod
    def create(cls, model: nn.Module, cache, cos: torch.Tensor, sin: torch.Tensor) -> "NativeDecode | None":
        cfg, dtype = model.config, model.dtype
        if not enabled or dtype not in (torch.float32, torch.bfloat16) or cache.k.shape[1] != 1 \
                or cache.k.dtype != dtype or cache.k.device.type != "cpu" or _load() is None:
            return None
        layers = list(model.model.layers)
        mats = [[_dense(getattr(getattr(layer, part), name), dtype) for layer in layers]
                for part, name in (("self_attn", "qkv_proj"), ("self_attn", "o_proj"),
                                   ("mlp", "gate_up_proj"), ("mlp", "down_proj"))]
        lm_head = _dense(model.lm_head, dtype)
        norms = [layer.input_layernorm for layer in layers] + [layer.post_attention_layernorm for layer in layers]
        if any(w is None for ws in mats for w in ws) or lm_head is None \
                or any(type(n).__name__ != "RMSNorm" or n.weight.dtype != dtype for n in norms + [model.model.norm]):
            return None
        return cls(model, cache, mats, lm_head, cos, sin)

    def __init__(self, model, cache, mats, lm_head, cos, sin) -> None:
        cfg, dtype = model.config, model.dtype
        layers = list(model.model.layers)
        f32 = lambda n: torch.empty(n, dtype=torch.float32)  # noqa: E731
        C, hs, nh, nkv, inter = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, \
            cfg.intermediate_size
        self.cos, self.sin = cos.to(dtype).contiguous(), sin.to(dtype).contiguous()   # (S_max, rd)
        self.scratch = dict(x=f32(C), xn=f32(C), qkv=f32((nh + 2 * nkv) * hs), att=f32(nh * hs), proj=f32(C),
                            gu=f32(2 * inter), mid=f32(inter), scores=f32(max(nh * cache.max_len, cfg.vocab_size)),
                            xb=torch.empty(max(C, inter, nh * hs), dtype=torch.int16))
        ptrs = lambda ts: (_P * len(ts))(*[t.data_ptr() for t in ts])  # noqa: E731
        self._arrays = [ptrs(ws) for ws in mats] + [ptrs([l.input_layernorm.weight for l in layers]),
                                                    ptrs([l.post_attention_layernorm.weight for l in layers])]
        qkv, o, gu, down, in_norm, post_norm = self._arrays
        embed = model.model.embed_tokens.weight
        if embed.dtype != dtype or not embed.is_contiguous() or not cache.pos.is_contiguous():
            raise ValueError("native decode: embedding and cache positions must be contiguous, in the model dtype")
        self._keep = (model, cache, mats, lm_head, embed)  # every pointer below stays valid while this lives
        self.m = _Model(L=len(layers), C=C, nh=nh, nkv=nkv, hs=hs, rd=cfg.rotary_dim, I=inter,
                        V=cfg.vocab_size, smax=cache.max_len, window=cfg.sliding_window or 0,
                        bf=int(dtype == torch.bfloat16), threads=torch.get_num_threads(), eps=cfg.rms_norm_eps,
                        scale=hs ** -0.5, in_norm=in_norm, qkv_w=qkv, o_w=o, post_norm=post_norm, gate_up_w=gu,
                        down_w=down, final_norm=model.model.norm.weight.data_ptr(), lm_head=lm_head.data_ptr(),
                        embed=embed.data_ptr(), cos=self.cos.data_ptr(), sin=self.sin.data_ptr(),
                        k_cache=cache.k.data_ptr(), v_cache=cache.v.data_ptr(), pos=cache.pos.data_ptr(),
                        **{k: t.data_ptr() for k, t in self.scratch.items()})
        self.cache, self.dtype, self.vocab = cache, dtype, cfg.vocab_size

    def __call__(self, token: int, position: int) -> torch.Tensor:
        """logits (1, V) for one token at `position`, its K/V written into slot cache.length."""
        self.m.threads = torch.get_num_threads()
        logits = torch.empty(1, self.vocab, dtype=self.dtype)
        _lib.decode_step(ctypes.byref(self.m), token, position, self.cache.length, logits.data_ptr())
        return logits
