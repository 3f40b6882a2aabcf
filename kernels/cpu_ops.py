"""RMSNorm, SwiGLU and RoPE for CPU inference, each one pass in C instead of four to seven torch ops.

In a 512-token bf16 prefill of the default model, the torch forms of these two (upcast, pow, mean, rsqrt, mul,
downcast, mul; chunk, silu, mul) cost ~55 ms of ~230: every op streams the whole (T, C) or (T, I) activation
through memory, and the bf16 ones convert on each pass. Fused, each element is read once and written once:

    RMSNorm   y = R(w · R(x · rsqrt(mean(x²) + eps)))      statistics in fp32, transformers' order and roundings
    SwiGLU    y = R(u · R(g · 1 / (1 + exp(−g))))          (g, u) = the two halves of gate_up; exp: native.py's
    RoPE      y = R(R(x·cos) + R(rot(x)·sin))              rot(x) = (−x₂, x₁) on the first rd dims, the rest
                                                           copied; written straight into a strided destination
                                                           (the KV cache). ~0.6 ms → ~0.03 ms a layer (q and k)

R(v) rounds to the activation dtype (identity for fp32, round-to-nearest-even for bf16), at the places torch
rounds, so the results equal the torch forms up to summation order (the mean) and exp's last ulp
(tests/kernels/test_cpu_ops.py; RoPE has no sum or exp, so it is bit-equal). Rows split over the OpenMP threads. Training
and anything else keep the torch forms: these functions fall back to them under autograd, on other devices and
dtypes, or without a compiler.

Legend: B batch, T rows (tokens), h heads, hs head dim, rd rotary dims, C hidden size, I intermediate size.
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
            __mmask16 mk = MASK(half - i);
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
            store16(y, yo + i, bf, load16(x, xo + i, bf, MASK(hs - i)), MASK(hs - i));
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
            _lib.rotary.argtypes = [P, L, L, L, P, P, P, L, L, L] + [I] * 7
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
    if tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} for x {tuple(x.shape)}: expected ({x.shape[-1]},)")
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
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu: gate_up {tuple(gate_up.shape)}: the last dim must be even (gate | up)")
    if not _native(gate_up):
        return swiglu_ref(gate_up)
    inter = gate_up.shape[-1] // 2
    y = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype)
    _lib.swiglu(gate_up.data_ptr(), y.data_ptr(), gate_up.numel() // (2 * inter), inter,
                int(gate_up.dtype == torch.bfloat16), torch.get_num_threads())
    return y


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, h, T, hs); cos/sin (B, T, rd). Rotates the first rd dims by halves, passes the rest through."""
    rd = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, rd)
    xr, xp = x[..., :rd], x[..., rd:]
    x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((xr * cos + rotated * sin, xp), dim=-1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, h, T, hs), cos/sin (B, T, rd) → RoPE(x) (B, h, T, hs), written into `out` when given (any strides
    with dense head dims, e.g. a KV-cache slice). Native for fp32/bf16 CPU inference, else `rotary_ref`."""
    if not (x.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape and cos.shape[0] in (1, x.shape[0])
            and cos.shape[1] == x.shape[2] and cos.shape[2] % 2 == 0 and cos.shape[2] <= x.shape[3]
            and (out is None or out.shape == x.shape)):
        raise ValueError(f"rotary: x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
                         f"{'' if out is None else f', out {tuple(out.shape)}'}: expected x (B, h, T, hs), cos and "
                         "sin (B or 1, T, rd) with rd even and <= hs, out shaped like x")
    B, H, T, hs = x.shape
    # anything else (a cache of another dtype, broadcast cos/sin, autograd) takes the torch form, and copy_
    # converts into `out` as an assignment would
    fits = (x.stride(-1) == 1 and cos.shape[:2] == (B, T) and x.dtype == cos.dtype
            and (out is None or (out.stride(-1) == 1 and out.dtype == x.dtype)))
    if not (fits and _native(cos, sin) and not (torch.is_grad_enabled() and x.requires_grad)):
        y = rotary_ref(x, cos, sin)
        return y if out is None else out.copy_(y)
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    _lib.rotary(x.data_ptr(), *x.stride()[:3], cos.data_ptr(), sin.data_ptr(), y.data_ptr(), *y.stride()[:3],
                B, H, T, hs, cos.shape[-1], int(x.dtype == torch.bfloat16), torch.get_num_threads())
    return y
