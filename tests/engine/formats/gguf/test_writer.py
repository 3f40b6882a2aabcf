"""GGUF export (engine/formats/gguf/writer.py) and import (engine/formats/gguf/reader.py, .../vocab.py), judged by:

- the `gguf` package's own reader: keys, tensor names, ggml shapes, and values against the torch weights (f32
  exact; f16/bf16 within one rounding; q8_0/q4_0 within the per-block bound of their quantizers);
- the round trip: a model exported, then read back by `load_model(FILE.gguf)`, gives the logits of the model it came
  from (exactly at f32 and at bf16 for a bf16 checkpoint; within the stated quantization error at q8_0/q4_0);
- llama.cpp itself (llama-cpp-python, in a child process: `PHIFORGE_LLAMA_PYTHON=/path/to/python`, or this
  interpreter if it has llama_cpp; otherwise those tests skip, saying so): it loads the export and its greedy tokens
  equal phiforge's on the default model.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tiny_phi3 import CHATML, VARIANTS, make_hf_checkpoint, randomize_lora_B, write_tokenizer

from phiforge.commands import export as export_cmd
from phiforge.engine.formats.default_model import build_default_model, default_gguf_path, default_model_path
from phiforge.engine.formats.gguf.names import STOP_IDS_KEY, gguf_names
from phiforge.engine.formats.gguf.reader import fields
from phiforge.engine.formats.gguf.vocab import tokenizer_from_fields
from phiforge.engine.formats.gguf.writer import ExportError, export_gguf
from phiforge.engine.formats.loader import load_model
from phiforge.engine.model.lora import apply_lora, merge_adapter
from phiforge.engine.model.tokenizer import load_tokenizer
from phiforge.engine.model.weights import CheckpointError
from phiforge.engine.serve.generate import Generator

STRINGS = ["Hello world", "  two spaces, digits 1234567890 and 3.14", "héllo wörld — 日本語 🙂",
           "<|im_start|>user\nhi<|im_end|>\n", "def f(x):\n\treturn x**2\n"]
def _tiny(tmp: Path, overrides: dict, spm: bool = False) -> Path:
    d = tmp / "model"
    d.mkdir()
    make_hf_checkpoint(d, {**overrides, "vocab_size": 400})
    write_tokenizer(d, spm)
    return d


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


# ---- the file, read back with gguf's own reader ------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["mini-4k-window", "longrope-long", "gqa", "partial-tied"])
def test_reader_sees_phi3_layout_and_exact_f32_values(tmp_path: Path, variant: str) -> None:
    overrides, seq = VARIANTS[variant]
    d = _tiny(tmp_path, overrides)
    model = load_model(d, dtype=torch.float32)
    cfg = model.config
    out = export_gguf(model, d, tmp_path / "m.gguf", "f32")
    r = gguf.GGUFReader(out)
    f = fields(r)
    assert f["general.architecture"] == "phi3"
    assert f["phi3.block_count"] == cfg.num_hidden_layers and f["phi3.embedding_length"] == cfg.hidden_size
    assert f["phi3.attention.head_count"] == cfg.num_attention_heads
    assert f["phi3.attention.head_count_kv"] == cfg.num_key_value_heads
    assert f["phi3.rope.dimension_count"] == cfg.rotary_dim
    assert f["phi3.attention.sliding_window"] == (cfg.sliding_window or 0)
    assert f["phi3.rope.scaling.original_context_length"] == cfg.original_max_position_embeddings
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.chat_template"] == CHATML and f["tokenizer.ggml.eos_token_id"] == 2
    assert f["tokenizer.ggml.eot_token_id"] == 2 and 2 in f[STOP_IDS_KEY]
    tensors = {t.name: t for t in r.tensors}
    expected = set(gguf_names(cfg).values()) | ({"rope_factors_long.weight", "rope_factors_short.weight"}
                                                if cfg.rope_type == "longrope" else set())
    assert set(tensors) == expected
    assert ("output.weight" in tensors) == (not cfg.tie_word_embeddings)
    state = model.state_dict()
    for key, name in gguf_names(cfg).items():
        t = tensors[name]
        assert tuple(int(x) for x in t.shape) == tuple(reversed(state[key].shape)), name  # ggml lists (in, out)
        assert t.tensor_type == Q.F32
        np.testing.assert_array_equal(np.asarray(t.data).reshape(state[key].shape), state[key].numpy(), err_msg=name)
    if cfg.rope_type == "longrope":
        np.testing.assert_array_equal(np.asarray(tensors["rope_factors_long.weight"].data),
                                      np.float32(cfg.long_factor))
        assert f["phi3.rope.scaling.attn_factor"] == pytest.approx(cfg.attention_factor, rel=1e-6)
    # ... and read back: phiforge on the GGUF computes what it computed on the directory
    ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    back = load_model(out, dtype=torch.float32)
    assert back.config.rope_type == cfg.rope_type and back.config.sliding_window == cfg.sliding_window
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), rtol=1e-6, atol=1e-6)


# per-type bound of |stored - w| from w's block of 32 along a row. q8_0: d = amax/127, q = round(w/d), then d is
# stored in f16, so |q·d16 - w| <= d/2 + 127·|d16 - d| <= d·(1/2 + 127·2^-11). q4_0: d = -(signed max)/8 and
# q in [-8, 7], so the far side of the block is off by up to one step: <= d·(1 + 8·2^-11).
BOUNDS = {"f16": lambda w, amax: np.abs(w) * 2.0**-11 + 6e-8, "bf16": lambda w, amax: np.abs(w) * 2.0**-8,
          "q8_0": lambda w, amax: amax / 127 * (0.5 + 127 * 2.0**-11) + 1e-7,
          "q4_0": lambda w, amax: amax / 8 * (1 + 8 * 2.0**-11) + 1e-7}


@pytest.mark.parametrize("qtype", ["f16", "bf16", "q8_0", "q4_0"])
def test_stored_values_within_the_types_rounding(tmp_path: Path, qtype: str) -> None:
    d = _tiny(tmp_path, {"num_key_value_heads": 2})
    model = load_model(d, dtype=torch.float32)
    out = export_gguf(model, d, tmp_path / "m.gguf", qtype)
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    state = model.state_dict()
    for key, name in gguf_names(model.config).items():
        w = state[key].numpy()
        t = tensors[name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        if w.ndim == 1:
            assert t.tensor_type == Q.F32
            np.testing.assert_array_equal(got, w)
            continue
        kind = "q8_0" if qtype == "q4_0" and name in ("token_embd.weight", "output.weight") else qtype
        assert t.tensor_type.name.lower() == kind, name
        amax = np.repeat(np.abs(w.reshape(w.shape[0], -1, 32)).max(-1), 32, axis=1)
        err = np.abs(got - w)
        assert (err <= BOUNDS[kind](w, amax)).all(), f"{name}: {err.max()}"
        assert err.max() > 0 or kind == "f32"  # it was really rounded: the bound is not vacuous


# ---- the default model: exported, imported, same logits ----------------------------------------------------------

@pytest.fixture(scope="module")
def default_dir() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def default_model(default_dir: Path):
    return load_model(default_dir, dtype=torch.float32)


QUESTION = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]


def test_default_model_round_trips_bit_exactly(tmp_path: Path, default_dir: Path, default_model) -> None:
    # the checkpoint is bf16, so a bf16 export holds it exactly
    out = export_gguf(default_model, default_dir, tmp_path / "d.gguf", "bf16")
    ids = torch.tensor([load_tokenizer(default_dir).apply_chat_template(QUESTION)])
    back = load_model(out, dtype=torch.float32)
    assert torch.equal(_logits(back, ids), _logits(default_model, ids))
    # the tokenizer inside the file encodes as the directory's does, and keeps its specials whole
    tok, _ = tokenizer_from_fields(fields(gguf.GGUFReader(out)), out)
    ref = load_tokenizer(default_dir)
    for s in STRINGS:
        assert tok.encode(s, add_special_tokens=False).ids == ref.encode(s, add_special_tokens=False), s


# stated quantization error of the default model's logits (max |Δ| over a 40-token chat prompt, over the logit range)
QUANT_LOGIT_ERROR = {"q8_0": 0.02, "q4_0": 0.5}


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_default_model_quantized_round_trip_within_stated_error(tmp_path: Path, default_dir: Path, default_model,
                                                                qtype: str) -> None:
    out = export_gguf(default_model, default_dir, tmp_path / "d.gguf", qtype)
    ids = torch.tensor([load_tokenizer(default_dir).apply_chat_template(QUESTION)])
    ref, got = _logits(default_model, ids), _logits(load_model(out, dtype=torch.float32), ids)
    rel = ((got - ref).abs().max() / (ref.max() - ref.min())).item()
    assert 0 < rel < QUANT_LOGIT_ERROR[qtype], rel


def test_fetch_builds_a_directory_from_an_exported_gguf(tmp_path: Path) -> None:
    d = _tiny(tmp_path, VARIANTS["partial-tied"][0])
    model = load_model(d, dtype=torch.float32)
    out = export_gguf(model, d, tmp_path / "m.gguf", "f32")
    built = build_default_model(tmp_path / "fetched", gguf_path=out)
    again = load_model(built, dtype=torch.float32)
    ids = torch.arange(30).unsqueeze(0)
    torch.testing.assert_close(_logits(again, ids), _logits(model, ids), rtol=1e-6, atol=1e-6)
    a, b = load_tokenizer(built), load_tokenizer(d)
    assert a.stop_ids == b.stop_ids and a.eos_token_id == b.eos_token_id
    assert a.apply_chat_template(QUESTION) == b.apply_chat_template(QUESTION)


def test_sentencepiece_tokenizer_round_trips(tmp_path: Path) -> None:
    d = _tiny(tmp_path, {}, spm=True)
    out = export_gguf(load_model(d, dtype=torch.float32), d, tmp_path / "m.gguf", "f16")
    f = fields(gguf.GGUFReader(out))
    assert f["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in f
    assert f["tokenizer.ggml.token_type"][f["tokenizer.ggml.tokens"].index("<0x41>")] == gguf.TokenType.BYTE
    tok, _ = tokenizer_from_fields(f, out)
    ref = load_tokenizer(d)
    for s in STRINGS + ["the lazy fox, hello phiforge 1234"]:
        assert tok.encode(s, add_special_tokens=False).ids == ref.encode(s, add_special_tokens=False), s
        ids = ref.encode(s, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids)


# ---- bad input: one clear error ----------------------------------------------------------------------------------

def test_unsupported_inputs_give_clear_errors(tmp_path: Path, capsys) -> None:
    d = _tiny(tmp_path, {})
    model = load_model(d, dtype=torch.float32)
    with pytest.raises(ExportError, match="--type 'q4_k'"):
        export_gguf(model, d, tmp_path / "m.gguf", "q4_k")
    apply_lora(model, r=2, alpha=4)
    with pytest.raises(ExportError, match="merge the adapter"):
        export_gguf(model, d, tmp_path / "m.gguf", "f16")
    (d / "tokenizer.json").rename(d / "moved.json")
    with pytest.raises(ExportError, match="tokenizer.json: no such file"):
        export_gguf(load_model(d, dtype=torch.float32), d, tmp_path / "m.gguf", "f16")
    (d / "moved.json").rename(d / "tokenizer.json")
    small = tmp_path / "small"
    small.mkdir()
    make_hf_checkpoint(small, {"vocab_size": 211})
    (small / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes())
    with pytest.raises(ExportError, match="embedding only 211 rows"):
        export_gguf(load_model(small, dtype=torch.float32), small, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()  # nothing half-written
    # the llama-architecture default GGUF is not phi3: load_model says so (fetch converts that one)
    with pytest.raises(CheckpointError, match="general.architecture is 'llama'"):
        load_model(default_gguf_path())
    bad = tmp_path / "q5.gguf"
    w = gguf.GGUFWriter(str(bad), "phi3")
    w.add_tensor("token_embd.weight", gguf.quants.quantize(np.ones((4, 32), np.float32), Q.Q5_0), raw_dtype=Q.Q5_0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match="'token_embd.weight' is Q5_0"):
        load_model(bad)
    # the command: one line on stderr, exit 1, no traceback
    args = ["--model", str(d), "--out", str(tmp_path / "m.bin")]
    capsys.readouterr()
    rc = export_cmd.run(_parse(args))
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "must end in .gguf" in err


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    export_cmd.add_arguments(p)
    return p.parse_args(argv)


# ---- llama.cpp itself --------------------------------------------------------------------------------------------

def llama_python() -> str | None:
    env = os.environ.get("PHIFORGE_LLAMA_PYTHON")
    if env:
        return env
    return sys.executable if importlib.util.find_spec("llama_cpp") else None


needs_llama_cpp = pytest.mark.skipif(llama_python() is None, reason="llama-cpp-python not installed: set "
                                     "PHIFORGE_LLAMA_PYTHON to a Python that has it to run the llama.cpp checks")

LLAMA_GREEDY = r"""
import json, sys
from llama_cpp import Llama
path, n, stops = sys.argv[1], int(sys.argv[2]), set(json.loads(sys.argv[4]))
prompt = json.loads(sys.stdin.read())
llm = Llama(model_path=path, n_ctx=512, n_batch=512, n_threads=2, verbose=False)
out = []
for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
    out.append(int(tok))
    if len(out) == n or tok in stops:
        break
print(json.dumps({"tokens": out, "encoded": llm.tokenize(sys.argv[3].encode(), add_bos=False, special=True)}))
"""


def llama_cpp_greedy(path: Path, prompt: list[int], n: int, stops: set[int], text: str = "") -> dict:
    """llama.cpp's greedy tokens for `prompt` (ids) on the GGUF `path`, and its encoding of `text`."""
    argv = [llama_python(), "-c", LLAMA_GREEDY, str(path), str(n), text, json.dumps(sorted(stops))]
    out = subprocess.run(argv, input=json.dumps(prompt),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_llama_cpp
def test_llama_cpp_greedy_tokens_equal_phiforge_on_the_default_model(tmp_path: Path, default_dir: Path,
                                                                      default_model) -> None:
    tok = load_tokenizer(default_dir)
    prompt = tok.apply_chat_template(QUESTION)
    [ours] = Generator(default_model, tok).generate([prompt], max_new_tokens=16, temperature=0)
    out = export_gguf(default_model, default_dir, tmp_path / "d.gguf", "f32")
    theirs = llama_cpp_greedy(out, prompt, 16, tok.stop_ids, STRINGS[1] + STRINGS[3])
    assert theirs["tokens"] == ours.token_ids, (theirs["tokens"], ours.token_ids)
    assert tok.decode(ours.token_ids, skip_special_tokens=True) == "The capital of France is Paris."
    assert theirs["encoded"] == tok.encode(STRINGS[1] + STRINGS[3], add_special_tokens=False)


@needs_llama_cpp
def test_llama_cpp_greedy_tokens_equal_phiforge_on_a_merged_adapter(tmp_path: Path, default_dir: Path) -> None:
    # a random adapter (B != 0), merged: the file must carry the merged weights, not the base's
    model = load_model(default_dir, dtype=torch.float32)
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    randomize_lora_B(model, seed=2, std=0.08)
    merge_adapter(model, dtype=torch.float32)
    tok = load_tokenizer(default_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write one sentence about the sea."}])
    [ours] = Generator(model, tok).generate([prompt], max_new_tokens=16, temperature=0)
    [base] = Generator(load_model(default_dir, dtype=torch.float32), tok).generate([prompt], max_new_tokens=16,
                                                                                  temperature=0)
    assert ours.token_ids != base.token_ids  # the adapter changed the answer
    theirs = llama_cpp_greedy(export_gguf(model, default_dir, tmp_path / "ft.gguf", "f32"), prompt, 16, tok.stop_ids)
    assert theirs["tokens"] == ours.token_ids
