"""Next-token cross-entropy straight from hidden states, without ever holding the full logits tensor.

The naive loss computes logits = h·Wᵀ for every position, (B, T, V) in fp32: for the default model at batch 4 ×
seq 256 that is 1024 × 49152 × 4 B = 200 MB, plus the same again for its gradient, though most positions are
prompt or padding and carry no label. Here we

  1. keep only the labelled positions: h (n, C) with n = number of labelled tokens, and
  2. walk them in chunks of `chunk` rows; per chunk, logits z = h_c·Wᵀ (chunk, V) in fp32, and since W (the frozen
     lm_head) needs no gradient, the gradient wrt h is computed right away:

        loss_c = Σ_i  logsumexp(z_i) − z_i[y_i]
        ∂loss_c/∂h_c = (softmax(z) − onehot(y)) · W                    (chunk, V)·(V, C) → (chunk, C)

  so the backward pass is one multiply of the stored (n, C) gradient by the incoming scalar. Peak extra memory is
  one chunk of logits, and nothing is recomputed. (Liger-Kernel's fused linear cross-entropy does the same on GPU.)

The loss returned is the *sum* over labelled tokens, so gradient accumulation can divide by the step's total count.
Legend: n labelled tokens, C hidden size, V vocab size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from phiforge.kernels.cpu.linear import matmul_nt

IGNORE = -100  # the label of a position the loss skips (PyTorch's and Hugging Face's value)


class LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        # h (n, C), weight (V, C) frozen, targets (n,)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        need_grad = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(h) if need_grad else None
        for s in range(0, h.shape[0], chunk):
            z = matmul_nt(h[s:s + chunk], weight).float()  # (c, V)
            y = targets[s:s + chunk]
            lse = torch.logsumexp(z, dim=-1)  # (c,)
            total += (lse - z.gather(1, y[:, None]).squeeze(1)).sum()
            if need_grad:
                z.sub_(lse[:, None]).exp_()  # softmax, in place: (c, V)
                z[torch.arange(z.shape[0], device=z.device), y] -= 1.0
                grad_h[s:s + chunk] = matmul_nt(z.to(weight.dtype), weight.T).to(h.dtype)  # (c, V)·(V, C)
        ctx.save_for_backward(grad_h if need_grad else None)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)), None, None, None


def lm_loss_sum(model, input_ids: torch.Tensor, targets: torch.Tensor, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, chunk: int = 1024) -> torch.Tensor:
    """Σ over labelled positions of −log p(target): input_ids, targets (B, T) → scalar fp32."""
    h = model(input_ids, position_ids=position_ids, segment_ids=segment_ids, return_hidden=True)  # (B, T, C)
    sel = targets != IGNORE  # (B, T)
    h, y = h[sel], targets[sel]  # (n, C), (n,)
    weight = getattr(model, "module", model).lm_head.weight  # under DistributedDataParallel the model is .module
    if weight.requires_grad:  # a trained lm_head needs the ordinary path (autograd through the logits)
        return F.cross_entropy((h @ weight.T).float(), y, reduction="sum")  # (n, C)@(C, V) -> (n, V)
    return LinearCrossEntropySum.apply(h, weight, y, chunk)


def lm_loss_sum_ref(model, input_ids: torch.Tensor, targets: torch.Tensor, position_ids=None,
                    segment_ids=None) -> torch.Tensor:
    """The naive reference: full logits (B, T, V), fp32 cross-entropy summed over labelled positions."""
    logits = model(input_ids, position_ids=position_ids, segment_ids=segment_ids).float()  # (B, T, V)
    # (B*T, V) against (B*T,)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
