"""Many LoRA adapters resident at once, and a batch whose rows each use a different one (or none).

`AdapterSet(model)` swaps every decoder projection (dense nn.Linear or NF4Linear) for a `MultiLoRALinear`: the
same base layer, computing exactly what it computed before, plus the gathered LoRA delta of kernels/lora_gather.py
over stacked slots:

    y = x·Wᵀ + s_i·(x·A_iᵀ)·B_iᵀ          i = the slot of x's row; slot -1 (the base model) adds nothing

    lora_A (S, R, K)   lora_B (S, N, R)   scales (S,)     one slot per resident adapter, ranks zero-padded to R
                       (B stored as (N, S, R), see MultiLoRALinear)

Adapters are PEFT directories as `phiforge finetune` writes them, read through engine/formats/peft.py's `load_adapter`
(so split q/k/v imports, rank_pattern, alpha_pattern and rsLoRA mean here what they mean everywhere) onto a weightless
stand-in of the model, then copied into a free slot. An adapter that does not target a projection leaves that slot
of it at rank 0: its rows get the base output there.

The engine tells the layers which rows use which slot for the next step:

    with adapters.rows(slots):                 # slots (B,): one per row of the (B, T) batch; T = 1 when decoding
        logits = step(...)
    with adapters.rows(seg_slots, seg_lens):   # a packed prefill: G runs of seg_lens[g] tokens, slot seg_slots[g]
        logits = model(packed_ids)

Base and adapter must match: a QLoRA adapter (training_args.json method "qlora") was trained against the
NF4-dequantized weights and belongs on an NF4 base; a LoRA one on the dense base. A mismatch is refused unless
`allow_base_mismatch` (the engine picks the base at start from its adapters: `peft.trained_base(path)`).

Thread safety: `load`/`unload` take a lock and write only the slot they own, so they may run beside a step on
other slots; the engine must not unload an adapter while rows of it are running. The native decode step reads a copy
of the stacks (`native_stack`, B transposed) taken again whenever a layer's `version` has moved since.

Legend: B rows, T tokens a row, M = B·T tokens, K in_features, N out_features, S slots, R padded rank, G segments.
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from phiforge.engine.formats.peft import METHOD_OF_BASE, AdapterError, load_adapter, trained_base
from phiforge.engine.model.lora import LoRALinear, base_device, base_dtype, base_features, lora_modules
from phiforge.engine.model.phi3 import LINEAR_NAMES
from phiforge.engine.model.quant import NF4Linear, quantize_model_
from phiforge.kernels.cpu.decode import LoRAStack
from phiforge.kernels.lora_gather import lora_gather_, segments_to_slots


DEFAULT_MAX_ADAPTERS = 8  # adapter slots when adapters are given without max_adapters
log = logging.getLogger(__name__)

class _Rows:
    """The slot assignment of the next forward, shared by every MultiLoRALinear of one AdapterSet."""

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None      # (B,) per row, or (G,) per segment
        self.seg_lens: torch.Tensor | None = None   # (G,) or None
        self._tokens: dict[int, tuple] = {}          # M -> (token slots (M,), seg_lens, seg_slots): once per step

    def set(self, slots: torch.Tensor | None, seg_lens: torch.Tensor | None) -> None:
        self.slots, self.seg_lens, self._tokens = slots, seg_lens, {}

    def for_tokens(self, M: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                   torch.Tensor | None]:
        """(token slots (M,), seg_lens, seg_slots) for an input of M tokens; seg_* None for one token a row."""
        hit = self._tokens.get(M)
        if hit is not None:
            return hit
        slots = self.slots.to(device)
        if self.seg_lens is not None:
            lens = self.seg_lens.to(device)
            if int(lens.sum()) != M:
                raise ValueError(f"adapter rows: segments cover {int(lens.sum())} tokens, the input has {M}")
            out = (segments_to_slots(lens, slots), lens, slots)
        else:
            B = slots.numel()
            if B == 0 or M % B:
                raise ValueError(f"adapter rows: {B} row slots for an input of {M} tokens")
            T = M // B
            lens = torch.full((B,), T, dtype=torch.int64, device=device)
            out = (torch.repeat_interleave(slots, T), lens if T > 1 else None, slots if T > 1 else None)
        self._tokens[M] = out
        return out


class MultiLoRALinear(nn.Module):
    """A frozen base projection (dense or NF4) plus the LoRA delta of each row's slot."""

    def __init__(self, base: nn.Module, n_slots: int, rank: int, rows: _Rows) -> None:
        super().__init__()
        in_f, out_f = base_features(base)
        dev, dtype = base_device(base), base_dtype(base)
        self.base_layer = base
        self.in_features, self.out_features = in_f, out_f
        self._rows = rows
        # stacked in the compute dtype: LoRALinear casts its fp32 weights to the activations' dtype the same way
        self.register_buffer("lora_A", torch.zeros(n_slots, rank, in_f, device=dev, dtype=dtype), persistent=False)
        # B is stored (N, S, R) and read as the (S, N, R) view: the CPU path's [B_0 … B_{S-1}] is then a free reshape
        self.register_buffer("lora_B_nsr", torch.zeros(out_f, n_slots, rank, device=dev, dtype=dtype),
                             persistent=False)
        self.register_buffer("scales", torch.zeros(n_slots, device=dev), persistent=False)
        self.ranks = [0] * n_slots  # 0: the slot is free or its adapter does not target this projection
        self.version = 0            # bumped by every change of the stacks: the native step's copy is then stale

    @property
    def lora_B(self) -> torch.Tensor:
        return self.lora_B_nsr.permute(1, 0, 2)  # (S, N, R) view

    def grow_rank(self, rank: int) -> None:
        """Re-pad the stacks to `rank` (zeros: exact)."""
        S, R, K = self.lora_A.shape
        if rank <= R:
            return
        A = self.lora_A.new_zeros(S, rank, K)
        B = self.lora_B_nsr.new_zeros(self.out_features, S, rank)
        A[:, :R] = self.lora_A
        B[:, :, :R] = self.lora_B_nsr
        self.lora_A, self.lora_B_nsr = A, B
        self.version += 1

    @torch.no_grad()
    def set_slot(self, i: int, A: torch.Tensor | None, B: torch.Tensor | None, scaling: float = 0.0) -> None:
        """Slot i := (A (r, K), B (N, r), scaling), or empty with A None."""
        self.lora_A[i].zero_()
        self.lora_B[i].zero_()
        if A is None:
            self.scales[i], self.ranks[i] = 0.0, 0
        else:
            r = A.shape[0]
            self.lora_A[i, :r] = A
            self.lora_B[i, :, :r] = B
            self.scales[i], self.ranks[i] = float(scaling), r
        self.version += 1  # after the writes: a copy taken meanwhile carries the old version and is taken again

    def decode_slots(self) -> torch.Tensor | None:
        """The slot of each row (B,) of the next one-token-a-row forward, or None when no row has an adapter."""
        return self._rows.slots if self._rows.seg_lens is None else None

    def native_stack(self) -> LoRAStack | None:
        """These stacks as the native decode step reads them (kernels/cpu/decode.py), or None when no resident
        adapter targets this projection. A copy (B transposed per slot), so rebuild it when `version` changes."""
        if not any(self.ranks):
            return None
        B = self.lora_B_nsr                                                          # (N, S, R)
        touched = (B != 0).any(dim=2)                                                 # (N, S)
        n = torch.arange(B.shape[0])[:, None]                                         # (N, 1)
        lo = torch.where(touched, n, B.shape[0]).amin(dim=0)                          # (S,) first row B changes
        hi = torch.where(touched, n + 1, 0).amax(dim=0)                               # (S,) past the last
        ints = lambda v: torch.as_tensor(v, dtype=torch.int32).contiguous()  # noqa: E731
        return LoRAStack(A=self.lora_A.contiguous(), Bt=B.permute(1, 2, 0).contiguous(),  # (S, R, N)
                         scale=self.scales.float().contiguous(), rank=ints(self.ranks), lo=ints(lo), hi=ints(hi))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., K) -> (..., N)
        y = self.base_layer(x)
        rows = self._rows
        if rows.slots is None or not any(self.ranks):
            return y
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        y2 = y.view(-1, self.out_features)  # (M, N), written in place
        slots, seg_lens, seg_slots = rows.for_tokens(x2.shape[0], x2.device)
        lora_gather_(y2, x2, self.lora_A.to(x.dtype), self.lora_B.to(x.dtype), self.scales, slots,
                     seg_lens, seg_slots, ranks=self.ranks)
        return y

    def extra_repr(self) -> str:
        S, R, _ = self.lora_A.shape
        return f"in={self.in_features}, out={self.out_features}, slots={S}, max_rank={R}"


class _Site(nn.Module):
    """A weightless stand-in for a projection: what load_adapter reads off a base layer (features, device)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.empty(0)  # base_device reads .weight.device: the adapter is read onto the CPU


class AdapterSet:
    """The registry: up to `max_adapters` adapters resident, each in one slot of every MultiLoRALinear."""

    def __init__(self, model: nn.Module, max_adapters: int = 8, max_rank: int | None = None,
                 targets: tuple[str, ...] = LINEAR_NAMES, allow_base_mismatch: bool = False) -> None:
        if max_adapters < 1:
            raise ValueError(f"max_adapters must be at least 1, got {max_adapters}")
        if max_rank is not None and max_rank < 1:
            raise ValueError(f"max_rank must be positive, got {max_rank}")
        sites = list(model.linears(targets))
        bad = [n for n, m in sites if isinstance(m, (LoRALinear, MultiLoRALinear))]
        if bad:
            raise ValueError(f"{bad[0]} already carries an adapter: serve the base model (or merge the adapter first)")
        if not sites:
            raise ValueError(f"no projection named {list(targets)} in the model")
        self.model, self.max_adapters, self.max_rank = model, max_adapters, max_rank
        self.allow_base_mismatch = allow_base_mismatch
        self.quantized = any(isinstance(m, NF4Linear) for _, m in sites)
        self._rows = _Rows()
        self._lock = threading.Lock()
        self._slots: dict[str, int] = {}
        self.layers: dict[str, MultiLoRALinear] = {}
        for name, m in sites:
            layer = MultiLoRALinear(m, max_adapters, max_rank or 0, self._rows)
            model.set_submodule(name, layer)
            self.layers[name] = layer

    # -- registry --------------------------------------------------------------------------------------------------

    def load(self, name: str, path: str | Path, allow_base_mismatch: bool | None = None) -> int:
        """Read the PEFT directory `path` into a free slot under `name`; returns the slot."""
        if not isinstance(name, str) or not name.strip():
            raise AdapterError(f"adapter name must be a non-empty string, got {name!r}")
        path = Path(path)
        if not path.is_dir():
            raise AdapterError(f"{path}: not a directory (an adapter is a PEFT directory)")
        allow = self.allow_base_mismatch if allow_base_mismatch is None else allow_base_mismatch
        base = "nf4" if self.quantized else "dense"
        trained = trained_base(path)
        if trained is not None and trained != base and not allow:
            need = "the NF4 base (quant nf4)" if trained == "nf4" else "the dense base"
            raise AdapterError(f"{path / 'training_args.json'}: method {METHOD_OF_BASE[trained]}: the adapter was "
                               f"trained on {need}, but this model's base is {base}")
        weights = self._read(path)
        rank = max(A.shape[0] for A, _, _ in weights.values())
        if self.max_rank is not None and rank > self.max_rank:
            raise AdapterError(f"{path}: rank {rank} is over the maximum rank {self.max_rank}")
        with self._lock:
            if name in self._slots:
                raise AdapterError(f"adapter {name!r} is loaded already (unload it first)")
            free = sorted(set(range(self.max_adapters)) - set(self._slots.values()))
            if not free:
                raise AdapterError(f"adapter {name!r}: all {self.max_adapters} adapter slots are in use "
                                   f"(max adapters); unload one first")
            slot = free[0]
            for site, layer in self.layers.items():
                layer.grow_rank(rank)
                A, B, s = weights.get(site, (None, None, 0.0))
                layer.set_slot(slot, A, B, s)
            self._slots[name] = slot
        return slot

    def _read(self, path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """{site: (A (r, K), B (N, r), scaling)} through load_adapter onto a weightless copy of the module tree."""
        shadow = nn.Module()
        shadow.config = self.model.config
        for site, layer in self.layers.items():
            parent = shadow
            for part in site.split(".")[:-1]:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(site.rsplit(".", 1)[-1], _Site(layer.in_features, layer.out_features))
        load_adapter(shadow, path)
        return {site: (m.lora_A.weight.detach(), m.lora_B.weight.detach(), m.scaling)
                for site, m in lora_modules(shadow)}

    def unload(self, name: str) -> None:
        with self._lock:
            slot = self.slot(name)
            for layer in self.layers.values():
                layer.set_slot(slot, None, None)
            del self._slots[name]

    def slot(self, name: str | None) -> int:
        """The slot of a loaded adapter; -1 for None (the base model)."""
        if name is None:
            return -1
        try:
            return self._slots[name]
        except KeyError:
            raise AdapterError(f"adapter {name!r} is not loaded (loaded: {', '.join(self.names()) or 'none'})") \
                from None

    def names(self) -> list[str]:
        return sorted(self._slots, key=self._slots.__getitem__)

    def __contains__(self, name: object) -> bool:
        return name in self._slots

    # -- per step --------------------------------------------------------------------------------------------------

    @contextmanager
    def rows(self, slots: torch.Tensor, segments: torch.Tensor | None = None) -> Iterator[None]:
        """For the forwards inside: slots (B,) int, one per row of the (B, T, ...) input (-1: base model); or, with
        segments (G,) token counts of a packed input, slots (G,) one per segment. All -1 costs nothing."""
        slots = torch.as_tensor(slots, dtype=torch.int64).reshape(-1)
        if segments is not None:
            segments = torch.as_tensor(segments, dtype=torch.int64).reshape(-1)
            if segments.shape != slots.shape:
                raise ValueError(f"adapter rows: {slots.numel()} slots for {segments.numel()} segments")
        if slots.numel() and (int(slots.max()) >= self.max_adapters or int(slots.min()) < -1):
            raise ValueError(f"adapter rows: slots must be -1..{self.max_adapters - 1}, got {slots.tolist()}")
        previous = (self._rows.slots, self._rows.seg_lens)
        active = bool((slots >= 0).any())
        self._rows.set(slots if active else None, segments if active else None)
        try:
            yield
        finally:
            self._rows.set(*previous)


def serving_adapters(model: torch.nn.Module, adapters: dict[str, str], max_adapters: int | None) -> AdapterSet | None:
    """Wrap the model for `max_adapters` resident adapters and load `adapters`, on the base they were trained on."""
    n = (DEFAULT_MAX_ADAPTERS if adapters else 0) if max_adapters is None else max_adapters
    if n < 0 or len(adapters) > n:
        raise ValueError(f"max_adapters {n}: must be >= 0 and hold the {len(adapters)} adapters given")
    if n == 0:
        return None
    trained = {name: trained_base(path) for name, path in adapters.items()}
    nf4 = [k for k, b in trained.items() if b == "nf4"]
    dense = [k for k, b in trained.items() if b == "dense"]
    if nf4 and dense:
        raise ValueError(f"adapters {nf4[0]!r} (QLoRA: NF4 base) and {dense[0]!r} (LoRA: dense base) need different "
                         f"bases: serve them from two engines")
    quantized = any(isinstance(m, NF4Linear) for _, m in model.linears())
    if nf4 and not quantized:
        log.info("adapter %r is QLoRA: quantizing the base to NF4, the base it was trained on", nf4[0])
        quantize_model_(model)
    elif dense and quantized:
        raise ValueError(f"adapter {dense[0]!r} ({adapters[dense[0]]}) is LoRA, trained on the dense base, but the "
                         f"model is NF4: load the model without quantization")
    adapter_set = AdapterSet(model, n)
    for name, path in adapters.items():
        adapter_set.load(name, path)
    return adapter_set
