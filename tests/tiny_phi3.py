"""Tiny random Phi-3 checkpoints for the LoRA / data / training tests (transformers writes them, phiforge loads them).

Shared by tests/test_lora.py, tests/test_data.py and tests/test_train.py; the tiny shapes keep the whole suite
in seconds. `with_tokenizer=True` copies the default model's tokenizer files and sizes the vocab to match, so real
chat data can be tokenized; the weights stay random.
"""
from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, sliding_window=None, tie_word_embeddings=False)


def hf_phi3(vocab_size: int = 128, seed: int = 0, lm_head_std: float | None = None, **overrides):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    cfg = Phi3Config(vocab_size=vocab_size, **{**TINY, **overrides})
    model = Phi3ForCausalLM(cfg).float().eval()
    with torch.no_grad():  # fatter random weights than HF's 0.02-std init, so differences show
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
        if lm_head_std is not None:  # a wide-range output layer: a few LoRA steps move the distribution a lot
            model.lm_head.weight.normal_(0, lm_head_std)
    return model


def save_tiny(path: Path, vocab_size: int = 128, seed: int = 0, with_tokenizer: bool = False, **overrides):
    """Write a tiny random Phi-3 checkpoint to `path`; returns (path, the transformers model)."""
    if with_tokenizer:
        from phiforge.engine.fetch import default_model_path
        from phiforge.engine.loader import copy_auxiliary_files
        from phiforge.engine.tokenizer import load_tokenizer

        src = default_model_path()
        vocab_size = load_tokenizer(src).vocab_size
    model = hf_phi3(vocab_size, seed, lm_head_std=0.5 if with_tokenizer else None, **overrides)
    model.save_pretrained(path, safe_serialization=True)
    if with_tokenizer:
        copy_auxiliary_files(src, path)
    return Path(path), model


def hf_llama_from_phi3(phi3):
    """A transformers LlamaForCausalLM computing exactly what `phi3` computes, with q/k/v and gate/up split apart."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = phi3.config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                      rope_theta=10000.0, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=False,
                      attention_bias=False, mlp_bias=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    llama = LlamaForCausalLM(cfg).float().eval()
    sd = phi3.state_dict()
    nq = c.num_attention_heads * (c.hidden_size // c.num_attention_heads)
    nkv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    new = {}
    for k, v in sd.items():
        if k.endswith("qkv_proj.weight"):
            p = k[: -len("qkv_proj.weight")]
            q, kk, vv = v.split([nq, nkv, nkv])
            new.update({p + "q_proj.weight": q, p + "k_proj.weight": kk, p + "v_proj.weight": vv})
        elif k.endswith("gate_up_proj.weight"):
            p = k[: -len("gate_up_proj.weight")]
            g, u = v.chunk(2)
            new.update({p + "gate_proj.weight": g, p + "up_proj.weight": u})
        else:
            new[k] = v
    llama.load_state_dict(new, strict=True)
    return llama


def randomize_lora_B(model, seed: int = 1, std: float = 0.05) -> None:
    """B starts at zero (so A gets no gradient and adapters change nothing): give it random values for tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def one_thread():
    """Tiny shapes run fastest on one thread (OpenMP fork/join costs more than the work, and far more when the
    machine is oversubscribed); used as a module-scoped autouse fixture, restoring the thread count after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
