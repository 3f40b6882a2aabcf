"""MiniLM encoder parity against transformers' BertModel + masked mean pooling + L2 norm (the reference)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from phiforge.retrieval.encoder import MAX_TOKENS, load_encoder, load_wordpiece, model_dir

TEXTS = [
    "The pump station at Harrow Ridge switches to standby power within 30 seconds.",
    "short",
    "Boil-water notices are issued when chlorine residual drops below 0.2 mg/L at any sampling point.",
    # > 128 and > 256 word pieces: exercises the truncation trap in the shipped tokenizer.json
    " ".join(f"Valve {i} on main line {i * 7} was flushed and inspected for corrosion." for i in range(40)),
    " ".join(["meter reading"] * 70),  # ~ 140 pieces: between the shipped 128 and the real 256
    "Ünïcode café — naïve résumé, 東京 water.",
]


@pytest.fixture(scope="module")
def encoder():
    return load_encoder()


def reference_embeddings(texts: list[str]) -> np.ndarray:
    transformers = pytest.importorskip("transformers")
    model = transformers.BertModel.from_pretrained(str(model_dir())).eval()
    tok = load_wordpiece()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (N, T, 384)
    m = mask[..., None].float()
    pooled = (h * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def test_parity_with_transformers(encoder):
    ours = encoder.encode(TEXTS)
    ref = reference_embeddings(TEXTS)
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), 384)
    cos = (ours * ref).sum(1)
    assert cos.min() >= 0.99999, cos
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_long_text_uses_256_not_128(encoder):
    long_text = TEXTS[3]
    assert len(encoder.token_ids([long_text])[0]) == MAX_TOKENS
    # the 140-piece text must see its tail: cutting at 128 would change the embedding
    mid = TEXTS[4]
    n = len(encoder.token_ids([mid])[0])
    assert 128 < n < MAX_TOKENS
    shipped = load_wordpiece(max_tokens=128)
    assert len(shipped.encode(mid).ids) == 128


def test_batching_is_order_and_batch_invariant(encoder):
    full = encoder.encode(TEXTS)
    singles = np.concatenate([encoder.encode([t]) for t in TEXTS])
    np.testing.assert_allclose(full, singles, atol=1e-5)
    encoder.token_budget, old = 300, encoder.token_budget  # force many tiny batches
    try:
        np.testing.assert_allclose(encoder.encode(TEXTS[::-1])[::-1], full, atol=1e-5)
    finally:
        encoder.token_budget = old
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)


def test_empty_and_wrong_input(encoder):
    assert encoder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError):
        encoder.encode("a single string")


def test_public_api_is_lazy():
    code = "import sys, phiforge.retrieval as r; assert 'torch' not in sys.modules; r.load_encoder; r.Index"
    subprocess.run([sys.executable, "-c", code], check=True)
