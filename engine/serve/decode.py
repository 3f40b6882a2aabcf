"""The one-token decode step, lean: what does not change from step to step is computed once per cache.

`Phi3ForCausalLM.forward` serves training, packing, prefill and decode, so each call rebuilds positions, the
rotary cos/sin, and a boolean (B, 1, T, S) mask, then runs `scaled_dot_product_attention`. For a decode step
(T = 1) on a CPU that generality costs more than the math: SDPA's fused CPU kernel is built for long query blocks
and takes longer for one query than the plain three-op form below, and the per-step setup is dozens of small ops.
`DecodeStep` runs the *same* model (its modules and weights, so NF4 or LoRA linears swapped in still apply) and
the same KVCache, with:

  - cos/sin for every position the cache can hold, computed once with the model's own rotary embedding, in the
    cache's LongRoPE regime (indexing a table gives bit-identical values to recomputing them);
  - the mask built once per step as an additive (B, 1, 1, S) row from the cache's slot positions, shared by all
    layers: pad/empty slots (position -1) and, for sliding-window models, keys with q_pos - k_pos >= window get
    -inf; everything else in slots 0..s is visible (decode is causal by construction: slot s is the newest);
  - attention as scores = q·Kᵀ·hs^-½ + mask → softmax (fp32) → ·V, with grouped-query heads handled by a view:
    query head h = g·rep + r reads KV head g, so q (B, nh, hs) is viewed as (B, nkv, rep, hs) and no K/V copy
    is made;
  - RoPE applied to q and k in one go (they are adjacent in the fused qkv output);
  - plain dense projections through kernels/cpu/gemv.py's native GEMV at batch 1 (a swapped-in NF4/LoRA linear is
    called as its module, so it keeps its own kernel).

With dense fp32/bf16 projections (up to 16 rows) or NF4 ones (up to 4) the whole step is one native call instead
(kernels/cpu/decode.py: same math, same roundings; `bench_generate.py --ablations` measures both); this module
hands it the model's weights as tensors (`decode_weights`) and, for a model with an AdapterSet
(engine/serve/multi_lora.py), the resident adapters' stacks: rows with an adapter get its delta in the native step too
(csrc/decode_lora.h). This torch step serves larger batches, single-adapter LoRA models, and machines where the native
library cannot run.

**Rows of their own lengths** (the serving engine, engine/serve/engine.py): `step(tokens, positions, rows, slots)` runs
only the cache rows `rows`, row b writing its K/V into its own slot `slots[b]` and attending to its slots up to
that one (slots past it may hold an earlier request's K/V: they are masked). Without `rows`/`slots` every row
writes slot `cache.length` and the length advances (one batch in lock-step, as a left-padded batch decodes).

Prefill stays with `model.forward` (long query blocks amortise its setup). Decode and prefill write
the same cache, so they can alternate freely. tests/engine/serve/test_decode.py checks logits against `model.forward`.

Legend: B rows (of the step), C hidden, nh/nkv query/KV heads, rep = nh/nkv, hs head dim, rd rotary dims, S cache slots used,
V vocabulary.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from phiforge.engine.model.phi3 import RMSNorm
from phiforge.engine.model.quant import NF4Linear
from phiforge.kernels.cpu import gemv as cpu_gemv
from phiforge.kernels.cpu.decode import DecodeWeights, NativeDecode
from phiforge.kernels.cpu.linear import is_plain
from phiforge.kernels.cpu.ops import rotary_ref, swiglu
from phiforge.kernels.nf4 import NF4Weight

from .multi_lora import MultiLoRALinear


def _is_plain(module: nn.Module) -> bool:
    return is_plain(module) and cpu_gemv.supports(module.weight)


def _weight(module: nn.Module) -> torch.Tensor | NF4Weight | None:
    """What a projection multiplies by, when its forward is exactly x·Wᵀ: a plain linear's weight or an NF4Linear's
    NF4Weight (without hooks); None for anything else (LoRA, hooks). A multi-LoRA layer gives its base layer's: the
    native step adds the adapters' deltas itself (`DecodeStep._sync_lora`)."""
    if isinstance(module, MultiLoRALinear) and not module._forward_hooks and not module._forward_pre_hooks:
        module = module.base_layer
    if is_plain(module):
        return module.weight
    if isinstance(module, NF4Linear) and not module._forward_hooks and not module._forward_pre_hooks:
        return module.qweight
    return None


def decode_weights(model: nn.Module) -> DecodeWeights | None:
    """The model's weights as kernels/cpu/decode.py takes them, or None when a projection or norm is something
    else (a LoRA linear, a hooked module): then only the torch step applies."""
    cfg, layers = model.config, list(model.model.layers)
    sites = [[_weight(getattr(getattr(layer, part), name)) for layer in layers]
             for part, name in (("self_attn", "qkv_proj"), ("self_attn", "o_proj"),
                                ("mlp", "gate_up_proj"), ("mlp", "down_proj"))]
    norms = [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)] + [model.model.norm]
    if any(w is None for ws in sites for w in ws) or not is_plain(model.lm_head) \
            or not all(type(n) is RMSNorm and not n._forward_hooks for n in norms):
        return None
    qkv, o, gate_up, down = sites
    return DecodeWeights(qkv=qkv, o=o, gate_up=gate_up, down=down,
                         input_norm=[layer.input_layernorm.weight for layer in layers],
                         post_norm=[layer.post_attention_layernorm.weight for layer in layers],
                         embed=model.model.embed_tokens.weight, final_norm=model.model.norm.weight,
                         lm_head=model.lm_head.weight, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                         head_dim=cfg.head_dim, rotary_dim=cfg.rotary_dim, eps=cfg.rms_norm_eps,
                         window=cfg.sliding_window)


class DecodeStep:
    """Bound to one model and one KVCache: `step(tokens (B,), positions (B,), rows=None, slots=None) -> logits
    (B, V)`. `rope_long` (default: the cache's) picks the LongRoPE table, so rows of one regime can share a cache
    with rows of the other as long as each step runs one regime. `native=False` keeps the whole step in torch.
    Adapter rows (AdapterSet.rows around the call) run natively too; `steps` counts the calls each path took."""

    def __init__(self, model: nn.Module, cache, rope_long: bool | None = None, native: bool = True,
                 batch_invariant: bool = False) -> None:
        """batch_invariant: in the native step, a row's logits are bitwise the same whatever else is in the call (one
        kernel for every row count). The torch step makes no such promise: its batched matmuls pick kernels by
        shape."""
        cfg = model.config
        self.model, self.cache, self.cfg = model, cache, cfg
        self.batch_invariant = batch_invariant
        self.layers = list(model.model.layers)
        # per layer: (input norm, qkv, o, post-attention norm, gate_up, down), looked up once
        self.procs = []
        for layer in self.layers:
            mlp = layer.mlp
            self.procs.append((layer.input_layernorm, self._projection(layer.self_attn.qkv_proj),
                               self._projection(layer.self_attn.o_proj), layer.post_attention_layernorm,
                               self._projection(mlp.gate_up_proj), self._projection(mlp.down_proj)))
        self.lm_head = self._projection(model.lm_head)
        self._threads = torch.get_num_threads()
        self.nh, self.nkv, self.hs, self.rd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, \
            cfg.rotary_dim
        self.scale = cfg.head_dim ** -0.5
        self.window = cfg.sliding_window
        # positions never exceed the slot index (left padding only lowers them), so max_len rows suffice
        positions = torch.arange(cache.max_len, device=cache.pos.device)[None]        # (1, S_max)
        rope_long = cache.rope_long if rope_long is None else rope_long
        cos, sin = model.rotary_emb(positions, rope_long, model.dtype)                 # (1, S_max, rd)
        self.cos, self.sin = cos[0], sin[0]                                            # (S_max, rd)
        weights = decode_weights(model) if native else None
        self.native = None if weights is None else NativeDecode.create(
            weights, cache.k, cache.v, cache.pos, self.cos, self.sin)                  # one C call a step
        if self.native is not None:
            self.native.set_invariant(batch_invariant)
        # per layer the multi-LoRA projections (qkv, o, gate_up, down; None where plain), handed to the native step
        sites = [(layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
                 for layer in self.layers]
        self.multi = [[m if isinstance(m, MultiLoRALinear) else None for m in ms] for ms in sites]
        self._multi = [m for ms in self.multi for m in ms if m is not None]
        self._lora_versions: tuple[int, ...] | None = None   # the versions the native step's stacks were built at
        self._lora_native = False
        self.steps = {"native": 0, "native_lora": 0, "torch": 0}  # which path each call took (tests, benches)

    def _projection(self, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """A plain nn.Linear runs through kernels/cpu/gemv.py (native GEMV for one row); anything else (batches,
        NF4Linear, LoRALinear, a module with hooks) runs through torch with the configured thread count."""
        weight = module.weight if _is_plain(module) else None

        def project(x: torch.Tensor) -> torch.Tensor:
            if weight is not None and x.shape[0] == 1:
                return cpu_gemv.linear(x, weight, self._threads)
            torch.set_num_threads(self._threads)
            try:
                return module(x)
            finally:
                torch.set_num_threads(1)
        return project

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None = None,
                 slots: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B,), positions (B,) → logits (B, V). With `rows`/`slots` (B,): row b is cache row rows[b] and
        writes its K/V into slot slots[b]; without, every cache row writes slot `cache.length`, which advances.

        torch itself runs on one thread during the step, except inside projections it computes (batches, NF4,
        LoRA): everything else is tiny (attention over one query per row, norms), and each parallel region ends in
        a barrier that, on a busy machine, waits for a descheduled thread. The native GEMV splits the big matrices
        over the configured thread count. The thread count is process-global, so it is set around each step (and
        each torch-computed projection) and restored: setting it once per step measured faster than leaving torch
        its threads for the small ops.
        """
        cache = self.cache
        lockstep = rows is None
        if lockstep:
            s = cache.length
            if s >= cache.max_len:
                raise ValueError(f"KV cache overflow: slot {s} of {cache.max_len}")
            slots = torch.full((cache.pos.shape[0],), s, dtype=torch.long)
        elif int(slots.max()) >= cache.max_len:
            raise ValueError(f"KV cache overflow: slot {int(slots.max())} of {cache.max_len}")
        lora = self._multi[0].decode_slots() if self._multi else None                  # (B,) or None
        if self.native is not None and tokens.shape[0] <= self.native.max_rows and (
                lora is None or self._sync_lora()):
            logits = self.native(tokens, positions, cache.length if lockstep else slots, rows, lora)  # (B, V)
            self.steps["native" if lora is None else "native_lora"] += 1
        else:
            self.steps["torch"] += 1
            self._threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                logits = self._step(tokens, positions, rows, slots)
            finally:
                torch.set_num_threads(self._threads)
        if lockstep:
            cache.length += 1
        return logits

    def _sync_lora(self) -> bool:
        """Hand the native step the resident adapters, again after every load or unload (a version changed);
        False when it cannot take them (then the torch step runs)."""
        versions = tuple(m.version for m in self._multi)
        if versions != self._lora_versions:
            stacks = [[None if m is None else m.native_stack() for m in ms] for ms in self.multi]
            self._lora_native = self.native.set_lora(stacks)
            self._lora_versions = versions
        return self._lora_native

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None,
              slots: torch.Tensor) -> torch.Tensor:
        cache, model = self.cache, self.model
        B = tokens.shape[0]
        nh, nkv, hs = self.nh, self.nkv, self.hs
        S = int(slots.max()) + 1
        if rows is None:
            sel = slice(None)                                      # every row: views of the cache, no copies
            at = (slice(None), int(slots[0]))
        else:
            r0 = int(rows[0])  # rows r0..r0+B-1 in order are a view too; any other set is gathered
            sel = slice(r0, r0 + B) if torch.equal(rows, torch.arange(r0, r0 + B)) else rows
            at = (rows, slots)
        cache.pos[at] = positions
        k_pos = cache.pos[sel, :S]                                                     # (B, S)
        hidden = (k_pos < 0) | (torch.arange(S, device=k_pos.device)[None] > slots[:, None])               # empty, or past the row's slot
        if self.window is not None and self.window < S:
            hidden |= (positions[:, None] - k_pos) >= self.window
        mask = torch.zeros(B, 1, 1, S, device=tokens.device).masked_fill_(hidden[:, None, None], float("-inf"))  # (B, 1, 1, S)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]          # (B, T=1, rd)

        x = model.model.embed_tokens(tokens)[:, None]                                  # (B, 1, C)
        for i, (norm1, qkv_proj, o_proj, norm2, gate_up_proj, down_proj) in enumerate(self.procs):
            qkv = qkv_proj(norm1(x)).view(B, nh + 2 * nkv, hs)                        # (B, nh + 2 nkv, hs)
            qk = rotary_ref(qkv[:, : nh + nkv, None], cos, sin)[:, :, 0]               # (B, nh + nkv, hs)
            ck, cv = cache.k[i], cache.v[i]                                            # (rows, nkv, S_max, hs)
            ck[at[0], :, at[1]] = qk[:, nh:]                                           # (B, nkv, hs) at each slot
            cv[at[0], :, at[1]] = qkv[:, nh + nkv:]
            k = ck[sel, :, :S]                                                         # (B, nkv, S, hs)
            v = cv[sel, :, :S]                                                         # (B, nkv, S, hs)
            q = qk[:, :nh].reshape(B, nkv, nh // nkv, hs)                              # (B, nkv, rep, hs)
            if k.dtype == torch.float32:
                qk = torch.matmul(q, k.transpose(-1, -2))                              # (B, nkv, rep, S)
            else:  # bf16/fp16 bmm copies a transposed cache slice first; K·qᵀ reads it in place
                qk = torch.matmul(k, q.transpose(-1, -2)).transpose(-1, -2)            # (B, nkv, rep, S)
            scores = qk.float() * self.scale + mask                                    # (B, nkv, rep, S)
            y = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)                    # (B, nkv, rep, hs)
            x = x + o_proj(y.view(B, 1, nh * hs))                                      # (B, 1, C)
            x = x + down_proj(swiglu(gate_up_proj(norm2(x))))                          # (B, 1, I) inside
        return self.lm_head(model.model.norm(x))[:, 0]                                 # (B, V)
