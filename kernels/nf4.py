"""NF4: bitsandbytes' 4-bit NormalFloat weight format, bit for bit, and its dequantize kernel.

Format (what `bitsandbytes.functional.quantize_4bit(w, quant_type="nf4")` produces)
-------------------------------------------------------------------------------------
The weight W (N, K) is flattened row-major to n = N*K values and cut into blocks of `blocksize` consecutive values
(32..4096; 64 by default). Blocks run across row ends when K is not a multiple of the blocksize; the last block
may be short.

    absmax[b] = max_{i in b} |w_i|                                           fp32, one per block
    q_i       = the index of the NF4_TABLE entry nearest to w_i / absmax[b]  ties go to the lower index
    packed[j] = q_{2j} << 4 | q_{2j+1}                                       first element in the HIGH nibble
    w_i      ~= NF4_TABLE[q_i] * absmax[b]                                   fp32 product, then cast to dtype

NF4_TABLE is a lookup table of 16 quantiles of N(0, 1) scaled to [-1, 1], with an exact 0 at index 7.

Double quantization ("compress_statistics") stores absmax in 8 bits:

    offset      = mean(absmax)                                               fp32 scalar
    a           = absmax - offset
    nested[c]   = max_{b in c} |a_b|               over groups c of 256 consecutive blocks, fp32
    absmax8[b]  = the DYNAMIC_MAP index nearest to a_b / nested[c]           uint8, ties to the lower index
    absmax[b]  ~= DYNAMIC_MAP[absmax8[b]] * nested[c] + offset               two fp32 roundings (no FMA)

which takes the scale overhead from 32/64 = 0.5 to 8/64 + 32/(64*256) ~= 0.127 bits per weight.

Both steps round as bitsandbytes' reference (pure-torch "default" backend) does: a full block scales by
`x * (1 / absmax)`, a short tail block by `x / absmax`, then takes the nearest code by bucketizing on the fp32
midpoints. The 4-bit step is also what bitsandbytes' CPU build runs. For the 8-bit nested step its CPU build uses a
native kernel that looks codes up on a 2**-15 grid instead of rounding to the nearest code; it differs from the
reference (and from us) on ~0.15% of the absmax codes, by one or two codes. Checkpoints written by it load
exactly (we read its codes); only re-quantizing a weight can differ in those codes. tests/kernels/test_nf4.py pins both facts.

Shape legend: N = out_features, K = in_features, n = N*K, nb = ceil(n / blocksize) blocks,
nnb = ceil(nb / nested_blocksize) nested groups.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

NF4_TABLE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)


def _dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic-exponent map (256 sorted fp32 values in [-0.993, 1]).

    For exponent e = 0..6 there are 2**e fraction levels: the midpoints of linspace(0.1, 1, 2**e + 1), times
    10**(e - 6), with both signs; plus 0 and 1. Computed in fp32 the way bitsandbytes computes it.
    """
    values: list[float] = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        level = (10 ** (e - 6)) * mids
        values += level.tolist() + (-level).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_MAP = _dynamic_map()


@dataclass
class NF4Weight:
    """A (N, K) weight in bitsandbytes' NF4 layout."""

    packed: torch.Tensor  # uint8 (ceil(n/2),): row-major (N, K) flattened; element 2i in the HIGH nibble of byte i
    absmax: torch.Tensor  # float32 (nb,) or, when double-quantized, uint8 codes of (absmax - offset)
    shape: tuple[int, int]  # (N, K) = (out_features, in_features)
    blocksize: int = 64
    code: torch.Tensor | None = None  # float32 (16,) the NF4 table (bnb's quant_map)
    nested_absmax: torch.Tensor | None = None  # float32 (nnb,) when double-quantized
    nested_code: torch.Tensor | None = None  # float32 (256,) bnb's dynamic map
    nested_blocksize: int = 256
    offset: float = 0.0  # mean absmax subtracted before double quantization
    dtype: torch.dtype = torch.bfloat16  # the original / compute dtype

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"NF4 blocksize must be one of {BLOCKSIZES}, got {self.blocksize}")
        if self.code is None:
            self.code = NF4_TABLE.to(self.packed.device)
        n = self.numel
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (n + 1) // 2:
            raise ValueError(f"NF4 packed must be uint8 with {(n + 1) // 2} bytes for shape {self.shape}, "
                             f"got {self.packed.dtype} with {self.packed.numel()}")
        self.packed = self.packed.reshape(-1)
        n_blocks = -(-n // self.blocksize)
        if self.absmax.numel() != n_blocks:
            raise ValueError(f"NF4 absmax must have {n_blocks} entries for shape {self.shape} and blocksize "
                             f"{self.blocksize}, got {self.absmax.numel()}")
        self.absmax = self.absmax.reshape(-1)
        if self.double_quant:
            if self.absmax.dtype != torch.uint8 or self.nested_absmax is None:
                raise ValueError("double-quantized NF4 needs uint8 absmax codes, nested_absmax and nested_code")
            if self.nested_code is None:
                self.nested_code = DYNAMIC_MAP.to(self.packed.device)
            groups = -(-n_blocks // self.nested_blocksize)
            if self.nested_absmax.numel() != groups:
                raise ValueError(f"NF4 nested_absmax must have {groups} entries, got {self.nested_absmax.numel()}")
            self.nested_absmax = self.nested_absmax.reshape(-1)
        elif self.absmax.dtype != torch.float32:
            raise ValueError(f"NF4 absmax must be float32 without double quantization, got {self.absmax.dtype}")

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None or self.absmax.dtype == torch.uint8

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block scales as float32 (nb,), undoing double quantization exactly as bitsandbytes does."""
        if not self.double_quant:
            return self.absmax
        nb, g = self.absmax.numel(), self.nested_blocksize
        scaled = self.nested_code[self.absmax.long()]  # (nb,)
        pad = (-nb) % g
        scaled = torch.nn.functional.pad(scaled, (0, pad)).view(-1, g)  # (nnb, 256)
        scaled = (scaled * self.nested_absmax.view(-1, 1)).reshape(-1)[:nb]  # (nb,)
        return scaled + torch.tensor(self.offset, dtype=torch.float32, device=scaled.device)

    def to(self, device: torch.device | str) -> "NF4Weight":
        def move(t):
            return None if t is None else t.to(device)

        return replace(self, packed=move(self.packed), absmax=move(self.absmax), code=move(self.code),
                       nested_absmax=move(self.nested_absmax), nested_code=move(self.nested_code))

    @property
    def nbytes(self) -> int:
        """Bytes held by the quantized weight: nibbles, scales, nested scales and the two lookup tables."""
        ts = (self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


# ---------------------------------------------------------------------------------------------------------------
# Quantization (torch; runs once per weight, so it is not a kernel)
# ---------------------------------------------------------------------------------------------------------------

_CHUNK = 1 << 20  # values per step: bounds the fp32 temporaries of quantizing one weight to a few MB


def _nearest(scaled: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a sorted table; a value exactly on a midpoint goes to the lower entry."""
    midpoints = (table[:-1] + table[1:]) / 2  # fp32, as bitsandbytes computes them
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)


def _quantize_blockwise(flat: torch.Tensor, table: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flat (n,) any float dtype -> (codes uint8 (n,), absmax fp32 (nb,)) against a sorted code table in [-1, 1].

    Full blocks scale by the reciprocal `x * (1 / absmax)`, the short tail block divides, as bitsandbytes does;
    a zero block scales by 0 * 1e38 = 0.
    """
    table = table.to(flat.device)
    n = flat.numel()
    full_blocks, rem = divmod(n, blocksize)
    codes = torch.empty(n, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(full_blocks + (rem > 0), dtype=torch.float32, device=flat.device)
    step = max(1, _CHUNK // blocksize)
    for b0 in range(0, full_blocks, step):
        b1 = min(b0 + step, full_blocks)
        x = flat[b0 * blocksize:b1 * blocksize].float().view(b1 - b0, blocksize)  # (blocks, blocksize)
        am = x.abs().amax(dim=1)
        absmax[b0:b1] = am
        scaled = (x * (1.0 / am.clamp(min=1e-38)).view(-1, 1)).clamp_(-1, 1)  # (blocks, blocksize) * (blocks, 1)
        codes[b0 * blocksize:b1 * blocksize] = _nearest(scaled.view(-1), table)  # (blocks * blocksize,)
    if rem:
        x = flat[full_blocks * blocksize:].float()
        am = x.abs().amax().clamp(min=1e-38)  # the tail's stored absmax is clamped too, as in bitsandbytes
        absmax[-1] = am
        codes[full_blocks * blocksize:] = _nearest((x / am).clamp(-1, 1), table)
    return codes, absmax


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a (N, K) weight exactly as `bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type="nf4",
    compress_statistics=double_quant)` does: same packed bytes, absmax (or its codes), nested absmax and offset."""
    if w.dim() != 2:
        raise ValueError(f"quantize_nf4 expects a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quantize_nf4 expects fp32/fp16/bf16, got {w.dtype}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"NF4 blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    codes, absmax = _quantize_blockwise(w.detach().reshape(-1), NF4_TABLE, blocksize)  # (n,), (nb,)
    if codes.numel() % 2:
        codes = torch.nn.functional.pad(codes, (0, 1), value=7)  # bitsandbytes pads with 0.0, which is code 7
    packed = (codes[0::2] << 4) | codes[1::2]  # (ceil(n/2),)
    del codes
    q = dict(packed=packed, shape=tuple(w.shape), blocksize=blocksize, dtype=w.dtype,
             code=NF4_TABLE.to(w.device))
    if not double_quant:
        return NF4Weight(absmax=absmax, **q)
    offset = absmax.mean()
    absmax8, nested = _quantize_blockwise(absmax - offset, DYNAMIC_MAP, 256)  # (nb,), (nnb,)
    return NF4Weight(absmax=absmax8, nested_absmax=nested, nested_code=DYNAMIC_MAP.to(w.device),
                     offset=offset.item(), **q)


# ---------------------------------------------------------------------------------------------------------------
# Dequantization: w[i] = NF4_TABLE[q_i] * absmax[i // blocksize]
#
# One program writes BLOCK consecutive elements of the flattened (N, K) output. Element i lives in byte i // 2,
# high nibble when i is even. Its scale is absmax[i // blocksize], itself rebuilt from the uint8 code and the
# nested group (i // blocksize) // 256 when double-quantized. Every load is a gather from small tables or a
# contiguous run of bytes, so the kernel is bound by writing the output.
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _nf4_dequantize_kernel(
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, out_ptr,
    n, offset,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) flat element index; int64 past 2**31 elements
    mask = i < n
    byte = tl.load(packed_ptr + i // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(i % 2 == 0, byte >> 4, byte & 0xF)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)  # (BLOCK,) fp32 NF4_TABLE[q]
    block = i // BLOCKSIZE
    if DOUBLE_QUANT:
        a8 = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + a8, mask=mask, other=0.0) * tl.load(
            nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = scale + offset  # a separate rounding: the launcher turns off FMA contraction
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    tl.store(out_ptr + i, (value * scale).to(out_ptr.dtype.element_ty), mask=mask)


def _nf4_dequantize_triton(q: NF4Weight, dtype: torch.dtype | None = None, BLOCK: int = 1024) -> torch.Tensor:
    dtype = q.dtype if dtype is None else dtype
    out = torch.empty(q.shape, dtype=dtype, device=q.device)  # (N, K)
    n = q.numel
    if n == 0:
        return out
    dq = q.double_quant
    dummy = q.absmax  # unused pointer slots when not double-quantized
    grid = (triton.cdiv(n, BLOCK),)
    launch = {} if os.environ.get("TRITON_INTERPRET") == "1" else {"enable_fp_fusion": False}
    _nf4_dequantize_kernel[grid](
        q.packed, q.absmax, q.code, q.nested_absmax if dq else dummy, q.nested_code if dq else dummy, out,
        n, float(q.offset),
        BLOCKSIZE=q.blocksize, NESTED_BLOCKSIZE=q.nested_blocksize, DOUBLE_QUANT=dq, BLOCK=BLOCK, **launch,
    )
    return out


def dequantize_nf4_ref(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure-torch dequantize, equal to `bitsandbytes.functional.dequantize_4bit`: (N, K) in `dtype` (q.dtype)."""
    dtype = q.dtype if dtype is None else dtype
    n, bs = q.numel, q.blocksize
    p = q.packed
    codes = torch.stack([p >> 4, p & 0xF], dim=1).view(-1)[:n]  # (n,) high nibble first
    values = q.code[codes.long()]  # (n,) fp32
    absmax = q.absmax_fp32()  # (nb,)
    full = n - n % bs
    out = torch.empty(n, dtype=dtype, device=p.device)
    out[:full] = (values[:full].view(-1, bs) * absmax[: full // bs].view(-1, 1)).view(-1).to(dtype)  # (n,)
    if full < n:
        out[full:] = (values[full:] * absmax[-1]).to(dtype)
    return out.view(q.shape)


def nf4_dequantize(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize to a dense (N, K) tensor: CUDA tensors (or PHIFORGE_KERNELS=triton) -> Triton, else torch."""
    if q.packed.is_cuda or os.environ.get("PHIFORGE_KERNELS") == "triton":
        return _nf4_dequantize_triton(q, dtype)
    return dequantize_nf4_ref(q, dtype)
