"""Gathered LoRA for a batch of rows that each pick their own adapter (Punica's BGMV and SGMV, inference only).

Many adapters live stacked in slots; every row of the batch names one slot (or -1, the base model alone):

    A   (S, R, K)   slot i's lora_A, rows r_i..R zero-padded          S slots, R = the largest rank
    B   (S, N, R)   slot i's lora_B, columns r_i..R zero-padded
    s   (S,)        slot i's scaling (alpha / r_i, or alpha / sqrt(r_i) with rsLoRA)

    y[m] += s_i · B_i · (A_i · x[m])          i = slot[m] ≥ 0;  slot[m] = -1 adds nothing

The padding is exact: padded rows of A give zeros in h, and padded columns of B multiply those zeros. The base
product x·Wᵀ stays one batched GEMM (dense or NF4, whatever the layer is); only the thin delta is gathered. It runs
in two passes, as Punica and vLLM do, so that the rank-R intermediate is computed once per row, not once per
output tile:

    shrink   h (M, R) = x[m] · A_iᵀ               reduction over K, h rounded to x's dtype (as kernels/lora.py's P)
    expand   y (M, N) += s_i · h[m] · B_iᵀ         reduction over R, added into y in place

Two shapes of batch:
  - BGMV (decode, one token a row): a slot per row. Each program is one row: a gather-GEMV with no tensor-core
    tile to fill (M rows with M distinct adapters have nothing to share).
  - SGMV (prefill, packed segments): `seg_lens` (G,) consecutive runs of tokens, `seg_slots` (G,) one slot each.
    A program is one (segment, BLOCK_M tokens) tile: all its tokens share A_i and B_i, so the shrink and the
    expand are tl.dot tiles.

Dispatch: CUDA tensors -> Triton; CPU tensors -> torch (`lora_gather_cpu_`: at decode sizes every slot at once in
three ops, h = x·[A_0; …]ᵀ masked to each row's slot, then one product with [B_0 … B_{S-1}]; for prefills rows
grouped by slot; bench/bench_multi_lora.py times both against the gather+bmm reference);
PHIFORGE_KERNELS=triton forces Triton (tests, with TRITON_INTERPRET=1).

Legend: M tokens (rows), K in_features, N out_features, S slots, R padded rank, G segments.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from phiforge.kernels.aot import aligned, signature
from phiforge.kernels.nf4_tiles import use_triton

# Shipped configurations (the launchers pick from these; `phiforge kernels report` compiles exactly these). BLOCK_R is
# the padded rank rounded up to a power of two, at least 16 (tl.dot). The shrink's register tile is BLOCK_R x BLOCK_K,
# so BLOCK_K shrinks as the rank grows (a rank-64 tile at BLOCK_K 64 nears the 255-register cap).
BGMV_SHRINK = {16: dict(BLOCK_K=64, num_warps=4, num_stages=2), 32: dict(BLOCK_K=32, num_warps=4, num_stages=2),
               64: dict(BLOCK_K=16, num_warps=4, num_stages=2)}
BGMV_EXPAND = dict(BLOCK_N=64, num_warps=4, num_stages=2)
SGMV_SHRINK = {16: dict(BLOCK_M=32, BLOCK_K=64, num_warps=4, num_stages=3),
               32: dict(BLOCK_M=32, BLOCK_K=64, num_warps=4, num_stages=3),
               64: dict(BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=2)}
SGMV_EXPAND = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2)
AOT_RANKS = (16, 32, 64)


def _shrink_config(table: dict, block_r: int) -> dict:
    """The entry for this padded rank; ranks over the largest entry take its (smallest) reduction block."""
    return table[min(block_r, max(table))]


@triton.jit
def _bgmv_shrink_kernel(x_ptr, a_ptr, h_ptr, slot_ptr, K, R, stride_xm, stride_as, stride_ar, stride_hm,
                        BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """h[m] (R,) = x[m] · A[slot[m]]ᵀ, one program per row; rows with slot -1 are left untouched."""
    m = tl.program_id(0)
    slot = tl.load(slot_ptr + m)
    if slot >= 0:
        rr = tl.arange(0, BLOCK_R)  # [BLOCK_R]
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            xv = tl.load(x_ptr + m * stride_xm + rk, mask=rk < K, other=0.0).to(tl.float32)  # [BLOCK_K]
            # A[slot, rr, rk]                                [BLOCK_R, BLOCK_K]
            a = tl.load(a_ptr + slot * stride_as + rr[:, None] * stride_ar + rk[None, :],
                        mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0).to(tl.float32)
            acc += tl.sum(a * xv[None, :], axis=1)
        tl.store(h_ptr + m * stride_hm + rr, acc.to(h_ptr.dtype.element_ty), mask=rr < R)


@triton.jit
def _bgmv_expand_kernel(y_ptr, h_ptr, b_ptr, scale_ptr, slot_ptr, N, R, stride_ym, stride_hm, stride_bs, stride_bn,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """y[m, n-block] += s[slot] · B[slot, n-block] · h[m], one program per (row, BLOCK_N outputs)."""
    m = tl.program_id(0)
    slot = tl.load(slot_ptr + m)
    if slot >= 0:
        s = tl.load(scale_ptr + slot)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        rr = tl.arange(0, BLOCK_R)  # [BLOCK_R]
        h = tl.load(h_ptr + m * stride_hm + rr, mask=rr < R, other=0.0).to(tl.float32)  # [BLOCK_R]
        # B[slot, rn, rr]                                    [BLOCK_N, BLOCK_R]
        b = tl.load(b_ptr + slot * stride_bs + rn[:, None] * stride_bn + rr[None, :],
                    mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0).to(tl.float32)
        d = tl.sum(b * h[None, :], axis=1) * s  # [BLOCK_N]
        y = tl.load(y_ptr + m * stride_ym + rn, mask=rn < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + rn, (y + d).to(y_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _sgmv_shrink_kernel(x_ptr, a_ptr, h_ptr, start_ptr, seg_slot_ptr, K, R, stride_xm, stride_as, stride_ar,
                        stride_hm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """h[tokens of segment g, tile t] (BLOCK_M, R) = x[...] · A[seg_slot[g]]ᵀ with tl.dot."""
    g = tl.program_id(0)
    slot = tl.load(seg_slot_ptr + g)
    first = tl.load(start_ptr + g) + tl.program_id(1) * BLOCK_M
    end = tl.load(start_ptr + g + 1)
    if (slot >= 0) & (first < end):
        rm = first + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        rr = tl.arange(0, BLOCK_R)  # [BLOCK_R]
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            # x[rm, rk]                                      [BLOCK_M, BLOCK_K]
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                        mask=(rm[:, None] < end) & (rk[None, :] < K), other=0.0)
            # A[slot, rr, rk].T                              [BLOCK_K, BLOCK_R]
            at = tl.load(a_ptr + slot * stride_as + rr[None, :] * stride_ar + rk[:, None],
                         mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
            acc = tl.dot(x, at.to(x.dtype), acc)
        tl.store(h_ptr + rm[:, None] * stride_hm + rr[None, :], acc.to(h_ptr.dtype.element_ty),
                 mask=(rm[:, None] < end) & (rr[None, :] < R))


@triton.jit
def _sgmv_expand_kernel(y_ptr, h_ptr, b_ptr, scale_ptr, start_ptr, seg_slot_ptr, N, R, stride_ym, stride_hm,
                        stride_bs, stride_bn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """y[tile, n-block] += s · h[tile] · B[seg_slot[g], n-block]ᵀ with tl.dot."""
    g = tl.program_id(0)
    slot = tl.load(seg_slot_ptr + g)
    first = tl.load(start_ptr + g) + tl.program_id(1) * BLOCK_M
    end = tl.load(start_ptr + g + 1)
    if (slot >= 0) & (first < end):
        s = tl.load(scale_ptr + slot)
        rm = first + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        rn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        rr = tl.arange(0, BLOCK_R)  # [BLOCK_R]
        # h[rm, rr]                                          [BLOCK_M, BLOCK_R]
        h = tl.load(h_ptr + rm[:, None] * stride_hm + rr[None, :], mask=(rm[:, None] < end) & (rr[None, :] < R),
                    other=0.0)
        # B[slot, rn, rr].T                                  [BLOCK_R, BLOCK_N]
        bt = tl.load(b_ptr + slot * stride_bs + rn[None, :] * stride_bn + rr[:, None],
                     mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
        d = tl.dot(h, bt.to(h.dtype)) * s  # [BLOCK_M, BLOCK_N] fp32
        mask = (rm[:, None] < end) & (rn[None, :] < N)
        ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
        y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (y + d).to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------

def _check(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor) -> None:
    M, K = x.shape
    S, R, _ = A.shape
    N = y.shape[1]
    if y.shape != (M, N) or A.shape != (S, R, K) or B.shape != (S, N, R) or scales.shape != (S,):
        raise ValueError(f"lora_gather: expected y ({M}, N), x ({M}, K), A (S, R, K), B (S, N, R), scales (S,); got "
                         f"y {tuple(y.shape)}, x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, "
                         f"scales {tuple(scales.shape)}")
    if y.stride(1) != 1:
        raise ValueError("lora_gather: y must have unit stride along its last dimension (it is written in place)")


def _block_r(R: int) -> int:
    return max(16, triton.next_power_of_2(R))


def bgmv_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor,
          slots: torch.Tensor) -> torch.Tensor:
    """Triton BGMV: y (M, N) += s_i·(x·A_iᵀ)·B_iᵀ row by row, i = slots[m] (M,) int, -1 = none. Returns y."""
    _check(y, x, A, B, scales)
    M, K = x.shape
    S, R, _ = A.shape
    N = y.shape[1]
    if slots.shape != (M,):
        raise ValueError(f"bgmv: slots must be ({M},), one per row; got {tuple(slots.shape)}")
    if M == 0 or S == 0:
        return y
    x, A = x.contiguous(), A.contiguous()
    B = B if B.stride(2) == 1 else B.contiguous()  # any (S, N) strides: MultiLoRALinear stores B as (N, S, R)
    slots, scales = slots.to(torch.int32).contiguous(), scales.float().contiguous()
    h = torch.empty(M, R, dtype=x.dtype, device=x.device)  # (M, R)
    br = _block_r(R)
    cfg = _shrink_config(BGMV_SHRINK, br)
    _bgmv_shrink_kernel[(M,)](x, A, h, slots, K, R, x.stride(0), A.stride(0), A.stride(1), h.stride(0),
                              BLOCK_K=cfg["BLOCK_K"], BLOCK_R=br, num_warps=cfg["num_warps"],
                              num_stages=cfg["num_stages"])
    cfg = BGMV_EXPAND
    grid = (M, triton.cdiv(N, cfg["BLOCK_N"]))
    _bgmv_expand_kernel[grid](y, h, B, scales, slots, N, R, y.stride(0), h.stride(0), B.stride(0), B.stride(1),
                              BLOCK_N=cfg["BLOCK_N"], BLOCK_R=br, num_warps=cfg["num_warps"],
                              num_stages=cfg["num_stages"])
    return y


def sgmv_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor,
          seg_lens: torch.Tensor, seg_slots: torch.Tensor) -> torch.Tensor:
    """Triton SGMV: the tokens of x (M, K) are G consecutive segments of seg_lens (G,) tokens; segment g adds
    s_i·(x·A_iᵀ)·B_iᵀ with i = seg_slots[g] (-1 = none) into y (M, N). Returns y."""
    _check(y, x, A, B, scales)
    M, K = x.shape
    S, R, _ = A.shape
    N = y.shape[1]
    lens = seg_lens.detach().to("cpu", torch.int64)  # the grid needs the longest segment on the host
    if lens.dim() != 1 or seg_slots.shape != lens.shape or int(lens.sum()) != M or bool((lens < 0).any()):
        raise ValueError(f"sgmv: seg_lens and seg_slots must be (G,) with seg_lens summing to the {M} tokens; got "
                         f"seg_lens {tuple(seg_lens.shape)} (sum {int(lens.sum())}), seg_slots {tuple(seg_slots.shape)}")
    G = lens.numel()
    if M == 0 or S == 0 or G == 0:
        return y
    x, A = x.contiguous(), A.contiguous()
    B = B if B.stride(2) == 1 else B.contiguous()
    starts = torch.zeros(G + 1, dtype=torch.int32)
    starts[1:] = lens.cumsum(0)
    starts = starts.to(x.device)
    seg_slots, scales = seg_slots.to(device=x.device, dtype=torch.int32).contiguous(), scales.float().contiguous()
    h = torch.empty(M, R, dtype=x.dtype, device=x.device)  # (M, R)
    br = _block_r(R)
    cfg = _shrink_config(SGMV_SHRINK, br)
    tiles = triton.cdiv(int(lens.max()), cfg["BLOCK_M"])
    _sgmv_shrink_kernel[(G, tiles)](x, A, h, starts, seg_slots, K, R, x.stride(0), A.stride(0), A.stride(1),
                                    h.stride(0), BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=br,
                                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    cfg = SGMV_EXPAND
    tiles = triton.cdiv(int(lens.max()), cfg["BLOCK_M"])
    grid = (G, tiles, triton.cdiv(N, cfg["BLOCK_N"]))
    _sgmv_expand_kernel[grid](y, h, B, scales, starts, seg_slots, N, R, y.stride(0), h.stride(0), B.stride(0),
                              B.stride(1), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=br,
                              num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


def lora_gather_cpu_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor,
                     slots: torch.Tensor, ranks: list[int] | None = None,
                     seg_slots: torch.Tensor | None = None) -> torch.Tensor:
    """The CPU path, in place; returns y. Few rows (decode): every slot at once, three ops whatever the number of
    adapters. Many rows (prefill): rows grouped by slot, two thin matmuls per adapter present (read off the
    segments' slots when given: the tokens' would need a sort of all of them)."""
    _check(y, x, A, B, scales)
    if x.shape[0] <= DENSE_ROWS:
        return all_slots_(y, x, A, B, scales, slots)
    present = None if seg_slots is None else sorted(set(seg_slots.tolist()))
    return grouped_(y, x, A, B, scales, slots, ranks, present)


# Up to this many rows the all-slots form runs (bench/bench_multi_lora.py times both forms at decode batch sizes).
DENSE_ROWS = 32


def all_slots_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor,
               slots: torch.Tensor) -> torch.Tensor:
    """h = x·[A_0; …; A_{S-1}]ᵀ for every slot, zeroed outside each row's slot and scaled, then one product with
    [B_0 … B_{S-1}]: S times the thin flops of one adapter, but the same bytes of A and B read as the grouped form,
    in three ops instead of five per adapter (at decode the ops' fixed costs, not the flops, decide)."""
    M = x.shape[0]
    S, R, K = A.shape
    N = B.shape[1]
    coef = torch.zeros(M, S, dtype=x.dtype, device=x.device)  # (M, S): s_i at the row's slot, 0 elsewhere
    rows = (slots >= 0).nonzero().squeeze(1)
    coef[rows, slots[rows]] = scales[slots[rows]].to(x.dtype)
    h = x @ A.reshape(S * R, K).to(x.dtype).T  # (M, K)·(K, S·R) -> (M, S·R)
    h = (h.view(M, S, R) * coef[:, :, None]).view(M, S * R)  # (M, S·R)
    Bt = B.permute(1, 0, 2).reshape(N, S * R).to(x.dtype)  # (N, S·R): a view when B is stored (N, S, R)
    return y.addmm_(h, Bt.T)  # (M, S·R)·(S·R, N)


def grouped_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor,
             slots: torch.Tensor, ranks: list[int] | None = None, present: list[int] | None = None) -> torch.Tensor:
    """Rows grouped by slot: per adapter present (`present`: the distinct slots, when the caller knows them),
    h = x_i·A_iᵀ (M_i, r_i), y_i += s_i·h·B_iᵀ."""
    present = torch.unique(slots).tolist() if present is None else present
    for i in present:
        if i < 0:
            continue
        r = A.shape[1] if ranks is None else ranks[i]
        if r == 0:  # this slot's adapter does not touch this projection
            continue
        a, b = A[i, :r].to(x.dtype), B[i, :, :r].to(x.dtype)  # (r, K), (N, r)
        if len(present) == 1:  # every row uses this adapter: no gather, no scatter
            y.addmm_(x @ a.T, b.T, alpha=float(scales[i]))  # (M, r)·(r, N)
            continue
        rows = (slots == i).nonzero().squeeze(1)  # (M_i,)
        h = x.index_select(0, rows) @ a.T  # (M_i, r)
        y.index_add_(0, rows, h @ b.T, alpha=float(scales[i]))  # (M_i, N)
    return y


def lora_gather_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor,
                 slots: torch.Tensor, seg_lens: torch.Tensor | None = None, seg_slots: torch.Tensor | None = None,
                 ranks: list[int] | None = None) -> torch.Tensor:
    """y (M, N) += the gathered LoRA delta, in place. `slots` (M,): one slot per token (-1 none). For a prefill,
    pass seg_lens/seg_slots as well (the same assignment run-length encoded) so the GPU can run SGMV tiles."""
    if use_triton(x):
        if seg_lens is not None:
            return sgmv_(y, x, A, B, scales, seg_lens, seg_slots)
        return bgmv_(y, x, A, B, scales, slots)
    return lora_gather_cpu_(y, x, A, B, scales, slots, ranks, seg_slots)


# ---------------------------------------------------------------------------------------------------------------
# Pure-torch reference (tests and bench import this one)
# ---------------------------------------------------------------------------------------------------------------

def lora_gather_ref(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor,
                    slots: torch.Tensor) -> torch.Tensor:
    """y + s_i·(x·A_iᵀ)·B_iᵀ per token, i = slots (M,), -1 none; out of place, in x's dtype (gather, then bmm)."""
    idx = slots.clamp(min=0).long()
    a, b = A[idx].to(x.dtype), B[idx].to(x.dtype)  # (M, R, K), (M, N, R)
    h = torch.bmm(a, x.unsqueeze(2))  # (M, R, K)·(M, K, 1) -> (M, R, 1)
    d = torch.bmm(b, h).squeeze(2)  # (M, N, R)·(M, R, 1) -> (M, N)
    s = torch.where(slots >= 0, scales.to(x.dtype)[idx], torch.zeros((), dtype=x.dtype))  # (M,)
    return y + d * s[:, None]


def segments_to_slots(seg_lens: torch.Tensor, seg_slots: torch.Tensor) -> torch.Tensor:
    """Per-token slots (M,) from run-length segments."""
    return torch.repeat_interleave(seg_slots.long(), seg_lens.long())


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs for `phiforge kernels report`
# ---------------------------------------------------------------------------------------------------------------

def aot_specs() -> list[dict]:
    """Every gather kernel at each reported rank, bf16 activations and adapters, int32 slot tables."""
    kernels = (
        ("bgmv_shrink", _bgmv_shrink_kernel, BGMV_SHRINK, dict(x_ptr="*bf16", a_ptr="*bf16", h_ptr="*bf16",
                                                               slot_ptr="*i32"), (), ["K", "stride_xm", "stride_as"]),
        ("bgmv_expand", _bgmv_expand_kernel, BGMV_EXPAND, dict(y_ptr="*bf16", h_ptr="*bf16", b_ptr="*bf16",
                                                               scale_ptr="*fp32", slot_ptr="*i32"), (),
         ["N", "stride_ym"]),
        ("sgmv_shrink", _sgmv_shrink_kernel, SGMV_SHRINK, dict(x_ptr="*bf16", a_ptr="*bf16", h_ptr="*bf16",
                                                               start_ptr="*i32", seg_slot_ptr="*i32"), (),
         ["K", "stride_xm", "stride_as"]),
        ("sgmv_expand", _sgmv_expand_kernel, SGMV_EXPAND, dict(y_ptr="*bf16", h_ptr="*bf16", b_ptr="*bf16",
                                                               scale_ptr="*fp32", start_ptr="*i32",
                                                               seg_slot_ptr="*i32"), (),
         ["N", "stride_ym"]),
    )
    specs = []
    for name, fn, cfg, ptrs, floats, divisible in kernels:
        for r in AOT_RANKS:
            c = _shrink_config(cfg, r) if "BLOCK_K" not in cfg and "BLOCK_N" not in cfg else cfg
            launch = {k: v for k, v in c.items() if not k.startswith("num_")}
            specs.append(dict(
                kernel=name, config=f"r{r}", fn=fn, signature=signature(fn, ptrs, floats),
                constexprs={"BLOCK_R": r, **launch},
                attrs=aligned(fn, [p for p in ptrs if p not in ("slot_ptr", "start_ptr", "seg_slot_ptr",
                                                                "scale_ptr")] + divisible),
                options=dict(num_warps=c["num_warps"], num_stages=c["num_stages"])))
    return specs
