"""NF4 dequant-matmul (kernels/nf4_matmul.py, kernels/cpu/nf4.py) against the pure-torch reference.

Every Triton kernel (GEMV, GEMM, transposed GEMM, each with and without the LoRA epilogue) runs under the
interpreter (tests/conftest.py sets TRITON_INTERPRET=1; PHIFORGE_KERNELS=triton routes CPU tensors to it), and the
CPU torch path (native C GEMV/dequantize, or the pure-torch fallback) runs on the same cases.

Tolerance: tests/ref_error.py (within twice the reference's own error in the test dtype).
"""
from __future__ import annotations

import pytest
import torch

from phiforge.kernels.cpu import native, nf4 as nf4_cpu
from ref_error import assert_within_ref_error
from phiforge.kernels.nf4 import dequantize_nf4_ref, quantize_nf4
from phiforge.kernels.nf4_matmul import (
    GEMM_CONFIGS, GEMV_CONFIGS, LoRAEpilogue, dequantize_into_buffer, gemm_config, gemv_config, nf4_matmul,
    nf4_matmul_ref, nf4_matmul_t, nf4_matmul_t_ref,
)

# (N, K, blocksize): K a block multiple; K off the block multiple (blocks straddle rows); odd K; other blocksizes
SHAPES = [(33, 128, 64), (65, 96, 64), (17, 75, 64), (31, 256, 128), (20, 64, 32)]
DTYPES = [torch.float32, torch.float16]


@pytest.fixture(params=["triton", "torch", "torch-fallback"])
def path(request, monkeypatch):
    """triton: the kernels under the interpreter; torch: the CPU path (native C if a compiler exists);
    torch-fallback: the CPU path with the native library disabled."""
    monkeypatch.delenv("PHIFORGE_KERNELS", raising=False)
    if request.param == "triton":
        monkeypatch.setenv("PHIFORGE_KERNELS", "triton")
    if request.param == "torch-fallback":
        with nf4_cpu.LIB.disabled():
            yield request.param
    else:
        yield request.param


def _weight(N, K, blocksize=64, double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize_nf4(torch.randn(N, K, generator=g) * 0.05, blocksize, double_quant)


def _rand(*shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("N,K,blocksize", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_forward(path, M, N, K, blocksize, dtype, double_quant):
    w = _weight(N, K, blocksize, double_quant)
    x = _rand(M, K, dtype=dtype)
    assert_within_ref_error(nf4_matmul(x, w), nf4_matmul_ref(x, w), nf4_matmul_ref(x.double(), w))


@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("N,K,blocksize", SHAPES[:3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_transposed(path, M, N, K, blocksize, dtype):
    w = _weight(N, K, blocksize)
    dy = _rand(M, N, dtype=dtype)
    assert_within_ref_error(nf4_matmul_t(dy, w), nf4_matmul_t_ref(dy, w), nf4_matmul_t_ref(dy.double(), w))


@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [4, 20])
def test_lora_epilogue(path, M, dtype, r):
    """out += s·P·Qᵀ inside the kernels: forward Q = B (N, r); transposed Q = Aᵀ, a strided view of A (r, K)."""
    N, K, s = 65, 128, 0.75
    w = _weight(N, K)
    x, dy = _rand(M, K, dtype=dtype), _rand(M, N, dtype=dtype, seed=2)
    A, B = _rand(r, K, dtype=dtype, seed=3) * 0.1, _rand(N, r, dtype=dtype, seed=4) * 0.1
    P, G = x @ A.T, dy @ B  # (M, r)

    def ref(dt):
        cast = lambda t: t.to(dt)  # noqa: E731
        y = nf4_matmul_ref(cast(x), w) + s * cast(P) @ cast(B).T
        dx = nf4_matmul_t_ref(cast(dy), w) + s * cast(G) @ cast(A)
        return y, dx

    (y_ref, dx_ref), (y64, dx64) = ref(dtype), ref(torch.float64)
    assert_within_ref_error(nf4_matmul(x, w, LoRAEpilogue(P, B, s)), y_ref, y64)
    assert_within_ref_error(nf4_matmul_t(dy, w, LoRAEpilogue(G, A.T, s)), dx_ref, dx64)


@pytest.mark.parametrize("M", [1, 2, 4, 8, 17, 40])
def test_every_shipped_config_runs(M, monkeypatch):
    """Each M picks a config from the shipped tables (the ones the compile report checks) and is correct."""
    monkeypatch.setenv("PHIFORGE_KERNELS", "triton")
    cfg = gemv_config(M) if M <= 8 else gemm_config(M)
    assert cfg in list(GEMV_CONFIGS.values()) + list(GEMM_CONFIGS.values())
    w = _weight(70, 192)
    x = _rand(M, 192)
    assert_within_ref_error(nf4_matmul(x, w), nf4_matmul_ref(x, w), nf4_matmul_ref(x.double(), w))


@pytest.mark.parametrize("triton_path", [True, False])
def test_dequant_then_matmul_method(triton_path, monkeypatch):
    """method="dequant": dequantize into the reused buffer, then a dense matmul; the buffer equals the reference."""
    if triton_path:
        monkeypatch.setenv("PHIFORGE_KERNELS", "triton")
    else:
        monkeypatch.delenv("PHIFORGE_KERNELS", raising=False)
    w, x = _weight(33, 96), _rand(5, 96)
    assert torch.equal(dequantize_into_buffer(w, torch.float32), dequantize_nf4_ref(w, torch.float32))
    assert_within_ref_error(nf4_matmul(x, w, method="dequant"), nf4_matmul_ref(x, w), nf4_matmul_ref(x.double(), w))
    small = _weight(3, 64, seed=5)
    buf = dequantize_into_buffer(small, torch.float32)
    assert torch.equal(buf, dequantize_nf4_ref(small, torch.float32))  # the grown buffer is reused, not resized


@pytest.mark.parametrize("tier", [t for t in native.runnable_tiers() if t in nf4_cpu.LIB.tiers])
@pytest.mark.parametrize("M", [1, 3])
def test_cpu_gemv_and_dequantize_at_each_tier(tier, M):
    """The native NF4 GEMV and dequantize at every instruction-set tier this CPU runs (AVX-512 vpermps, AVX2's two
    permutes and a blend, scalar): the GEMV within the reference's error, the dequantize (fp32, bf16, fp16) bit for
    bit."""
    with native.forced_tier(tier):
        assert nf4_cpu.LIB.status().detail == tier
        for N, K, bs, dq in ((48, 128, 64, True), (37, 96, 32, False), (5, 256, 128, True)):
            w = _weight(N, K, bs, dq, seed=N)
            for dtype in (torch.float32, torch.bfloat16):
                x = _rand(M, K, dtype=dtype, seed=K)
                y = nf4_cpu.gemv(x, w)
                assert y is not None and y.dtype == dtype
                assert_within_ref_error(y, nf4_matmul_ref(x, w), nf4_matmul_ref(x.double(), w))
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                out = torch.empty(N, K, dtype=dtype)
                assert torch.equal(nf4_cpu.dequantize_into(w, out), dequantize_nf4_ref(w, dtype))


@pytest.mark.parametrize("tier", [t for t in native.runnable_tiers() if t in nf4_cpu.LIB.tiers])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_tile_gemm_at_each_tier(tier, dtype):
    """fp32 and bf16 x of tile_min_m()..TILE_MAX_M rows go to the tile GEMM where the tier has it (bf16 on AVX-512
    BF16's dot product from 3 rows; fp32, and bf16 widened to fp32, past the GEMV's rows): its fp32 sums are those of
    the weights dequantized in x's dtype, to fp32 rounding, through blocks of 8 rows of x and a lone one (9), tiles
    of 16 weight rows and a partial one, an odd last pair. Fewer rows take the GEMV; where the tier lacks the tile
    GEMM (scalar x86-64) more than GEMV_MAX_M rows go to the dequantize."""
    with native.forced_tier(tier):
        assert nf4_cpu.LIB.status().detail == tier
        tile_min = nf4_cpu.tile_min_m(dtype)
        fast = tier == "avx512bf16" and dtype == torch.bfloat16
        assert tile_min == (None if tier == "x86-64" else 3 if fast else nf4_cpu.GEMV_MAX_M + 1)
        assert nf4_cpu.tile_min_m(torch.float16) is None
        for N, K, bs, dq in ((37, 128, 64, True), (16, 96, 32, False), (3, 256, 128, True)):
            w = _weight(N, K, bs, dq, seed=N)
            wd = dequantize_nf4_ref(w, dtype).double()                            # (N, K): the weights a tile holds
            for M in range(1, nf4_cpu.TILE_MAX_M + 2):
                x = _rand(M, K, dtype=dtype, seed=M)
                y = nf4_cpu.gemv(x, w)
                if tile_min is None or not tile_min <= M <= nf4_cpu.TILE_MAX_M:
                    assert (y is None) == (M > nf4_cpu.GEMV_MAX_M)               # the GEMV, or the dequantize
                    continue
                got, ref = nf4_cpu.tile_gemm(x, w), x.double() @ wd.T                # (M, N)
                assert (got.double() - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()
                assert torch.equal(y, got.to(dtype))


def test_row_limits_are_checked_against_the_c_side(monkeypatch):
    """nf4_cpu.py's copies of csrc/nf4.h's row limits must match the library's, or it does not load."""
    lib = nf4_cpu.LIB.get()
    if lib is None:
        pytest.skip(f"nf4_cpu: {nf4_cpu.LIB.status()}")
    nf4_cpu._check(lib)
    monkeypatch.setattr(nf4_cpu, "TILE_MAX_M", nf4_cpu.TILE_MAX_M + 1)
    with pytest.raises(ValueError, match="row limits"):
        nf4_cpu._check(lib)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,blocksize", SHAPES + [(7, 3, 64)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_cpu_dequantize_bit_exact(dtype, N, K, blocksize, double_quant):
    w = _weight(N, K, blocksize, double_quant)
    out = torch.empty(N, K, dtype=dtype)
    assert torch.equal(nf4_cpu.dequantize_into(w, out), dequantize_nf4_ref(w, dtype))


@pytest.mark.parametrize("path_name", ["triton", "torch"])
def test_autograd_and_leading_dims(path_name, monkeypatch):
    if path_name == "triton":
        monkeypatch.setenv("PHIFORGE_KERNELS", "triton")
    w = _weight(17, 64)
    x = _rand(2, 3, 64).requires_grad_()
    y = nf4_matmul(x, w)  # (2, 3, 17)
    assert y.shape == (2, 3, 17)
    dy = _rand(2, 3, 17, seed=7)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    (dx64,) = torch.autograd.grad(nf4_matmul_ref(x64, w), x64, dy.double())
    ref = torch.autograd.grad(nf4_matmul_ref(x, w), x, dy)[0]
    assert_within_ref_error(dx, ref, dx64)


def test_bad_input_names_the_shapes():
    w = _weight(17, 64)
    with pytest.raises(ValueError, match=r"63 features.*\(17, 64\)"):
        nf4_matmul(torch.randn(2, 63), w)
    with pytest.raises(ValueError, match="expects 17"):
        nf4_matmul_t(torch.randn(2, 16), w)
    with pytest.raises(TypeError, match="NF4Weight"):
        nf4_matmul(torch.randn(2, 64), torch.randn(17, 64))
    with pytest.raises(ValueError, match="method"):
        nf4_matmul(torch.randn(2, 64), w, method="cublas")


def test_forcing_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("PHIFORGE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        nf4_matmul(torch.randn(2, 64), _weight(17, 64))


@pytest.mark.parametrize("path_name", ["triton", "torch"])
def test_empty_batch(path_name, monkeypatch):
    if path_name == "triton":
        monkeypatch.setenv("PHIFORGE_KERNELS", "triton")
    w = _weight(17, 64)
    assert nf4_matmul(torch.randn(0, 64), w).shape == (0, 17)
    assert nf4_matmul_t(torch.randn(2, 0, 17), w).shape == (2, 0, 64)


def test_buffer_first_made_under_inference_mode_serves_training_after(monkeypatch):
    """The reused dequantize buffer, first allocated inside a generate call (inference mode), is a normal tensor:
    the torch fallback's in-place fill and autograd still work outside inference mode afterwards."""
    from phiforge.kernels import nf4_matmul as nm
    monkeypatch.setattr(nm, "_BUFFERS", {})
    w = _weight(48, 128, 64, True)
    with torch.inference_mode():
        nf4_matmul(_rand(17, 128, dtype=torch.float32), w)             # M > 4: dequantize into the buffer
    x = _rand(17, 128, dtype=torch.float32).requires_grad_()
    with nf4_cpu.LIB.disabled():                                        # the torch fallback fills it in place
        y = nf4_matmul(x, w)
    y.sum().backward()
    assert x.grad is not None
    assert_within_ref_error(y.detach(), nf4_matmul_ref(x.detach(), w), nf4_matmul_ref(x.detach().double(), w))
