"""Causal attention for a prefill on the CPU, in C: y = softmax(q·kᵀ·hs^-½ + causal) · v, fp32 or bf16.

torch's CPU flash-attention kernel (what `scaled_dot_product_attention(is_causal=True)` runs) spends ~3.5 ms per
layer on the default model's 512-token prefill, a third of the whole prefill: it computes full query × key blocks
and exponentiates the masked half too. This kernel does only the causal triangle, per query row:

    s_j = (q · k_j) · hs^-½   for j ≤ i            16 keys x 4 query rows at a time: K is transposed once per
                                                   KV head, so each load of 16 keys feeds four broadcast-FMAs
    p_j = exp(s_j − max_j s) / Σ_j exp(…)         fp32, kernels/native.py's vector exp (≤ 2 ulp)
    y_i = Σ_j p_j v_j                              fp32, rounded once to the model dtype

Everything is fp32 inside (bf16 inputs are widened exactly), so bf16 results are at least as close to exact as
SDPA's, which rounds the probabilities to bf16 before p·v. Grouped-query heads read their KV head (h // rep)
in place, and the output is written as (B, T, nh·hs), the layout o_proj takes, so no transpose copy follows.
Work splits over (row, head, 32-query block) tasks, dynamically scheduled (later blocks have more keys).

Only what a fresh prefill needs: causal from slot 0, no padding, window or packing masks (those keep SDPA), no
autograd (training keeps SDPA), CPU tensors; without a compiler, SDPA runs.

Legend: B rows, T tokens, nh/nkv query/KV heads, hs head dim.
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
static inline void st(void *p, int64_t i, int bf, float v) {
    if (!bf) { ((float *)p)[i] = v; return; }
    uint32_t u; memcpy(&u, &v, 4);
    ((uint16_t *)p)[i] = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0 : (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* q (B, nh, T, hs), k and v (B, nkv, T, hs) with any strides (in elements: sb, sh, st; the last dim is dense),
   out (B, T, nh, hs) dense. kt: scratch B*nkv*hs*Tp floats (K transposed, Tp = T rounded up to 16), vf: scratch
   B*nkv*T*hs floats (V widened), rows: scratch threads*4*Tp floats. */
void causal_attention(const void *q, const int64_t *sq, const void *k, const int64_t *sk, const void *v,
                      const int64_t *sv, void *out, float *kt, float *vf, float *rows, int B, int nh, int nkv,
                      int T, int hs, float scale, int bf, int threads) {
    const int Tp = (T + 15) / 16 * 16, rep = nh / nkv, nqb = (T + QBLOCK - 1) / QBLOCK;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int bg = 0; bg < B * nkv; bg++) {          /* widen V, transpose K (pad keys are never read) */
            int b = bg / nkv, g = bg % nkv;
            float *ktg = kt + (int64_t)bg * hs * Tp, *vg = vf + (int64_t)bg * T * hs;
            for (int t = 0; t < T; t++)
                for (int d = 0; d < hs; d++) {
                    ktg[(int64_t)d * Tp + t] = ld(k, b * sk[0] + g * sk[1] + t * sk[2] + d, bf);
                    vg[(int64_t)t * hs + d] = ld(v, b * sv[0] + g * sv[1] + t * sv[2] + d, bf);
                }
        }
        float *srow = rows + (int64_t)omp_get_thread_num() * 4 * Tp;   /* 4 rows of scores */
        #pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < B * nh * nqb; task++) {
            int qb = nqb - 1 - task % nqb, h = (task / nqb) % nh, b = task / (nqb * nh);   /* biggest first */
            int bg = b * nkv + h / rep;
            const float *ktg = kt + (int64_t)bg * hs * Tp, *vg = vf + (int64_t)bg * T * hs;
            for (int i0 = qb * QBLOCK; i0 < T && i0 < (qb + 1) * QBLOCK; i0 += 4) {
                const int nr = T - i0 < 4 ? T - i0 : 4, last = i0 + nr - 1;   /* rows i0..last */
                float qv[4][hs];
                for (int r = 0; r < 4; r++)
                    for (int d = 0; d < hs; d++)
                        qv[r][d] = r < nr ? ld(q, b * sq[0] + h * sq[1] + (i0 + r) * sq[2] + d, bf) * scale : 0.f;
                /* scores: four rows x 16 keys per step, one load of K^T feeding four FMAs */
                __m512 mx[4];
                for (int r = 0; r < 4; r++) mx[r] = _mm512_set1_ps(-INFINITY);
                for (int j0 = 0; j0 <= last; j0 += 16) {
                    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
                    for (int d = 0; d < hs; d++) {
                        __m512 kd = _mm512_loadu_ps(ktg + (int64_t)d * Tp + j0);
                        s0 = _mm512_fmadd_ps(_mm512_set1_ps(qv[0][d]), kd, s0);
                        s1 = _mm512_fmadd_ps(_mm512_set1_ps(qv[1][d]), kd, s1);
                        s2 = _mm512_fmadd_ps(_mm512_set1_ps(qv[2][d]), kd, s2);
                        s3 = _mm512_fmadd_ps(_mm512_set1_ps(qv[3][d]), kd, s3);
                    }
                    __m512 sr[4] = {s0, s1, s2, s3};
                    for (int r = 0; r < 4; r++) {      /* key j visible to row i0 + r when j <= i0 + r */
                        int n = i0 + r - j0 + 1;
                        __mmask16 ok = n >= 16 ? 0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1);
                        __m512 sv_ = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), ok, sr[r]);
                        _mm512_storeu_ps(srow + r * Tp + j0, sv_);
                        mx[r] = _mm512_max_ps(mx[r], sv_);
                    }
                }
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
                    for (int j = 0; j <= last; j++) {
                        const float *vj = vg + (int64_t)j * hs + d0;
                        __m512 p0 = _mm512_set1_ps(srow[j]), p1 = _mm512_set1_ps(srow[Tp + j]),
                               p2 = _mm512_set1_ps(srow[2 * Tp + j]), p3 = _mm512_set1_ps(srow[3 * Tp + j]);
                        for (int c = 0; c < 4; c++) {
                            if (c * 16 >= nd) break;
                            __mmask16 mk = nd - c * 16 >= 16 ? 0xffff : (__mmask16)((1u << (nd - c * 16)) - 1);
                            __m512 vv = _mm512_maskz_loadu_ps(mk, vj + c * 16);
                            acc[0][c] = _mm512_fmadd_ps(p0, vv, acc[0][c]);
                            acc[1][c] = _mm512_fmadd_ps(p1, vv, acc[1][c]);
                            acc[2][c] = _mm512_fmadd_ps(p2, vv, acc[2][c]);
                            acc[3][c] = _mm512_fmadd_ps(p3, vv, acc[3][c]);
                        }
                    }
                    for (int r = 0; r < nr; r++) {
                        float o16[64];
                        for (int c = 0; c < 4; c++) _mm512_storeu_ps(o16 + c * 16, acc[r][c]);
                        int64_t o = (((int64_t)b * T + i0 + r) * nh + h) * hs + d0;
                        for (int d = 0; d < nd; d++) st(out, o + d, bf, o16[d] * inv[r]);
                    }
                }
            }
        }
    }
}
"""

_lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable (SDPA runs)
enabled = True                           # a switch for A/B measurements (bench/bench_generate.py --ablations)


def _load() -> ctypes.CDLL | None:
    global _lib
    if _lib is False:
        _lib = native.build("cpu_attention", _SRC, need=("avx512f",))
        if _lib is not None:
            P, I = ctypes.c_void_p, ctypes.c_int
            _lib.causal_attention.argtypes = [P] * 10 + [I] * 5 + [ctypes.c_float, I, I]
            _lib.causal_attention.restype = None
            _lib.exp_f32.argtypes = [P, I]
    return _lib


def supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    return (enabled and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
            and k.dtype == q.dtype and q.shape[2] == k.shape[2] and q.stride(-1) == 1 and k.stride(-1) == 1
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)) and _load() is not None)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, nh, T, hs), k, v (B, nkv, T, hs) → (B, T, nh·hs): causal softmax attention, scale hs^-½.
    SDPA (and a transpose) when `supports` says no."""
    B, nh, T, hs = q.shape
    nkv = k.shape[1]
    if not (supports(q, k) and v.stride(-1) == 1 and v.dtype == q.dtype):
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nkv != nh)  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, nh * hs)                                    # (B, T, nh·hs)
    Tp, threads = -(-T // 16) * 16, torch.get_num_threads()
    out = torch.empty(B, T, nh * hs, dtype=q.dtype)                                         # (B, T, nh·hs)
    kt = torch.empty(B * nkv * hs * Tp)                                                     # K transposed
    vf = torch.empty(B * nkv * T * hs)                                                      # V widened
    rows = torch.empty(threads * 4 * Tp)
    strides = [torch.tensor(t.stride()[:3], dtype=torch.int64) for t in (q, k, v)]
    _lib.causal_attention(q.data_ptr(), strides[0].data_ptr(), k.data_ptr(), strides[1].data_ptr(), v.data_ptr(),
                          strides[2].data_ptr(), out.data_ptr(), kt.data_ptr(), vf.data_ptr(), rows.data_ptr(),
                          B, nh, nkv, T, hs, hs ** -0.5, int(q.dtype == torch.bfloat16), threads)
    return out


def causal_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same math in fp64 torch: (B, nh, T, hs) → (B, T, nh·hs) float64."""
    B, nh, T, hs = q.shape
    rep = nh // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)        # (B, nh, T, hs)
    s = q.double() @ k.transpose(-1, -2) * hs ** -0.5                                       # (B, nh, T, T)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, nh * hs)                       # (B, T, nh·hs)
