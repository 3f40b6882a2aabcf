"""The decode step with static shapes, replayed as one CUDA graph: no per-token Python or launch overhead on GPU.

engine/serve/decode.py's DecodeStep slices the cache to the `s + 1` slots in use, so every step has new shapes and runs
as dozens of separate launches driven by Python. At batch 1 on a GPU those launches, not the weights' bytes, set
the time per token. `CUDAGraphDecode` runs the same model on the same KVCache with shapes that never change:

  - the slot being written is a 1-element tensor (`index_copy_` writes K, V and the position there), not a
    Python int that would be baked into a captured graph;
  - attention reads all `max_len` slots of the cache; slots not yet written hold position -1 and are masked
    with -inf exactly as DecodeStep masks pad slots, so their (finite) K/V contribute exp(-inf) = 0;
  - inputs are copied into static buffers before each replay, and the logits come out of a static buffer.

The graph is captured on the first step of a cache (static shapes per batch size: one graph per cache, whose
batch is fixed), after two warm-up steps on a side stream that compile the Triton kernels and create cuBLAS'
workspace. The warm-up steps and the captured step all write slot `s` with the same inputs, so they are
idempotent: the replay computes exactly the step that was asked for. On CPU (`graph=False`, the default there)
the same static step runs eagerly, which is how tests check its math against DecodeStep without a GPU.

Masked slots change the length of the softmax reduction, so results equal DecodeStep's up to rounding (exactly
in fp32 on CPU, where a masked term adds an exact zero); bench/gpu_check.py compares the replay with the eager
step on CUDA.

Legend: B rows, C hidden, nh/nkv query/KV heads, rep = nh/nkv, hs head dim, rd rotary dims, S = cache.max_len,
V vocabulary.
"""
from __future__ import annotations

import torch
from torch import nn

from phiforge.kernels.cpu.ops import rotary_ref, swiglu_ref


class CUDAGraphDecode:
    """Bound to one model and one KVCache: `step(tokens (B,), positions (B,)) -> logits (B, V)` (DecodeStep's
    contract), captured once as a CUDA graph and replayed for every later token when `graph` is on."""

    def __init__(self, model: nn.Module, cache, graph: bool | None = None) -> None:
        cfg = model.config
        self.model, self.cache = model, cache
        self.graph_on = cache.k.is_cuda if graph is None else graph
        if self.graph_on and not cache.k.is_cuda:
            raise ValueError("CUDAGraphDecode: graph=True needs the model and KV cache on a CUDA device")
        self.nh, self.nkv, self.hs = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.window = cfg.sliding_window
        dev = cache.pos.device
        positions = torch.arange(cache.max_len, device=dev)[None]                     # (1, S)
        cos, sin = model.rotary_emb(positions, cache.rope_long, model.dtype)           # (1, S, rd)
        self.cos, self.sin = cos[0], sin[0]                                            # (S, rd)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)                       # (1,) the slot written
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tokens = self.positions = self.logits = None                              # static buffers

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens (B,), positions (B,) → logits (B, V); writes cache slot `cache.length` and advances it."""
        cache = self.cache
        s = cache.length
        if s >= cache.max_len:
            raise ValueError(f"KV cache overflow: slot {s} of {cache.max_len}")
        with torch.no_grad():
            self.slot.fill_(s)
            if not self.graph_on:
                logits = self._step(tokens, positions)
            else:
                if self.graph is None:
                    self._capture(tokens, positions)
                self.tokens.copy_(tokens)
                self.positions.copy_(positions)
                self.graph.replay()
                logits = self.logits.clone()  # the static buffer is overwritten by the next replay
        cache.length = s + 1
        return logits

    def _capture(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        self.tokens, self.positions = tokens.clone(), positions.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # Triton compiles and cuBLAS picks its kernels outside the capture
                self._step(self.tokens, self.positions)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._step(self.tokens, self.positions)                     # (B, V)
        self.graph = graph

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The decode step at fixed shapes: every tensor's size depends on B and S only, never on the slot."""
        cache, model, slot = self.cache, self.model, self.slot
        B = tokens.shape[0]
        nh, nkv, hs = self.nh, self.nkv, self.hs
        cache.pos.index_copy_(1, slot, positions[:, None])                             # pos[:, s] = positions
        k_pos = cache.pos                                                              # (B, S)
        hidden = k_pos < 0
        if self.window is not None:  # for s + 1 <= window no key is that far back, so this is DecodeStep's rule
            hidden = hidden | ((positions[:, None] - k_pos) >= self.window)
        mask = torch.zeros(B, 1, 1, cache.max_len, device=tokens.device).masked_fill_(
            hidden[:, None, None], float("-inf"))                                      # (B, 1, 1, S)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]          # (B, T=1, rd)

        x = model.model.embed_tokens(tokens)[:, None]                                  # (B, 1, C)
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = attn.qkv_proj(layer.input_layernorm(x)).view(B, nh + 2 * nkv, hs)   # (B, nh + 2 nkv, hs)
            qk = rotary_ref(qkv[:, : nh + nkv, None], cos, sin)[:, :, 0]               # (B, nh + nkv, hs)
            cache.k[i].index_copy_(2, slot, qk[:, nh:, None])                          # (B, nkv, 1, hs) at s
            cache.v[i].index_copy_(2, slot, qkv[:, nh + nkv:, None])                   # (B, nkv, 1, hs) at s
            k, v = cache.k[i], cache.v[i]                                              # (B, nkv, S, hs)
            q = qk[:, :nh].reshape(B, nkv, nh // nkv, hs)                              # (B, nkv, rep, hs)
            scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.scale + mask  # (B, nkv, rep, S)
            y = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)                    # (B, nkv, rep, hs)
            x = x + attn.o_proj(y.view(B, 1, nh * hs))                                 # (B, 1, C)
            x = x + mlp.down_proj(swiglu_ref(mlp.gate_up_proj(layer.post_attention_layernorm(x))))  # (B, 1, C)
        return model.lm_head(model.model.norm(x))[:, 0]                                # (B, V)
