"""NF4 matmul on CPU tensors (placeholder torch path; the native path lands next)."""
from __future__ import annotations

import torch

from phiforge.kernels.nf4 import NF4Weight, dequantize_nf4_ref


def dequantize_into(w: NF4Weight, out: torch.Tensor) -> torch.Tensor:
    out.copy_(dequantize_nf4_ref(w, out.dtype))
    return out


def matmul(a: torch.Tensor, w: NF4Weight, trans_w: bool) -> torch.Tensor:
    wd = dequantize_nf4_ref(w, a.dtype)
    return a @ (wd if trans_w else wd.T)
