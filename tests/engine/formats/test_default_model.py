"""The default model conversion (engine/formats/default_model.py), judged against independent references:

- transformers' `Phi3ForCausalLM` loads the directory with no missing/unexpected keys and answers a chat correctly
  (a wrong Q/K permutation loads fine but talks nonsense: the negative control shows the check can fail);
- transformers' own GGUF loader (`gguf_file=`), a converter written by other people: every weight must equal its
  dequantized tensor rounded to bf16, and its tokenizer must agree with ours;
- the GGUF's vocabulary itself: every token must come back as its own id.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3ForCausalLM

from phiforge.commands import fetch as fetch_command
from phiforge.engine.formats import default_model as fetch

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
STRINGS = [
    "Hello world",
    "  two leading spaces, then digits 1234567890 and 3.14159",
    "héllo wörld — ünïcödé, 日本語, Ελληνικά",
    "emoji 🙂🚀👍🏽 and a flag 🇫🇷",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "def f(x):\n\treturn x**2  # tabs\n\n\n",
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return fetch.default_model_path()


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return fetch.default_gguf_path()


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf_model(model_dir: Path):
    model, info = Phi3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


@pytest.fixture(scope="module")
def gguf_tokens(gguf_path: Path) -> tuple[list[str], list[int]]:
    reader = gguf.GGUFReader(gguf_path)
    return (reader.fields["tokenizer.ggml.tokens"].contents(),
            [int(t) for t in reader.fields["tokenizer.ggml.token_type"].contents()])


def _answer(model, tokenizer, max_new_tokens: int = 16) -> str:
    enc = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _llama_cpp_permute(w: np.ndarray, n: int) -> np.ndarray:
    # the forward permutation as llama.cpp's converter writes it; fetch.unpermute_qk must undo it
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- weights and config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, hs, c", [(9, 64, 576), (3, 64, 576), (2, 6, 5), (1, 2, 1)])
def test_unpermute_inverts_llama_cpp_permutation(n: int, hs: int, c: int) -> None:
    w = np.random.default_rng(0).standard_normal((n * hs, c)).astype(np.float32)
    assert np.array_equal(fetch.unpermute_qk(_llama_cpp_permute(w, n), n), w)
    if hs > 2:  # the permutation is not the identity, so an unpermute that does nothing would fail
        assert not np.array_equal(_llama_cpp_permute(w, n), w)


def test_config_and_generation_config(model_dir: Path, hf_tokenizer) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Phi3ForCausalLM"] and cfg["model_type"] == "phi3"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (576, 1536, 30)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (9, 3, 49152)
    assert cfg["rope_theta"] == 100000.0 and cfg["rms_norm_eps"] == 1e-5 and cfg["tie_word_embeddings"] is True
    gen = json.loads((model_dir / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert hf_tokenizer.convert_tokens_to_ids("<|im_end|>") in eos
    assert not (model_dir / fetch.MARKER).is_dir() and (model_dir / fetch.MARKER).is_file()


def test_transformers_loads_and_answers_paris(hf_model, hf_tokenizer) -> None:
    model, info = hf_model
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert "Paris" in _answer(model, hf_tokenizer)


def test_wrong_qk_permutation_is_caught(model_dir: Path, hf_tokenizer) -> None:
    # negative control: re-apply llama.cpp's permutation to Q and K and the Paris check must fail
    model = Phi3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    c, hs = model.config.hidden_size, model.config.hidden_size // model.config.num_attention_heads
    nh, nkv = model.config.num_attention_heads, model.config.num_key_value_heads
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.self_attn.qkv_proj.weight  # ((nh+2·nkv)·hs, C)
            q, k = w[:nh * hs].numpy(), w[nh * hs:(nh + nkv) * hs].numpy()
            w[:nh * hs] = torch.from_numpy(_llama_cpp_permute(q.copy(), nh))
            w[nh * hs:(nh + nkv) * hs] = torch.from_numpy(_llama_cpp_permute(k.copy(), nkv))
    assert c == nh * hs
    assert "Paris" not in _answer(model, hf_tokenizer, max_new_tokens=12)


def test_weights_equal_transformers_gguf_loader(hf_model, gguf_path: Path) -> None:
    # transformers dequantizes and un-permutes the GGUF itself: our bf16 weights must be exactly its rounding
    ref = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    ours = hf_model[0].model
    nh, nkv = ours.config.num_attention_heads, ours.config.num_key_value_heads
    hs, inter = ours.config.hidden_size // nh, ours.config.intermediate_size

    def same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
        assert torch.equal(a, b.to(torch.bfloat16).to(torch.float32)), what

    same(ours.embed_tokens.weight, ref.model.embed_tokens.weight, "embed_tokens")
    same(ours.norm.weight, ref.model.norm.weight, "norm")
    for i, (a, b) in enumerate(zip(ours.layers, ref.model.layers, strict=True)):
        qkv, gate_up = a.self_attn.qkv_proj.weight, a.mlp.gate_up_proj.weight
        same(qkv[:nh * hs], b.self_attn.q_proj.weight, f"layer {i} q")
        same(qkv[nh * hs:(nh + nkv) * hs], b.self_attn.k_proj.weight, f"layer {i} k")
        same(qkv[(nh + nkv) * hs:], b.self_attn.v_proj.weight, f"layer {i} v")
        same(gate_up[:inter], b.mlp.gate_proj.weight, f"layer {i} gate")
        same(gate_up[inter:], b.mlp.up_proj.weight, f"layer {i} up")
        same(a.self_attn.o_proj.weight, b.self_attn.o_proj.weight, f"layer {i} o")
        same(a.mlp.down_proj.weight, b.mlp.down_proj.weight, f"layer {i} down")
        same(a.input_layernorm.weight, b.input_layernorm.weight, f"layer {i} input_layernorm")
        same(a.post_attention_layernorm.weight, b.post_attention_layernorm.weight, f"layer {i} post_attn_norm")


# --- tokenizer ------------------------------------------------------------------------------------------------

def test_special_tokens_are_single_ids(hf_tokenizer, gguf_tokens) -> None:
    enc = hf_tokenizer.encode("<|im_start|>assistant\nhi<|im_end|>", add_special_tokens=False)
    assert enc[0] == 1 and enc[-1] == 2
    tokens, types = gguf_tokens
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == 3:
            assert hf_tokenizer.encode(t, add_special_tokens=False) == [i], t
    assert hf_tokenizer.bos_token == "<|im_start|>" and hf_tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("text", STRINGS)
def test_round_trip(hf_tokenizer, text: str) -> None:
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert hf_tokenizer.decode(ids) == text


def test_digits_are_split(hf_tokenizer) -> None:
    ids = hf_tokenizer.encode("2024", add_special_tokens=False)
    assert [hf_tokenizer.decode([i]) for i in ids] == ["2", "0", "2", "4"]


def test_vocab_is_the_gguf_vocab(model_dir: Path, gguf_tokens) -> None:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokens, types = gguf_tokens
    assert tok.get_vocab(with_added_tokens=True) == {t: i for i, t in enumerate(tokens)}
    # property: BPE over the merges rebuilds every vocabulary entry from its own bytes as that single token
    bad = [t for i, t in enumerate(tokens) if types[i] != 3 and [x.id for x in tok.model.tokenize(t)] != [i]]
    assert not bad, bad[:10]
    # and through the whole pipeline, for every token whose text is valid UTF-8 and one pre-token
    checked = 0
    for i, t in enumerate(tokens):
        text = tok.decode([i])
        if types[i] == 3 or "\ufffd" in text or len(tok.pre_tokenizer.pre_tokenize_str(text)) != 1:
            continue
        checked += 1
        assert tok.encode(text).ids == [i], (i, t)
    assert checked > 40000


def test_tokenizer_matches_transformers_gguf_tokenizer(hf_tokenizer, gguf_path: Path) -> None:
    ref = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for text in STRINGS:
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert hf_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False) == \
        ref.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)


# --- building -------------------------------------------------------------------------------------------------

def test_incomplete_dir_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHIFORGE_HOME", str(tmp_path))
    half = tmp_path / fetch.NAME
    half.mkdir()
    (half / "config.json").write_text("{")  # a crash mid-write: no completion marker
    out = fetch.default_model_path()
    assert out == half and (out / fetch.MARKER).is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] == "phi3"
    assert sorted(p.name for p in tmp_path.iterdir()) == [fetch.NAME]  # no temp or old dirs left behind


def test_cli_reports_missing_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    fetch_command.add_arguments(parser)
    missing = tmp_path / "nope.gguf"
    args = parser.parse_args(["--out", str(tmp_path / "m"), "--gguf", str(missing), "--force"])
    assert fetch_command.run(args) == 1
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
