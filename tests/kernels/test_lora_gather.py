"""Gathered LoRA (kernels/lora_gather.py): BGMV, SGMV and the CPU path against the gather+bmm reference, and the
reference against a per-row loop of kernels/lora.py's single-adapter reference.

Triton kernels run in the interpreter (PHIFORGE_KERNELS=triton) at odd shapes, fp32 and fp16, with rows of no
adapter (-1), ranks padded with zeros, empty segments and segments longer than a tile. Tolerances follow
tests/ref_error.py: within twice the reference's own error in the test dtype, measured against fp64.
"""
from __future__ import annotations

import pytest
import torch

from phiforge.kernels.lora import lora_linear_ref
from phiforge.kernels.lora_gather import (DENSE_ROWS, bgmv_, lora_gather_, lora_gather_cpu_, lora_gather_ref, segments_to_slots,
                                          sgmv_)

from ref_error import assert_within_ref_error

pytestmark = pytest.mark.usefixtures("one_thread")


def _stack(N, K, ranks, seed=0):
    """A (S, R, K), B (S, N, R) zero-padded past each slot's rank, scales (S,)."""
    g = torch.Generator().manual_seed(seed)
    S, R = len(ranks), max(ranks)
    A, B = torch.zeros(S, R, K), torch.zeros(S, N, R)
    for i, r in enumerate(ranks):
        A[i, :r] = torch.randn(r, K, generator=g) * 0.2
        B[i, :, :r] = torch.randn(N, r, generator=g) * 0.2
    scales = torch.rand(S, generator=g) + 0.5
    return A, B, scales


def _xy(M, N, K, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)


def _check(fn, y, x, A, B, scales, slots, dtype):
    """fn(y, x, A, B, scales) in dtype vs the reference in dtype and in fp64."""
    out = fn(y.to(dtype).clone(), x.to(dtype), A.to(dtype), B.to(dtype), scales)
    ref = lora_gather_ref(y.to(dtype), x.to(dtype), A.to(dtype), B.to(dtype), scales, slots)
    ref64 = lora_gather_ref(y.double(), x.double(), A.double(), B.double(), scales.double(), slots)
    assert_within_ref_error(out, ref, ref64, rel_eps=1e-5)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K,ranks", [(1, 33, 40, [3]), (5, 29, 37, [7, 2, 5]), (9, 70, 19, [16, 1, 4, 9])])
def test_bgmv_matches_reference(dtype, M, N, K, ranks, monkeypatch):
    monkeypatch.setenv("PHIFORGE_KERNELS", "triton")
    A, B, scales = _stack(N, K, ranks)
    x, y = _xy(M, N, K)
    slots = torch.tensor([(m * 5) % (len(ranks) + 1) - 1 for m in range(M)])  # every slot and -1
    out = _check(lambda *a: bgmv_(*a, slots), y, x, A, B, scales, slots, dtype)
    none = slots < 0
    assert torch.equal(out[none], y.to(dtype)[none])  # rows of the base model are not touched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lens,seg_slots", [([3], [0]), ([2, 0, 40, 3, 1], [1, 0, -1, 2, 0]),
                                            ([33, 17], [2, 1])])
def test_sgmv_matches_reference(dtype, lens, seg_slots, monkeypatch):
    monkeypatch.setenv("PHIFORGE_KERNELS", "triton")
    N, K = 45, 38
    A, B, scales = _stack(N, K, [5, 11, 3])
    lens, seg_slots = torch.tensor(lens), torch.tensor(seg_slots)
    slots = segments_to_slots(lens, seg_slots)
    x, y = _xy(int(lens.sum()), N, K)
    _check(lambda *a: sgmv_(*a, lens, seg_slots), y, x, A, B, scales, slots, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots", [[2, -1, 0, 2, 1, 1, -1], [1, 1, 1], [-1, -1],
                                   [(m * 7) % 4 - 1 for m in range(DENSE_ROWS + 9)],  # the grouped form
                                   [2] * (DENSE_ROWS + 1)])
def test_cpu_path_matches_reference(dtype, slots, monkeypatch):
    monkeypatch.delenv("PHIFORGE_KERNELS", raising=False)
    ranks = [7, 2, 5]
    A, B, scales = _stack(31, 26, ranks)
    slots = torch.tensor(slots)
    x, y = _xy(slots.numel(), 31, 26)
    _check(lambda *a: lora_gather_(*a, slots, ranks=ranks), y, x, A, B, scales, slots, dtype)
    # without the ranks (padding included in the products) the result is the same
    _check(lambda *a: lora_gather_cpu_(*a, slots), y, x, A, B, scales, slots, dtype)


@pytest.mark.parametrize("lens,seg_slots", [([DENSE_ROWS + 5], [1]), ([20, 0, 19, 3, 1], [1, 0, -1, 2, 1])])
def test_cpu_path_with_segments_matches_reference(lens, seg_slots, monkeypatch):
    """A prefill's segments: the CPU path reads the adapters present off the segments' slots."""
    monkeypatch.delenv("PHIFORGE_KERNELS", raising=False)
    ranks = [7, 2, 5]
    A, B, scales = _stack(31, 26, ranks)
    lens, seg_slots = torch.tensor(lens), torch.tensor(seg_slots)
    slots = segments_to_slots(lens, seg_slots)
    x, y = _xy(slots.numel(), 31, 26)
    _check(lambda *a: lora_gather_(*a, slots, lens, seg_slots, ranks=ranks), y, x, A, B, scales, slots,
           torch.float32)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_B_stored_as_n_s_r_view(path, monkeypatch):
    """MultiLoRALinear keeps B as (N, S, R) and passes the (S, N, R) permuted view."""
    if path == "triton":
        monkeypatch.setenv("PHIFORGE_KERNELS", "triton")
    else:
        monkeypatch.delenv("PHIFORGE_KERNELS", raising=False)
    A, B, scales = _stack(21, 18, [3, 6])
    view = B.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # (S, N, R) with strides of an (N, S, R) tensor
    slots = torch.tensor([1, -1, 0, 1])
    x, y = _xy(4, 21, 18)
    _check(lambda y, x, A, B, s: lora_gather_(y, x, A, view.to(B.dtype), s, slots), y, x, A, B, scales, slots,
           torch.float32)


def test_reference_equals_one_adapter_at_a_time():
    """Each row of the gathered reference is kernels/lora.py's single-LoRA reference with that row's adapter."""
    N, K, ranks = 23, 17, [4, 6]
    A, B, scales = (t.double() for t in _stack(N, K, ranks))
    x, _ = _xy(6, N, K)
    x = x.double()
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    slots = torch.tensor([0, 1, -1, 1, 0, -1])
    got = lora_gather_ref(x @ W.T, x, A, B, scales, slots)
    for m, i in enumerate(slots.tolist()):
        want = x[m:m + 1] @ W.T if i < 0 else lora_linear_ref(x[m:m + 1], W, A[i, :ranks[i]], B[i, :, :ranks[i]],
                                                              float(scales[i]))
        torch.testing.assert_close(got[m:m + 1], want, rtol=1e-12, atol=1e-12)


def test_bad_shapes_are_one_line_errors(monkeypatch):
    monkeypatch.setenv("PHIFORGE_KERNELS", "triton")
    A, B, scales = _stack(8, 16, [2, 3])
    x, y = _xy(4, 8, 16)
    with pytest.raises(ValueError, match="A \\(S, R, K\\)"):
        bgmv_(y, x[:, :15], A, B, scales, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="slots must be"):
        bgmv_(y, x, A, B, scales, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="summing to the 4 tokens"):
        sgmv_(y, x, A, B, scales, torch.tensor([1, 2]), torch.tensor([0, 1]))
