"""Chat templates render token-for-token as transformers' apply_chat_template; the stop set is complete; every
token's bytes equal llguidance's reading of the tokenizer."""
from __future__ import annotations

import json

import llguidance
import pytest
from tiny_phi3 import write_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer

from phiforge.engine import load_tokenizer
from phiforge.engine.formats.default_model import default_model_path
from phiforge.engine.model.tokenizer import PHI3_CHAT_TEMPLATE

PHI3_SPECIALS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]

CHATS = [
    [{"role": "user", "content": "What is NF4?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Ünïcode ✓ and  two spaces\nnewline"}],
]


@pytest.fixture(scope="module")
def default_model_dir():
    return default_model_path()


def _phi3_like_dir(tmp_path, with_template: bool):
    """A byte-level BPE with Phi-3's special tokens and (optionally) its chat template in tokenizer_config.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(list(pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(PHI3_SPECIALS)
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|endoftext|>",
           "unk_token": "<unk>", "pad_token": "<|endoftext|>", "add_bos_token": False}
    if with_template:
        cfg["chat_template"] = PHI3_CHAT_TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    eos = [tok.token_to_id(t) for t in ("<|endoftext|>", "<|assistant|>", "<|end|>")]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return tmp_path, eos


def _hf_ids(hf, chat, add_generation_prompt):
    out = hf.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", CHATS)
def test_phi3_template_equals_transformers(tmp_path, chat, add_generation_prompt):
    d, _ = _phi3_like_dir(tmp_path, with_template=True)
    hf = AutoTokenizer.from_pretrained(d)
    ours = load_tokenizer(d)
    assert ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt) == \
        _hf_ids(hf, chat, add_generation_prompt)


def test_fallback_template_and_phi3_stop_set(tmp_path):
    d, eos = _phi3_like_dir(tmp_path, with_template=False)
    ours = load_tokenizer(d)
    assert ours.chat_template == PHI3_CHAT_TEMPLATE
    text = ours.apply_chat_template(CHATS[0], tokenize=False)
    assert text == "<|user|>\nWhat is NF4?<|end|>\n<|assistant|>\n"
    assert set(eos) <= ours.stop_ids  # the whole generation_config set, not one id


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", CHATS)
def test_default_model_template_equals_transformers(default_model_dir, chat, add_generation_prompt):
    hf = AutoTokenizer.from_pretrained(default_model_dir)
    ours = load_tokenizer(default_model_dir)
    assert ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt) == \
        _hf_ids(hf, chat, add_generation_prompt)
    im_end = ours.token_to_id("<|im_end|>")
    assert im_end in ours.stop_ids
    s = "Paris, 2026: naïve café — 3.14 🚰"
    assert ours.encode(s) == hf(s)["input_ids"]
    assert ours.decode(ours.encode(s)) == s


def test_bad_tokenizer_file_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("family", ["byte-level (the default model)", "sentencepiece byte-fallback"])
def test_token_bytes_equal_llguidance_for_every_id(tmp_path, family):
    """Each id's bytes (logprobs' `bytes`) against llguidance's own reading of the same tokenizer.json, which the
    grammar masks rely on; characters split across byte tokens rebuild exactly."""
    if family.startswith("byte-level"):
        d = default_model_path()
    else:
        d = tmp_path
        write_tokenizer(d, spm=True)
    tok = load_tokenizer(d)
    ref = llguidance.LLTokenizer(tok.backend_json(), n_vocab=tok.vocab_size, eos_token=sorted(tok.stop_ids) or [0])
    ff = tok.token_to_id("<0xFF>")  # llguidance keeps byte 0xFF (never in UTF-8) as its special-token marker
    assert [tok.token_bytes(i) for i in range(tok.vocab_size) if i != ff] == \
        [ref.decode_bytes([i]) for i in range(tok.vocab_size) if i != ff]
    if ff is not None:
        assert tok.token_bytes(ff) == b"\xff"
    text = "héllo wörld — 日本語 🙂"
    ids = tok.encode(text, add_special_tokens=False)
    assert b"".join(tok.token_bytes(i) for i in ids).decode().strip() == text
    assert tok.token_bytes(tok.vocab_size) == b""
