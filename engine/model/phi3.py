"""Phi-3 in plain torch, numerically equal to transformers' `Phi3ForCausalLM`.

    x ─ embed ─┬─ RMSNorm ─ qkv_proj ─ RoPE ─ attention ─ o_proj ─(+)─┬─ RMSNorm ─ gate_up_proj ─ SwiGLU ─ down_proj ─(+)─ ...
               └──────────────────────────────────────────────────────┘└─────────────────────────────────────────────────┘
    ... ─ RMSNorm ─ lm_head ─ logits

Legend for shape comments: B batch, T query length, S key length (cache slots), C hidden_size, nh query heads,
nkv key/value heads, hs head_dim, rd rotary dims, I intermediate_size, V vocab.

Module names equal the checkpoint keys (`model.layers.N.self_attn.qkv_proj`, ...), so loading is a name-for-name
copy. Every projection is a plain linear (`kernels/cpu_linear.Linear`: an `nn.Linear` whose fp32 CPU forward goes
to oneDNN) until something swaps it with `model.set_submodule`:
`NF4Linear` (engine/model/quant.py) or `LoRALinear` (engine/model/lora.py); all the model asks of a linear is
`forward(x (..., in)) -> (..., out)`.

Attention masks are built from *positions*, *slots* and *segments* rather than assumed causal, because the same
forward serves four callers:
  - plain training/eval (slots = positions = 0..T-1, pure causal: SDPA's is_causal fast path),
  - packed training (positions restart per sample; `segment_ids` keep samples from seeing each other),
  - generation with a static KVCache (slots are cache indices; left-padded batches mark pad slots position -1),
  - sliding window (mini-4k): a query sees a key only when q_pos - k_pos < sliding_window, as transformers does.
When none of that applies (no segments, no window in reach, no pad slots), the mask is causal by slot alone and
none is built: attention runs `kernels/cpu_attention.causal_attention`, which also handles a chunk after cached
tokens (native on CPU inference, SDPA otherwise).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from phiforge.kernels.cpu.attention import causal_attention
from phiforge.kernels.cpu.linear import Linear
from phiforge.kernels.cpu.ops import rms_norm, rotary, swiglu

from .config import Phi3Config

LINEAR_NAMES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # transformers' order and roundings (kernels/cpu/ops.py)


class RotaryEmbedding(nn.Module):
    """NeoX-style RoPE over the first `rotary_dim` dims of each head, with LongRoPE's two frequency tables.

    inv_freq[i] = 1 / (factor[i] * theta^(2i/rd)), factor = 1 (default), short_factor or long_factor (longrope).
    LongRoPE also scales cos and sin by attention_factor in *both* regimes. transformers switches to the long
    table when max(position)+1 > original_max_position_embeddings; callers with a KV cache pick the regime once
    per sequence instead (see KVCache.rope_long), so a cache never mixes rotations.
    """

    def __init__(self, cfg: Phi3Config) -> None:
        super().__init__()
        self.original_max = cfg.original_max_position_embeddings
        exponent = torch.arange(0, cfg.rotary_dim, 2, dtype=torch.int64).float() / cfg.rotary_dim  # (rd/2,)
        base = cfg.rope_theta ** exponent
        if cfg.rope_type == "longrope":
            short = 1.0 / (torch.tensor(cfg.short_factor, dtype=torch.float32) * base)
            long = 1.0 / (torch.tensor(cfg.long_factor, dtype=torch.float32) * base)
            self.scale = float(cfg.attention_factor)
        else:
            short = long = 1.0 / base
            self.scale = 1.0
        self.longrope = cfg.rope_type == "longrope"
        self.register_buffer("inv_freq_short", short, persistent=False)
        self.register_buffer("inv_freq_long", long, persistent=False)

    def use_long(self, max_position: int) -> bool:
        return self.longrope and max_position + 1 > self.original_max

    def forward(self, position_ids: torch.Tensor, long: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq_long if long else self.inv_freq_short
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, rd/2)
        emb = torch.cat((freqs, freqs), dim=-1)               # (B, T, rd)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


class KVCache(nn.Module):
    """A preallocated static cache: k, v (L, B, nkv, S, hs), plus the position held in each slot (B, S).

    Slots are written in order; `pos[b, s] = -1` marks a slot that holds nothing (never written, or left padding),
    so masks need no separate padding argument. `rope_long` fixes the LongRoPE regime for everything in the cache.
    """

    def __init__(self, cfg: Phi3Config, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", rope_long: bool = False) -> None:
        super().__init__()
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("pos", torch.full((batch_size, max_len), -1, dtype=torch.long, device=device),
                             persistent=False)
        self.max_len = max_len
        self.length = 0  # slots used (the same for every row; rows differ only by their pad slots)
        self.rope_long = rope_long

    def reset(self) -> None:
        self.pos.fill_(-1)
        self.length = 0


class Phi3Attention(nn.Module):
    def __init__(self, cfg: Phi3Config, layer_idx: int, device=None) -> None:
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        nh, nkv, hs = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, (nh + 2 * nkv) * hs, bias=False, device=device)
        self.o_proj = Linear(nh * hs, cfg.hidden_size, bias=False, device=device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, keep: int | None = None) -> torch.Tensor:
        """(B, T, C) → (B, T, C); with `keep`, K/V of all T tokens go to the cache but only the last `keep` queries
        are attended and projected: (B, keep, C)."""
        B, T, _ = x.shape
        nh, nkv, hs = self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim
        qkv = self.qkv_proj(x)                                        # (B, T, (nh + 2 nkv) hs)
        q, k, v = qkv.split([nh * hs, nkv * hs, nkv * hs], dim=-1)
        q = q.view(B, T, nh, hs).transpose(1, 2)                      # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)                     # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)                     # (B, nkv, T, hs)
        if keep is not None:
            q = rotary(q[:, :, -keep:], cos[:, -keep:], sin[:, -keep:])  # (B, nh, keep, hs)
            mask = None if mask is None else mask[:, :, -keep:]
        else:
            q = rotary(q, cos, sin)
        if cache is not None:  # rotated K goes straight into its cache slots
            start = cache.length
            rotary(k, cos, sin, out=cache.k[self.layer_idx, :, :, start:start + T])
            cache.v[self.layer_idx, :, :, start:start + T] = v
            k = cache.k[self.layer_idx, :, :, :start + T]             # (B, nkv, S, hs)
            v = cache.v[self.layer_idx, :, :, :start + T]             # (B, nkv, S, hs)
        else:
            k = rotary(k, cos, sin)
        if mask is None:  # causal by slot: the native CPU kernel for inference, else SDPA's fused path
            y = causal_attention(q, k, v)                             # (B, T, C)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nkv != nh)
            y = y.transpose(1, 2).reshape(B, q.shape[2], nh * hs)     # (B, T, C)
        return self.o_proj(y)


class Phi3MLP(nn.Module):
    def __init__(self, cfg: Phi3Config, device=None) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False, device=device)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_up_proj(x)))  # up · silu(gate), gate the first half: (B, T, I)


class Phi3DecoderLayer(nn.Module):
    def __init__(self, cfg: Phi3Config, layer_idx: int, device=None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.self_attn = Phi3Attention(cfg, layer_idx, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.mlp = Phi3MLP(cfg, device)

    def forward(self, x, cos, sin, mask, cache=None, keep=None):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, keep)  # (B, keep or T, C)
        x = x + h if keep is None else x[:, -keep:] + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Phi3Model(nn.Module):
    def __init__(self, cfg: Phi3Config, device=None) -> None:
        super().__init__()
        # normal_() on a meta tensor drags in torch._dynamo, slow to import; the loader overwrites the weight anyway.
        init = torch.empty if device is not None and torch.device(device).type == "meta" else torch.randn
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=init(cfg.vocab_size, cfg.hidden_size, device=device))
        self.layers = nn.ModuleList(Phi3DecoderLayer(cfg, i, device) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)


def build_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, q_slot: torch.Tensor, k_slot: torch.Tensor,
               window: int | None, q_seg: torch.Tensor | None = None,
               k_seg: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean attention mask (B, 1, T, S): True where query t may attend to key s.

    q_pos (B, T), k_pos (B, S): token positions (k_pos -1 = empty/pad slot); q_slot (T,), k_slot (S,): order in
    the sequence (causality is by slot, so packed samples whose positions restart stay causal); q_seg/k_seg (B, T/S)
    sample ids for packing. Every query also sees its own slot, so a pad row never softmaxes over nothing (NaN).
    """
    causal = k_slot[None, :] <= q_slot[:, None]                                  # (T, S)
    ok = causal[None] & (k_pos[:, None, :] >= 0)                                 # (B, T, S)
    if window is not None:
        ok = ok & (q_pos[:, :, None] - k_pos[:, None, :] < window)
    if q_seg is not None:
        ok = ok & (q_seg[:, :, None] == k_seg[:, None, :])
    ok = ok | (k_slot[None, :] == q_slot[:, None])[None]
    return ok[:, None]                                                           # (B, 1, T, S)


class Phi3ForCausalLM(nn.Module):
    def __init__(self, cfg: Phi3Config, device: torch.device | str | None = None) -> None:
        """device="meta" builds the skeleton without allocating or initialising weights (what the loader does)."""
        super().__init__()
        self.config = cfg
        self.model = Phi3Model(cfg, device)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=device)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary_emb = RotaryEmbedding(cfg)
        self.gradient_checkpointing = False  # non-reentrant activation checkpointing per decoder layer

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def new_cache(self, batch_size: int, max_len: int, rope_long: bool = False,
                  dtype: torch.dtype | None = None) -> KVCache:
        return KVCache(self.config, batch_size, max_len, dtype or self.dtype, self.device, rope_long)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, segment_ids: torch.Tensor | None = None,
                num_logits: int | None = None, return_hidden: bool = False) -> torch.Tensor:
        """input_ids (B, T) → logits (B, T, V) (or the last `num_logits` positions; or the final hidden states).

        With `cache`, the T tokens go into slots cache.length .. cache.length+T-1 and attend to everything before;
        position_ids then default to those slot numbers (pass them for left-padded rows, with -1 on pad tokens).
        """
        cfg = self.config
        B, T = input_ids.shape
        dev = input_ids.device
        if num_logits is not None and num_logits < 1:  # x[:, -0:] would silently mean every row
            raise ValueError(f"num_logits must be None or >= 1, got {num_logits}")
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache overflow: {start} + {T} tokens > {cache.max_len} slots")
        q_slot = torch.arange(start, start + T, device=dev)                       # (T,)
        if position_ids is None:
            position_ids = q_slot[None].expand(B, T)
        if cache is not None:
            cache.pos[:, start:start + T] = position_ids
            k_pos = cache.pos[:, :start + T]                                      # (B, S)
            long = cache.rope_long
        else:
            k_pos = position_ids
            long = self.rotary_emb.use_long(int(position_ids.max()))
        # Pad tokens (position -1) get rotated as position 0: they are never attended to, so any value will do.
        cos, sin = self.rotary_emb(position_ids.clamp(min=0), long, self.dtype)  # (B, T, rd)

        window = cfg.sliding_window if cfg.sliding_window is not None and cfg.sliding_window < start + T else None
        # With no window, segments or empty (pad) slots, the mask is causal by slot alone: query t at slot start + t
        # sees slots 0 … start + t, which the attention kernel does without a mask (a chunk after cached tokens too).
        pure_causal = segment_ids is None and window is None and bool((k_pos >= 0).all())
        mask = None if pure_causal else build_mask(
            position_ids, k_pos, q_slot, torch.arange(start + T, device=dev), window, segment_ids, segment_ids)

        x = self.model.embed_tokens(input_ids)                                    # (B, T, C)
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:  # the last layer computes only the rows whose logits are asked for (K/V still go to the cache)
                x = layer(x, cos, sin, mask, cache, num_logits if i == last else None)
        if cache is not None:
            cache.length = start + T
        x = self.model.norm(x)
        if num_logits is not None:
            x = x[:, -num_logits:]
        if return_hidden:
            return x
        return self.lm_head(x)                                                    # (B, T, V)

    def linears(self, targets: tuple[str, ...] = LINEAR_NAMES):
        """(name, module) for every decoder projection whose last name is in `targets` (the LoRA/NF4 sites)."""
        for name, module in self.named_modules():
            if name.rsplit(".", 1)[-1] in targets and ".layers." in f".{name}":
                yield name, module


# The fused layout. Phi-3 stores q|k|v as one qkv_proj and gate|up as one gate_up_proj, output rows in that order;
# Llama-style checkpoints and adapters name the parts separately, and are fused on load in this order.
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
FUSED_OF = {part: fused for fused, parts in FUSED_PARTS.items() for part in parts}  # q_proj -> qkv_proj, ...


def part_sizes(cfg: Phi3Config, fused: str) -> dict[str, int]:
    """Output rows of each part of a fused projection, in FUSED_PARTS order."""
    if fused == "qkv_proj":
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        return {"q_proj": q, "k_proj": kv, "v_proj": kv}
    return {"gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size}
