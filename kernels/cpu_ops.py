"""RMSNorm and SwiGLU for CPU inference, each one pass in C instead of five to seven torch ops.

In a 512-token bf16 prefill of the default model, the torch forms of these two (upcast, pow, mean, rsqrt, mul,
downcast, mul; chunk, silu, mul) cost ~55 ms of ~230: every op streams the whole (T, C) or (T, I) activation
through memory, and the bf16 ones convert on each pass. Fused, each element is read once and written once:

    RMSNorm   y = R(w · R(x · rsqrt(mean(x²) + eps)))      statistics in fp32, transformers' order and roundings
    SwiGLU    y = R(u · R(g · 1 / (1 + exp(−g))))          (g, u) = the two halves of gate_up; exp: native.py's

R(v) rounds to the activation dtype (identity for fp32, round-to-nearest-even for bf16), at the places torch
rounds, so the results equal the torch forms up to summation order (the mean) and exp's last ulp
(tests/test_cpu_ops.py). Rows split over the OpenMP threads. Training and anything else keep the torch forms:
these functions fall back to them under autograd, on other devices and dtypes, or without a compiler.

Legend: T rows (tokens), C hidden size, I intermediate size.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from phiforge.kernels import native

_SRC = native.VECMATH + r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

/* 16 lanes of fp32 or bf16 (widened exactly) and back; bf16 stores round to nearest even like torch */
static inline __m512 load16(const void *p, int64_t i, int bf, __mmask16 mk) {
    if (!bf) return _mm512_maskz_loadu_ps(mk, (const float *)p + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
        _mm256_maskz_loadu_epi16(mk, (const uint16_t *)p + i)), 16));
}
static inline void store16(void *p, int64_t i, int bf, __m512 v, __mmask16 mk) {   /* v already R()-rounded */
    if (!bf) { _mm512_mask_storeu_ps((float *)p + i, mk, v); return; }
    __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16));
    _mm256_mask_storeu_epi16((uint16_t *)p + i, mk, h);
}
#define MASK(n) ((n) >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n)) - 1))

/* x, y (T, C) rows contiguous; w (C,) */
void rms_norm(const void *x, const void *w, void *y, int64_t T, int C, float eps, int bf, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        __m512 ss = _mm512_setzero_ps();
        for (int c = 0; c < C; c += 16) {
            __m512 v = load16(x, t * C + c, bf, MASK(C - c));
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        __m512 r = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(ss) / C + eps));
        for (int c = 0; c < C; c += 16) {
            __mmask16 mk = MASK(C - c);
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
            __mmask16 mk = MASK(I - i);
            __m512 g = load16(gu, t * 2 * I + i, bf, mk), u = load16(gu, t * 2 * I + I + i, bf, mk);
            __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
            __m512 s = round16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)), bf);
            store16(y, t * I + i, bf, round16(_mm512_mul_ps(u, s), bf), mk);
        }
    }
}
"""

_lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable (the torch forms run)
enabled = True                           # a switch for A/B measurements


def _load() -> ctypes.CDLL | None:
    global _lib
    if _lib is False:
        _lib = native.build("cpu_ops", _SRC, need=("avx512f", "avx512bw"))
        if _lib is not None:
            P, L, I, Fl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
            _lib.rms_norm.argtypes = [P, P, P, L, I, Fl, I, I]
            _lib.swiglu.argtypes = [P, P, L, I, I, I]
    return _lib


def _native(*ts: torch.Tensor) -> bool:
    x = ts[0]
    return (enabled and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and all(t.dtype == x.dtype and t.is_contiguous() for t in ts)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)) and _load() is not None)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Statistics in fp32, then back to the input dtype *before* the weight: transformers' order, bit for bit.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., C), weight (C,) → (..., C): native for fp32/bf16 CPU inference, else `rms_norm_ref`."""
    if not _native(x, weight):
        return rms_norm_ref(x, weight, eps)
    y = torch.empty_like(x)
    C = x.shape[-1]
    _lib.rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // C, C, eps,
                  int(x.dtype == torch.bfloat16), torch.get_num_threads())
    return y


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)  # (..., I) each; the gate is the first half
    return up * F.silu(gate)             # Phi3MLP's formula


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2I) → up · silu(gate) (..., I): native for fp32/bf16 CPU inference, else `swiglu_ref`."""
    if not _native(gate_up):
        return swiglu_ref(gate_up)
    inter = gate_up.shape[-1] // 2
    y = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype)
    _lib.swiglu(gate_up.data_ptr(), y.data_ptr(), gate_up.numel() // (2 * inter), inter,
                int(gate_up.dtype == torch.bfloat16), torch.get_num_threads())
    return y
