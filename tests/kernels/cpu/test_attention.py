"""The native causal prefill attention equals the fp64 reference at least as closely as SDPA does in the same dtype, at
every instruction-set tier this CPU runs (AVX-512 with and without BF16, AVX2), on odd shapes (T not a multiple of
4, 16 or 32; head dims below, between and above 64; GQA; strided K/V cache slices; key counts that end inside a
64-key tile; an odd head dim, which bf16 runs in the fp32 form; chunks after cached tokens), its vector exp matches
torch.exp, and it steps aside for autograd."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from phiforge.kernels.cpu import attention as cpu_attention
from phiforge.kernels.cpu.attention import causal_attention, causal_attention_ref

LIB = cpu_attention.LIB  # tests/kernels/conftest.py: every test runs at each tier; skipped only where the CPU cannot


def test_library_builds(tier):
    status = LIB.status()
    assert status.state == "active" and status.detail == tier, str(status)


def _sdpa(q, k, v):
    B, nh, T, hs = q.shape
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != nh)
    return y.transpose(1, 2).reshape(B, T, nh * hs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,nh,nkv,T,hs", [(1, 9, 3, 70, 64), (2, 4, 4, 37, 8), (1, 6, 2, 1, 96), (2, 2, 1, 33, 80),
                                           (1, 3, 3, 130, 128), (1, 4, 2, 300, 64), (1, 2, 1, 45, 7)])
def test_matches_reference_like_sdpa(dtype, B, nh, nkv, T, hs):
    g = torch.Generator().manual_seed(T * hs + nh)
    q = torch.randn(B, nh, T, hs, generator=g).to(dtype)
    # K/V as slices of a bigger cache (B, nkv, S, hs), the way a prefill into a KV cache passes them
    cache = torch.randn(2, B, nkv, T + 5, hs, generator=g).to(dtype)
    k, v = cache[0, :, :, :T], cache[1, :, :, :T]
    ref = causal_attention_ref(q, k, v)
    with torch.inference_mode():
        got = causal_attention(q, k, v)
        sdpa = _sdpa(q, k, v)
    assert got.shape == (B, T, nh * hs) and got.dtype == dtype
    budget = (sdpa.double() - ref).abs().max().item()
    assert (got.double() - ref).abs().max().item() <= 1.5 * budget + (1e-6 if dtype == torch.float32 else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,nh,nkv,T,start,hs", [(1, 9, 3, 37, 64, 64), (2, 4, 2, 5, 70, 32), (1, 2, 1, 1, 129, 64),
                                                 (1, 3, 3, 70, 3, 96), (1, 2, 2, 9, 40, 7)])
def test_chunk_after_cached_tokens(dtype, B, nh, nkv, T, start, hs):
    """A prefill chunk (or one decode row) after `start` cached tokens: query i at slot start + i sees keys
    0 … start + i (the triangle aligned bottom-right), against the fp64 reference and SDPA with that mask."""
    g = torch.Generator().manual_seed(start * 7 + T)
    S = start + T
    q = torch.randn(B, nh, T, hs, generator=g).to(dtype)
    cache = torch.randn(2, B, nkv, S + 3, hs, generator=g).to(dtype)
    k, v = cache[0, :, :, :S], cache[1, :, :, :S]
    ref = causal_attention_ref(q, k, v)
    mask = torch.ones(T, S, dtype=torch.bool).tril(start)
    with torch.inference_mode():
        got = causal_attention(q, k, v)
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nkv != nh)
    sdpa = sdpa.transpose(1, 2).reshape(B, T, nh * hs)
    budget = (sdpa.double() - ref).abs().max().item()
    assert (got.double() - ref).abs().max().item() <= 1.5 * budget + (1e-6 if dtype == torch.float32 else 0)
    fallback = causal_attention(q.requires_grad_(), k, v)        # autograd: the SDPA form of the same alignment
    assert (fallback.double() - ref).abs().max().item() <= 1.5 * budget + 1e-6


def test_vector_exp_matches_torch():
    """csrc/simd.h's exp512, shared by the attention softmax and the SiLU kernel."""
    x = torch.cat([torch.linspace(-100, 88, 20_001), torch.tensor([-87.5, -86.9, -1e-8, 0.0, float("-inf")])])
    got = x.clone()
    cpu_attention.LIB.get().exp_f32(got.data_ptr(), got.numel())
    ref = x.double().exp()
    ulp = torch.finfo(torch.float32).eps
    assert ((got.double() - ref).abs() <= 2 * ulp * ref + 1e-37).all()     # ≤ 2 ulp; underflow to 0 below -87
    assert got[-1] == 0 and got[-2] == 1
    edge = torch.tensor([89.0, float("inf"), float("nan")])
    cpu_attention.LIB.get().exp_f32(edge.data_ptr(), 3)
    assert edge[0] == float("inf") and edge[1] == float("inf") and edge[2].isnan()


def test_autograd_and_other_devices_take_sdpa():
    q = torch.randn(1, 2, 5, 16, requires_grad=True)
    k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    assert not cpu_attention.supports(q, k)
    y = causal_attention(q, k, v)
    y.sum().backward()                                   # SDPA's backward ran
    assert q.grad is not None and torch.allclose(y, _sdpa(q, k, v))
    assert not cpu_attention.supports(q.detach().double(), k.double())


def test_bf16_form_built_where_the_cpu_has_it():
    """The bf16 dot-product form is compiled in exactly at the avx512bf16 tier (so the bf16 cases above run it
    there), and on a 512-token prefill it is as close to the exact result as SDPA in bf16."""
    assert bool(cpu_attention.LIB.get().has_dpbf16()) == (cpu_attention.LIB.tier() == "avx512bf16")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 512, 64, generator=g).to(torch.bfloat16) for h in (9, 3, 3))
    ref = causal_attention_ref(q, k, v)
    with torch.inference_mode():
        got = causal_attention(q, k, v)
    assert (got.double() - ref).abs().max().item() <= 1.5 * (_sdpa(q, k, v).double() - ref).abs().max().item()


@pytest.mark.parametrize("shapes", [((2, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)),    # batch mismatch
                                    ((1, 3, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)),    # nh not a multiple of nkv
                                    ((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 9, 16)),    # v unlike k
                                    ((1, 2, 9, 16), (1, 2, 8, 16), (1, 2, 8, 16)),    # more queries than keys
                                    ((1, 2, 8, 16), (1, 2, 8, 8), (1, 2, 8, 8))])     # head dims differ
def test_bad_shapes_are_errors_not_memory_reads(shapes):
    q, k, v = (torch.randn(*s) for s in shapes)
    with torch.inference_mode(), pytest.raises(ValueError, match="causal_attention"):
        causal_attention(q, k, v)
