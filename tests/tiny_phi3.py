"""Tiny random Phi-3 checkpoints, written by transformers and loaded by phiforge: the one factory every test uses.

One base config, `TINY`. Two shapes of weights on top of it:
- `make_hf_checkpoint(dir, overrides)`: transformers' own init with random norm weights (a wrong norm order cannot
  hide behind ones), for parity tests against transformers (model, loader, decode, generation); `VARIANTS` are the
  Phi-3 family's features on that base.
- `hf_phi3` / `save_tiny`: the LoRA/training shape (`LORA_TINY`: GQA, no sliding window, vocab 128) with fatter
  N(0, 0.08) weights, so a few LoRA steps move the logits visibly; `with_tokenizer=True` copies the default model's
  tokenizer and sizes the vocab to it, so real chat data can be tokenized (the weights stay random).
`write_tokenizer(dir, spm)` trains a small tokenizer of either family: byte-level BPE or SentencePiece-style
byte-fallback BPE (Phi-3-mini's kind).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from phiforge.engine.formats.default_model import default_model_path
from phiforge.engine.model.tokenizer import load_tokenizer
from phiforge.engine.model.weights import copy_auxiliary_files

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, original_max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
LORA_TINY = dict(vocab_size=128, num_key_value_heads=2, max_position_embeddings=512,
                 original_max_position_embeddings=512, rope_theta=10000.0, sliding_window=None,
                 tie_word_embeddings=False)


def longrope(rotary_half: int, orig: int = 32, max_pos: int = 256) -> dict:
    """LongRoPE overrides with random short/long factors (seeded) for a rotary half-width."""
    g = torch.Generator().manual_seed(3)
    short = (1 + torch.rand(rotary_half, generator=g)).tolist()
    long = (1 + 8 * torch.rand(rotary_half, generator=g)).tolist()
    return dict(original_max_position_embeddings=orig, max_position_embeddings=max_pos,
                rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long})


VARIANTS = {
    # mini-4k: sliding window, sequence longer than the window
    "mini-4k-window": (dict(sliding_window=15), 40),
    # 128k LongRoPE, below and above original_max_position_embeddings (32 here)
    "longrope-short": (longrope(8), 20),
    "longrope-long": (longrope(8), 70),
    "longrope-legacy-su": (longrope(8), 50),  # config.json rewritten by the test to say "su", as old hub files do
    # medium: grouped-query attention
    "gqa": (dict(num_key_value_heads=2), 33),
    # Phi-4-mini: partial rotary, tied embeddings, GQA, longrope
    "partial-tied": ({**dict(partial_rotary_factor=0.75, tie_word_embeddings=True, num_key_value_heads=2),
                      **longrope(6)}, 45),
}


def make_hf_checkpoint(path, overrides: dict, dtype=torch.float32, seed: int = 0) -> Phi3ForCausalLM:
    """Save a transformers Phi-3 of `TINY` + `overrides` to `path`; returns the transformers model."""
    torch.manual_seed(seed)
    hf = Phi3ForCausalLM(Phi3Config(**{**TINY, **overrides})).to(dtype).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(path)
    return hf


def hf_phi3(vocab_size: int = 128, seed: int = 0, lm_head_std: float | None = None, **overrides):
    """An in-memory transformers Phi-3 of `TINY` + `LORA_TINY` + `overrides`, N(0, 0.08) weights."""
    torch.manual_seed(seed)
    cfg = Phi3Config(**{**TINY, **LORA_TINY, "vocab_size": vocab_size, **overrides})
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
        src = default_model_path()
        vocab_size = load_tokenizer(src).vocab_size
    model = hf_phi3(vocab_size, seed, lm_head_std=0.5 if with_tokenizer else None, **overrides)
    model.save_pretrained(path, safe_serialization=True)
    if with_tokenizer:
        copy_auxiliary_files(src, path)
    return Path(path), model


def hf_llama_from_phi3(phi3):
    """A transformers LlamaForCausalLM computing exactly what `phi3` computes, with q/k/v and gate/up split apart."""
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


class StubTokenizer:
    """Enough of a tokenizer for token-id prompts on tiny models: stops on the tiny configs' eos."""
    stop_ids = {TINY["eos_token_id"]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i % 26) for i in ids if not (skip_special_tokens and i in self.stop_ids))


def random_prompt(n: int, seed: int) -> list[int]:
    """n token ids above the special ones, seeded."""
    return torch.randint(3, TINY["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def left_padded(lens: list[int], steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (B, max(lens) + steps) and prompt positions (B, max(lens)): row b's prompt is its last lens[b]
    tokens, the pads before it at position -1."""
    B, P = len(lens), max(lens)
    ids = torch.randint(0, TINY["vocab_size"], (B, P + steps), generator=torch.Generator().manual_seed(seed))
    pos = torch.full((B, P), -1)
    for b, n in enumerate(lens):
        pos[b, P - n:] = torch.arange(n)
    return ids, pos


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tokenizer(d: Path, spm: bool = False) -> int:
    """A small trained tokenizer in `d`: byte-level BPE (gpt2 style) or SentencePiece-style byte-fallback BPE."""
    text = ["the quick brown fox jumps over the lazy dog", "hello world, hello phiforge", "numbers 12345 and 678"] * 20
    if spm:
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        alphabet = [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<unk>", *SPECIALS], initial_alphabet=[])
        tok.train_from_iterator(text, trainer)
        j = json.loads(tok.to_str())  # byte pieces belong to the model's vocab, as in Phi-3's tokenizer.json
        vocab = j["model"]["vocab"]
        for t in alphabet:
            vocab.setdefault(t, max(vocab.values()) + 1)
        tok = Tokenizer.from_str(json.dumps(j))
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(text, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        **({"unk_token": "<unk>"} if spm else {}), "chat_template": CHATML, "add_bos_token": False}))
    return tok.get_vocab_size()
