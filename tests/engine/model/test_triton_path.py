"""End to end through the Triton kernels (interpreter, CPU): a tiny Phi-3 with NF4 bases and LoRA adapters runs
forward and backward equal to the torch path. Unit tests check each kernel; this checks they are wired in."""
from __future__ import annotations

import pytest
import torch

from phiforge.engine import load_model
from phiforge.engine.model.lora import apply_lora, trainable_parameters
from tiny_phi3 import make_hf_checkpoint


class _Counted:
    """Wraps a @triton.jit kernel so `kernel[grid](...)` launches are counted."""

    def __init__(self, kernel, counts: dict, name: str) -> None:
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        self.counts[self.name] += 1
        return self.kernel[grid]


def _count_launches(monkeypatch) -> dict:
    import phiforge.kernels.lora as kl
    import phiforge.kernels.nf4_gemv as ng
    import phiforge.kernels.nf4_matmul as nm
    counts = {"_nf4_gemm_kernel": 0, "_nf4_gemv_kernel": 0, "_lora_gemm_kernel": 0}
    for mod in (nm, ng, kl):
        for name in counts:
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, _Counted(getattr(mod, name), counts, name))
    return counts


def _run(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids)                                                   # (B, T, V)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in trainable_parameters(model)}


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_forward_backward_triton_equals_torch(tmp_path, monkeypatch, quant):
    # intermediate 96: down_proj's K is not a multiple of the NF4 blocksize 64, so blocks straddle rows
    make_hf_checkpoint(tmp_path, dict(num_key_value_heads=2))
    model = load_model(tmp_path, dtype=torch.float32, quant=quant)
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    for _, p in trainable_parameters(model):  # B = 0 would hide the B-side of the backward
        p.data = torch.randn(p.shape, generator=g) * 0.1
    model.train()
    ids = torch.randint(0, 211, (2, 7), generator=g)

    monkeypatch.delenv("PHIFORGE_KERNELS", raising=False)
    ref_logits, ref_grads = _run(model, ids)
    launches = _count_launches(monkeypatch)
    monkeypatch.setenv("PHIFORGE_KERNELS", "triton")
    logits, grads = _run(model, ids)
    # the Triton kernels really ran: NF4 GEMM (forward, and transposed for dX) or the dense fused-LoRA GEMM
    assert launches["_nf4_gemm_kernel" if quant else "_lora_gemm_kernel"] > 0, launches
    # and decode-sized inputs take the split-K GEMV
    if quant:
        with torch.no_grad():
            model(ids[:1, :1])
        assert launches["_nf4_gemv_kernel"] > 0, launches

    assert (logits - ref_logits).abs().max().item() <= 1e-4
    assert ref_grads.keys() == grads.keys() and len(grads) == 2 * 4 * 2  # A and B of 4 sites in 2 layers
    for name, ref in ref_grads.items():
        err = (grads[name] - ref).abs().max().item()
        assert err <= 1e-4 * max(1.0, ref.abs().max().item()), name
