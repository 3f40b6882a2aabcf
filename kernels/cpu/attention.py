"""Causal attention for a prefill on the CPU, in C: y = softmax(q·kᵀ·hs^-½ + causal) · v, fp32 or bf16.

torch's CPU flash-attention kernel (what `scaled_dot_product_attention(is_causal=True)` runs) is a large share of a
prefill: it computes full query × key blocks and exponentiates the masked half too. This kernel does only the causal
triangle, four query rows at a time (bench/bench_cpu_kernels.py compares the two):

    s_j = (q_i · k_j) · hs^-½   for j ≤ S − T + i  (the query's own slot; S = T for a fresh prefill)
    p_j = exp(s_j − max_j s) / Σ_j exp(…)           fp32, csrc/simd.h's vector exp (≤ 2 ulp)
    y_i = Σ_j p_j v_j                                rounded once to the model dtype

fp32 (and bf16 with an odd head dim, or on a CPU without AVX512-BF16): everything in fp32 (bf16 widened exactly), K
transposed once per KV head, 4 query rows x 64 keys a tile (16 accumulators, each K load feeding four FMAs) on
AVX-512, 4 x 24 (12 accumulators) on AVX2, the same C for both widths (csrc/simd.h's vfloat). bf16: both products on
the CPU's bf16 dot-product instruction (_mm512_dpbf16_ps: a pair of bf16 products added into fp32), the way SDPA's
bf16 path rounds — scores in fp32 (bf16 products are exact in fp32), exp(s − max) rounded to bf16 for p·v, the sum
over the fp32 values; K packed as dim pairs, V as key pairs, the same tiles. The C is csrc/attention.c.

Grouped-query heads read their KV head (h // rep) in place, and the output is written as (B, T, nh·hs), the
layout o_proj takes, so no transpose copy follows. Work splits over (row, head, 32-query block) tasks, dynamically
scheduled (later blocks have more keys).

Keys may run ahead of the queries: with S keys and T ≤ S queries, query i sits at slot S − T + i and sees keys
0 … S − T + i, the triangle aligned bottom-right — a prefill chunk after cached tokens (a long prompt's later
chunks, a chat's next turn). Only causal masks: padding, window or packing masks keep SDPA, as do autograd
(training), other devices, and machines where the library cannot run (kernels/cpu/native.py says why).

Legend: B rows, T queries, S keys (≥ T), nh/nkv query/KV heads, hs head dim.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from phiforge.kernels.cpu import native

P, I = ctypes.c_void_p, ctypes.c_int
LIB = native.NativeLib("cpu_attention", "attention.c", tiers=("avx512bf16", "avx512", "avx2"), functions={
    "causal_attention": (None, [P] * 10 + [I] * 6 + [ctypes.c_float, I, I]),
    "exp_f32": (None, [P, I]),
    "has_dpbf16": (I, []),
    "causal_attention_bf16": (None, [P] * 11 + [I] * 6 + [ctypes.c_float, I], True),  # where has_dpbf16()
})


def supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
            and k.dtype == q.dtype and k.shape[2] >= q.shape[2] and q.stride(-1) == 1 and k.stride(-1) == 1
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)) and LIB.get() is not None)


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
    lib = LIB.get()
    Tp, threads = -(-S // 64) * 64, torch.get_num_threads()                                 # Tp: keys padded
    out = torch.empty(B, T, nh * hs, dtype=q.dtype)                                         # (B, T, nh·hs)
    strides = [torch.tensor(t.stride()[:3], dtype=torch.int64) for t in (q, k, v)]
    if q.dtype == torch.bfloat16 and hs % 2 == 0 and lib.has_dpbf16():
        kp = torch.empty(B * nkv * hs // 2 * Tp, dtype=torch.int32)                         # K as dim pairs
        vp = torch.empty(B * nkv * Tp // 2 * hs, dtype=torch.int32)                         # V as key pairs
        rows, prows = torch.empty(threads * 4 * Tp), torch.empty(threads * 4 * Tp, dtype=torch.bfloat16)
        lib.causal_attention_bf16(q.data_ptr(), strides[0].data_ptr(), k.data_ptr(), strides[1].data_ptr(),
                                  v.data_ptr(), strides[2].data_ptr(), out.data_ptr(), kp.data_ptr(), vp.data_ptr(),
                                  rows.data_ptr(), prows.data_ptr(), B, nh, nkv, T, S, hs, hs ** -0.5, threads)
        return out
    kt = torch.empty(B * nkv * hs * Tp)                                                     # K transposed
    vf = torch.empty(B * nkv * S * hs)                                                      # V widened
    rows = torch.empty(threads * 4 * Tp)
    lib.causal_attention(q.data_ptr(), strides[0].data_ptr(), k.data_ptr(), strides[1].data_ptr(), v.data_ptr(),
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
