"""A memory model for LoRA / QLoRA training on one GPU: what the bytes are, and how many sequences fit.

    total = base linears                  bf16: 2 B/param     NF4 + double quant: 0.5 + 1/64 + 4/(64·256) B/param
          + embedding (+ lm_head)         bf16, frozen
          + LoRA state                    r·(in + out) per site × 16 B  (fp32 weight, grad, Adam m and v)
          + layer checkpoints             L · B · T · C · 2 B           (one bf16 layer input kept per layer)
          + one layer's recompute set     B · T · a · 2 B · 2           (activations of one layer, and their grads)
          + loss                          chunk · V · 4 B · 2  +  n_labelled · C · 2 B   (engine/train/loss.py)
          + dequantized weight transient  largest projection in bf16 (QLoRA CPU / dequant fallback only)
          + CUDA context + fragmentation  0.75 GB

with a ≈ 2C (norms) + (nh + 2 nkv)·hs (qkv) + 2C (attention out, o_proj in) + 2I (gate|up) + 2I (SiLU, product)
+ the LoRA rank-r intermediates, per token. Everything but the last three terms of the first column is independent
of the batch, so the largest micro-batch that fits a budget is one division.

Legend: L layers, B micro-batch, T sequence length, C hidden, I intermediate, V vocab, r LoRA rank.
"""
from __future__ import annotations

from phiforge.engine.model.config import Phi3Config

GB = 1e9


def estimate(shape: str | Phi3Config, method: str, seq: int, batch: int = 1, rank: int = 16,
             budget_gb: float | None = None, labelled_fraction: float = 0.5, loss_chunk: int = 1024) -> dict:
    """Bytes per component (in GB) for training `shape` with LoRA on all four fused projections."""
    cfg = shape if isinstance(shape, Phi3Config) else Phi3Config.from_name(shape)
    C, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    hs, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    sites = [(C, (nh + 2 * nkv) * hs), (nh * hs, C), (C, 2 * I), (I, C)]  # (in, out) per decoder layer
    n_linear = L * sum(i * o for i, o in sites)
    per_param = 2.0 if method == "lora" else 0.5 + 1 / 64 + 4 / (64 * 256)
    lora_params = L * sum(rank * (i + o) for i, o in sites)
    embed = V * C * 2 * (1 if cfg.tie_word_embeddings else 2)
    fixed = {
        "base_linears": n_linear * per_param,
        "embedding_and_lm_head": embed,
        "lora_weights_grads_adam": lora_params * 16,
        "loss_chunk": loss_chunk * V * 4 * 2,
        "dequant_transient": 0 if method == "lora" else max(i * o for i, o in sites) * 2,
        "cuda_context": 0.75 * GB,
    }
    act_per_token = 2 * C + (nh + 2 * nkv) * hs + 2 * C + 4 * I + 4 * rank
    per_seq = {
        "layer_checkpoints": L * seq * C * 2,
        "layer_recompute": seq * act_per_token * 2 * 2,
        "loss_grad_h": labelled_fraction * seq * C * 2,
    }
    parts = {**fixed, **{k: v * batch for k, v in per_seq.items()}}
    out = {k: round(v / GB, 3) for k, v in parts.items()}
    out["total_gb"] = round(sum(parts.values()) / GB, 2)
    out["trainable_parameters"] = lora_params
    if budget_gb is not None:
        free = budget_gb * GB - sum(fixed.values())
        out["budget_gb"] = budget_gb
        out["max_micro_batch"] = max(0, int(free // sum(per_seq.values())))
    return out
