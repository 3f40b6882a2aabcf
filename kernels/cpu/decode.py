"""The whole decode step of a dense Phi-3 in one native call: embedding → 30 layers → lm_head, for 1-16 rows.

At batch 1 a decode step reads every weight once and does almost nothing else, so its speed limit is memory
bandwidth. The same GEMV called from Python once per projection falls well short of it (each call pays ctypes,
allocation and an OpenMP fork/join), and the ~1,000 small torch ops between them (norms, RoPE, attention over one
query, SwiGLU) cost as much as the GEMVs themselves. This file does the step as one C function (csrc/decode.c)
with one OpenMP parallel region: the GEMVs split weight rows over the threads, attention (csrc/decode_attention.h)
splits (row, head) pairs, and the small vector ops between barriers split the batch's rows. Python calls it once per
step. Batches (left-padded rows, pad slots at position -1) stream each weight once for all rows: a block of x's rows
(8 with AVX-512, 4 with AVX2) against one weight row at a time, more blocks against two (csrc/gemv.h).

It computes exactly what `DecodeStep` (engine/serve/decode.py) computes, rounding where torch rounds. With R(v) = v
rounded to the model dtype (identity for fp32, round-to-nearest-even for bf16), per layer:

    h   = x · rsqrt(mean(x²) + eps)  (fp32);  xn = R(w_norm · R(h))            RMSNorm, transformers' order
    qkv = R(xn · W_qkvᵀ)                                                     fp32 accumulation, one rounding
    q,k = R(R(q·cos) + R(rot(q)·sin)) on the first rd dims                   rot(q) = (-q[rd/2:], q[:rd/2])
    s_j = R(q · k_j) · hs^-½  (+ -inf for empty or out-of-window slots)     fp32 softmax, p = R(softmax(s))
    y   = R(Σ_j p_j v_j);  x = R(x + R(y · W_oᵀ))
    x   = R(x + R(R(R(silu(g)) · u) · W_downᵀ)),  (g, u) = R(xn₂ · W_gate_upᵀ)

Only the summation order and exp's last ulp (csrc/simd.h) differ from torch's kernels, so logits agree to
rounding (tests/kernels/cpu/test_decode.py compares them with `model.forward` and with the torch decode step).

Projections are dense fp32/bf16, or all NF4 (QLoRA's base model): then each projection runs kernels/cpu/nf4.py's
kernels, the very code the torch step calls per NF4 linear, so the sums are the same: the fused dequantize-GEMV up
to nf4_cpu.GEMV_MAX_M rows, and from tile_min_m() up to TILE_MAX_M rows the tile GEMM (beyond, the torch step
dequantizes the whole weight and runs a GEMM instead). NF4 reads a quarter of the bytes
(bench/bench_generate.py measures what that buys). The engine (engine/serve/decode.py) hands over the weights as tensors
(`DecodeWeights`); a single-adapter LoRA projection, more than MAX_BATCH rows, or a library that cannot run
(kernels/cpu/native.py says why: it needs AVX2 + FMA at least) keeps the torch step.

Many adapters in one batch (the serving engine's AdapterSet, engine/serve/multi_lora.py): `set_lora` takes each
projection's stacked adapters (`LoRAStack`) and a call's `lora_slots` name each row's; after each projection the
rows with an adapter add its delta, y += R(R(x·A_sᵀ)·R(s_s))·B_sᵀ rounded once (csrc/decode_lora.h), rows grouped
by adapter so each adapter's A and B are read once a step: the roundings of kernels/lora_gather.py's CPU path, so the
step equals the torch step with the same adapters. The C is written once for two
vector widths (csrc/simd.h's vfloat): AVX-512 (16 lanes; bf16 on AVX512-BF16's dot product where the CPU has it)
and AVX2 (8 lanes, bf16 widened to fp32), the same roundings in the same places on both.

Legend: C hidden, nh/nkv query/KV heads, hs head dim, rd rotary dims, I intermediate, V vocabulary, S cache slots
(adapter slots in LoRAStack), R padded LoRA rank, K/N a projection's in/out features.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from phiforge.kernels.cpu import native, nf4 as nf4_cpu
from phiforge.kernels.nf4 import NF4Weight

_P, _L = ctypes.c_void_p, ctypes.c_int64


class _Model(ctypes.Structure):
    """csrc/decode.h's Model, checked field by field against the compiled library at load (`check_layout`)."""
    _fields_ = ([(n, ctypes.c_int) for n in ("B", "L", "C", "nh", "nkv", "hs", "rd", "I", "V", "smax", "window",
                                             "bf", "threads")]
                + [("eps", ctypes.c_float), ("scale", ctypes.c_float)]
                + [(n, ctypes.POINTER(_P)) for n in ("in_norm", "qkv_w", "o_w", "post_norm", "gate_up_w", "down_w")]
                + [(n, _P) for n in ("final_norm", "lm_head", "embed", "cos", "sin", "k_cache", "v_cache", "pos",
                                     "x", "xn", "qkv", "att", "proj", "gu", "mid", "scores", "xb")]
                + [("nf4", ctypes.c_int), ("xe", _P), ("xo", _P), ("tile", _P), ("nrows", ctypes.c_int), ("rows", _P)]
                + [("lora", _P), ("lora_slots", ctypes.c_int), ("lora_slot", _P), ("lh", _P), ("lgroup", _P),
                   ("lng", ctypes.c_int), ("lora_rowwise", ctypes.c_int), ("invariant", ctypes.c_int)])


class _NF4Desc(ctypes.Structure):
    """csrc/decode.h's NF4Desc: one NF4 weight as the step's projections read it; checked like _Model."""
    _fields_ = ([(n, _P) for n in ("packed", "absmax", "code", "ncode", "nabs")]
                + [("offset", ctypes.c_float)] + [(n, ctypes.c_int) for n in ("dq", "bs", "nbs")])

    @classmethod
    def of(cls, q: NF4Weight) -> "_NF4Desc":
        dq = q.double_quant
        return cls(packed=q.packed.data_ptr(), absmax=q.absmax.data_ptr(), code=q.code.data_ptr(),
                   ncode=q.nested_code.data_ptr() if dq else None, nabs=q.nested_absmax.data_ptr() if dq else None,
                   offset=float(q.offset), dq=int(dq), bs=q.blocksize, nbs=q.nested_blocksize)


class _LoRA(ctypes.Structure):
    """csrc/decode.h's LoRA: one projection's stacked adapters (`LoRAStack`); checked like _Model."""
    _fields_ = [(n, _P) for n in ("A", "Bt", "scale", "rank", "lo", "hi")] + [("R", ctypes.c_int)]


@dataclass
class LoRAStack:
    """One projection's resident adapters as csrc/decode_lora.h reads them, all contiguous on the CPU: A (S, R, K)
    and Bt (S, R, N) (lora_B transposed per slot) in the model dtype, scale (S,) fp32, and per slot int32 rank
    (0: the slot leaves this projection alone) and the output rows [lo, hi) its B can change."""
    A: torch.Tensor
    Bt: torch.Tensor
    scale: torch.Tensor
    rank: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    def fits(self, K: int, N: int, S: int, dtype: torch.dtype) -> bool:
        ints = (self.rank, self.lo, self.hi)
        return (self.A.dtype == self.Bt.dtype == dtype and self.A.shape[0] == S and self.A.shape[2] == K
                and self.Bt.shape == (S, self.A.shape[1], N) and self.scale.dtype == torch.float32
                and all(t.dtype == torch.int32 and t.shape == (S,) for t in ints)
                and all(t.is_contiguous() and t.device.type == "cpu" for t in (self.A, self.Bt, self.scale, *ints)))


def check_layout(lib: ctypes.CDLL, struct: type[ctypes.Structure], prefix: str) -> None:
    """Raise ValueError unless `struct` has exactly the C struct's fields at its offsets and its size (the C side
    reports them: `<prefix>_size`, `_fields`, `_offset(name)`)."""
    size, count, offset = (getattr(lib, f"{prefix}_{s}") for s in ("size", "fields", "offset"))
    wrong = [f"{n}: ctypes {getattr(struct, n).offset}, C {offset(n.encode())}" for n, *_ in struct._fields_
             if offset(n.encode()) != getattr(struct, n).offset]
    if wrong or ctypes.sizeof(struct) != size() or len(struct._fields_) != count():
        raise ValueError(f"{struct.__name__} does not match csrc/decode.h ({prefix}): sizes {ctypes.sizeof(struct)} "
                         f"vs {size()}, fields {len(struct._fields_)} vs {count()}; {'; '.join(wrong)}")


def _check(lib: ctypes.CDLL) -> None:
    check_layout(lib, _Model, "decode_model")
    check_layout(lib, _NF4Desc, "decode_nf4desc")
    check_layout(lib, _LoRA, "decode_lora")


_LAYOUT = {f"{p}_{s}": (_L, a) for p in ("decode_model", "decode_nf4desc", "decode_lora")
           for s, a in (("size", []), ("fields", []), ("offset", [ctypes.c_char_p]))}
LIB = native.NativeLib("cpu_decode", "decode.c", tiers=("avx512bf16", "avx512", "avx2"), check=_check, functions={
    "decode_step": (None, [ctypes.POINTER(_Model), _P, _P, _P, _P, _P]),
    **_LAYOUT,
})
MAX_BATCH = 16  # rows one step takes natively (weights stream once for all of them)


@dataclass
class DecodeWeights:
    """What the step reads, as tensors: per layer the four projections (dense (N, K) tensors or NF4Weight) and two
    RMSNorm weights (C,), then the embedding (V, C), final norm and lm_head (V, C); and the shape numbers."""
    qkv: list[torch.Tensor | NF4Weight]
    o: list[torch.Tensor | NF4Weight]
    gate_up: list[torch.Tensor | NF4Weight]
    down: list[torch.Tensor | NF4Weight]
    input_norm: list[torch.Tensor]
    post_norm: list[torch.Tensor]
    embed: torch.Tensor
    final_norm: torch.Tensor
    lm_head: torch.Tensor
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int
    eps: float
    window: int | None = None

    @property
    def projections(self) -> list[list[torch.Tensor | NF4Weight]]:
        return [self.qkv, self.o, self.gate_up, self.down]


def _dense_ok(w: object, dtype: torch.dtype) -> bool:
    return isinstance(w, torch.Tensor) and w.dtype == dtype and w.device.type == "cpu" and w.is_contiguous()


class NativeDecode:
    """`NativeDecode.create(weights, k_cache, v_cache, pos, cos, sin)` → a callable `(tokens (B,), positions (B,),
    slot, rows=None) -> logits (B, V)`, or None when the weights or cache are outside what the C step covers (then
    the torch step runs). Row b of a call is cache row `rows[b]` (default: all cache rows in order) and writes its
    K/V into its own slot `slot[b]` (an int: the same slot for every row), attending to that row's slots up to it;
    at most `max_rows` rows a call."""

    @classmethod
    def create(cls, w: DecodeWeights, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor) -> "NativeDecode | None":
        dtype = w.embed.dtype
        lib = LIB.get()
        if (lib is None or dtype not in (torch.float32, torch.bfloat16)
                or k_cache.dtype != dtype or v_cache.dtype != dtype or k_cache.device.type != "cpu"):
            return None
        mats = [m for ms in w.projections for m in ms]
        dense = all(_dense_ok(m, dtype) for m in mats)
        nf4 = not dense and all(isinstance(m, NF4Weight) and nf4_cpu.gemv_ready(m)
                                                            for m in mats)
        flat = [w.embed, w.final_norm, pos, k_cache, v_cache, *w.input_norm, *w.post_norm]  # read through pointers
        if not (dense or nf4) or not _dense_ok(w.lm_head, dtype) \
                or not all(t.dtype == dtype for t in [w.embed, w.final_norm, *w.input_norm, *w.post_norm]) \
                or not all(t.is_contiguous() for t in flat):
            return None
        return cls(lib, w, k_cache, v_cache, pos, cos, sin)

    def __init__(self, lib: ctypes.CDLL, w: DecodeWeights, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        dtype = w.embed.dtype
        f32 = lambda n: torch.empty(n, dtype=torch.float32)  # noqa: E731
        L, nrows, smax = k_cache.shape[0], k_cache.shape[1], k_cache.shape[3]
        nf4 = isinstance(w.qkv[0], NF4Weight)
        B = min(nrows, MAX_BATCH, nf4_cpu.TILE_MAX_M if nf4 else MAX_BATCH)  # scratch for the most rows a call
        V, C = w.embed.shape
        nh, nkv, hs, inter = w.heads, w.kv_heads, w.head_dim, w.down[0].shape[1]
        self.cos, self.sin = cos.to(dtype).contiguous(), sin.to(dtype).contiguous()   # (S_max, rd)
        kmax = max(C, inter, nh * hs)                                                  # the widest projection input
        self.scratch = dict(x=f32(B * C), xn=f32(B * C), qkv=f32(B * (nh + 2 * nkv) * hs), att=f32(B * nh * hs),
                            proj=f32(B * C), gu=f32(B * 2 * inter), mid=f32(B * inter),
                            scores=f32(B * max(nh * smax, V)), xb=torch.empty(B * kmax, dtype=torch.int16))
        if nf4:  # the GEMV input split into even / odd columns; the tile GEMM's tiles, one a thread
            tiles = self._tiles(torch.get_num_threads(), kmax)
            self.scratch.update(xe=f32(B * kmax // 2), xo=f32(B * kmax // 2), tile=tiles)
        ptrs = lambda ts: (_P * len(ts))(*[t.data_ptr() for t in ts])  # noqa: E731
        # NF4: each projection pointer points at its NF4Desc (kept alive in self._descs)
        self._descs = [[_NF4Desc.of(m) for m in ms] for ms in w.projections] if nf4 else None
        arrays = ([(_P * len(ds))(*[ctypes.addressof(d) for d in ds]) for ds in self._descs] if nf4
                  else [ptrs(ms) for ms in w.projections])
        arrays += [ptrs(w.input_norm), ptrs(w.post_norm)]
        qkv, o, gu, down, in_norm, post_norm = self._arrays = arrays
        self._keep = (w, k_cache, v_cache, pos)  # every pointer below stays valid while this lives
        self.m = _Model(B=B, L=L, C=C, nh=nh, nkv=nkv, hs=hs, rd=w.rotary_dim, I=inter, V=V, smax=smax,
                        window=w.window or 0, bf=int(dtype == torch.bfloat16), threads=torch.get_num_threads(),
                        eps=w.eps, scale=hs ** -0.5, in_norm=in_norm, qkv_w=qkv, o_w=o, post_norm=post_norm,
                        gate_up_w=gu, down_w=down, final_norm=w.final_norm.data_ptr(), lm_head=w.lm_head.data_ptr(),
                        embed=w.embed.data_ptr(), cos=self.cos.data_ptr(), sin=self.sin.data_ptr(),
                        k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(), pos=pos.data_ptr(),
                        nf4=int(nf4), nrows=nrows, rows=None, **{k: t.data_ptr() for k, t in self.scratch.items()})
        self.lib, self.dtype, self.vocab, self.max_rows, self.nrows = lib, dtype, V, B, nrows
        self._all_rows = torch.arange(nrows, dtype=torch.int64)
        self._kn = [(C, (nh + 2 * nkv) * hs), (nh * hs, C), (C, 2 * inter), (inter, C)]  # (K, N) per projection
        self.lora_slots = 0  # adapter slots of the stacks set_lora took; 0: none

    @staticmethod
    def _tiles(threads: int, kmax: int) -> torch.Tensor:
        return torch.empty(threads, nf4_cpu.TILE_ROWS, kmax, dtype=torch.float32)  # one tile a thread, fp32 or bf16

    def set_lora(self, stacks: list[list[LoRAStack | None]] | None) -> bool:
        """Take the adapters of every projection (per layer: qkv, o, gate_up, down; None where no adapter is
        resident), or drop them (None). False, and none taken, when a stack does not fit the model (shape, dtype,
        slot count): then steps with adapter rows must run the torch step. The tensors must stay unchanged while
        they are set (the caller sets them again after any load or unload)."""
        self.m.lora, self.m.lora_slots, self.lora_slots, self._lora = None, 0, 0, None
        present = [st for layer in stacks or [] for st in layer if st is not None]
        if not present:
            return stacks is None or len(stacks) == self.m.L
        S = present[0].A.shape[0]
        if len(stacks) != self.m.L or any(len(layer) != 4 for layer in stacks) or not all(
                st.fits(K, N, S, self.dtype) for layer in stacks for st, (K, N) in zip(layer, self._kn)
                if st is not None):
            return False
        descs = (_LoRA * (4 * self.m.L))()
        for i, st in enumerate(st for layer in stacks for st in layer):
            if st is not None:
                descs[i] = _LoRA(A=st.A.data_ptr(), Bt=st.Bt.data_ptr(), scale=st.scale.data_ptr(),
                                 rank=st.rank.data_ptr(), lo=st.lo.data_ptr(), hi=st.hi.data_ptr(), R=st.A.shape[1])
        B = self.max_rows
        lh = torch.empty(B * max(st.A.shape[1] for st in present), dtype=torch.float32)   # (B, R)
        lgroup = torch.empty(3 * B + 1, dtype=torch.int32)                                  # rows, slots, starts
        self._lora = (stacks, descs, lh, lgroup)  # every pointer the step reads stays valid while set
        self.m.lora, self.m.lora_slots, self.m.lh, self.m.lgroup = \
            ctypes.addressof(descs), S, lh.data_ptr(), lgroup.data_ptr()
        self.lora_slots = S
        return True

    def set_invariant(self, on: bool) -> None:
        """Batch-invariant: every row count through the same kernels (the GEMM's one FMA chain per output, NF4's
        tile GEMM), so a row's logits are bitwise the same whatever else is in the step (csrc/decode.c's gemv)."""
        self.m.invariant = int(on)

    def set_lora_rowwise(self, on: bool) -> None:
        """The LoRA epilogue one row at a time instead of grouping rows by adapter (each adapter's A and B read
        once per row, not once per step): the same sums, kept to measure what grouping buys."""
        self.m.lora_rowwise = int(on)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slot: int | torch.Tensor,
                 rows: torch.Tensor | None = None, lora_slots: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, positions (B,) → logits (B, V); row b's K/V written into slot `slot` (or `slot[b]`) of cache row
        `rows[b]` (default: every cache row, in order). `lora_slots` (B,): row b adds the delta of the adapter in
        slot lora_slots[b] of the stacks set_lora took (-1: none)."""
        rows = self._all_rows if rows is None else rows.to(torch.int64).contiguous()     # (B,)
        B = rows.shape[0]
        if not (tokens.shape == positions.shape == (B,) and 0 < B <= self.max_rows):
            raise ValueError(f"native decode: tokens {tuple(tokens.shape)}, positions {tuple(positions.shape)}, "
                             f"rows {B}: expected (B,) each with 1 <= B <= {self.max_rows}")
        slots = torch.full((B,), slot, dtype=torch.int64) if isinstance(slot, int) \
            else slot.to(torch.int64).contiguous()                                        # (B,)
        if lora_slots is not None and not self.lora_slots:
            lora_slots = None  # no stack holds an adapter: every row's delta is zero
        if lora_slots is not None:
            lora_slots = lora_slots.to(torch.int64).contiguous()                          # (B,)
            if lora_slots.shape != (B,) or int(lora_slots.max()) >= self.lora_slots or int(lora_slots.min()) < -1:
                raise ValueError(f"native decode: lora_slots {lora_slots.tolist()} for {B} rows: expected -1.."
                                 f"{self.lora_slots - 1} each (set_lora holds {self.lora_slots} slots)")
        self.m.lora_slot = None if lora_slots is None else lora_slots.data_ptr()
        self.m.threads, self.m.B = torch.get_num_threads(), B
        tiles = self.scratch.get("tile")
        if tiles is not None and tiles.shape[0] < self.m.threads:  # more threads than at creation: a tile each
            self.scratch["tile"] = self._tiles(self.m.threads, tiles.shape[2])
            self.m.tile = self.scratch["tile"].data_ptr()
        tokens = tokens.to(torch.int64).contiguous()                                      # (B,)
        positions = positions.to(torch.int64).contiguous()                                # (B,)
        logits = torch.empty(B, self.vocab, dtype=self.dtype)                             # (B, V)
        self.lib.decode_step(ctypes.byref(self.m), tokens.data_ptr(), positions.data_ptr(), rows.data_ptr(),
                             slots.data_ptr(), logits.data_ptr())
        return logits
