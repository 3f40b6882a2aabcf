"""The kernel tolerance rule: a kernel is at most twice as far from an fp64 reference as the reference itself
computed in the test dtype is, |out - ref64| <= 2 |ref_dtype - ref64| + eps. No hand-tuned atol per dtype."""
from __future__ import annotations

import torch


def assert_within_ref_error(out: torch.Tensor, ref_dtype: torch.Tensor, ref64: torch.Tensor,
                            rel_eps: float = 1e-6) -> None:
    assert out.dtype == ref_dtype.dtype and out.shape == ref64.shape
    err = (out.double() - ref64).abs().max().item()
    ref_err = (ref_dtype.double() - ref64).abs().max().item()
    eps = rel_eps * (ref64.abs().max().item() + 1e-30)
    assert err <= 2 * ref_err + eps, f"error {err:.3g} vs the reference's own {ref_err:.3g} in {out.dtype}"
