"""bf16 through the engine: each of many concurrent greedy requests equals the same request alone, except at a
near-tie. A batched bf16 matmul may sum in another order than a one-row one; where that flips the greedy choice, the
two tokens' logits (recomputed by a one-row forward of the shared prefix) must be within bf16 rounding of each other.
A flip between clearly separated logits would be a real bug (rows seeing each other's K/V or positions)."""
from __future__ import annotations

import pytest
import torch
from tiny_phi3 import StubTokenizer, make_hf_checkpoint, random_prompt

from phiforge.engine import load_model, load_tokenizer
from phiforge.engine.formats.default_model import default_model_path
from phiforge.engine.serve.engine import Engine
from phiforge.engine.serve.request import Request

# bf16 keeps 8 significant bits (relative rounding 2^-8); a logit is a long sum of rounded products, so a near-tie
# is a gap of a few bf16 steps of the largest logit (one step at 20 is 0.125)
NEAR_TIE = 0.02
QUESTIONS = ["What is the capital of France?", "Write a haiku about rain.", "Explain LoRA briefly.",
             "List three fruits.", "Who wrote Hamlet?", "What is 12 times 7?", "Describe a cat in one line.",
             "Why is the sky blue?"]


def _alone(model, tok, req: dict):
    e = Engine(model, tok, max_batch=1, kv_tokens=1024)
    try:
        return e.submit(Request(**req)).result(300)
    finally:
        e.shutdown()


def _check_equal_up_to_near_ties(model, tok, reqs: list[dict], max_batch: int) -> int:
    """Run `reqs` concurrently; compare each with its run alone; returns how many differ (all at near-ties)."""
    e = Engine(model, tok, max_batch=max_batch, kv_tokens=max_batch * 1024, prefill_chunk=16, prefix_cache=False)
    try:
        got = [h.result(300) for h in [e.submit(Request(**r)) for r in reqs]]
    finally:
        e.shutdown()
    flips = 0
    for r, g in zip(reqs, got):
        a = _alone(model, tok, r)
        if g.token_ids == a.token_ids:
            continue
        t = next((i for i, (x, y) in enumerate(zip(g.token_ids, a.token_ids)) if x != y), None)
        assert t is not None, f"one stopped early without a differing token: {g.token_ids} vs {a.token_ids}"
        with torch.no_grad():
            out = model(torch.tensor([r["prompt_ids"] + a.token_ids[:t]]))
        logits = (out.logits if hasattr(out, "logits") else out)[0, -1].float()  # (V,)
        gap = abs(logits[a.token_ids[t]] - logits[g.token_ids[t]]).item()
        scale = logits.abs().max().item()
        assert gap <= NEAR_TIE * scale, (f"token {t}: batched chose {g.token_ids[t]}, alone {a.token_ids[t]}, logit gap "
                                         f"{gap:.4f} is not a near-tie (largest logit {scale:.2f})")
        flips += 1
    return flips


def test_tiny_bf16_concurrent_equal_alone_up_to_near_ties(tmp_path):
    make_hf_checkpoint(tmp_path, dict(sliding_window=15, num_key_value_heads=2))
    model = load_model(tmp_path, dtype=torch.bfloat16)
    reqs = [dict(prompt_ids=random_prompt(3 + 5 * i, i), max_tokens=8 + (i * 7) % 20) for i in range(16)]
    _check_equal_up_to_near_ties(model, StubTokenizer(), reqs, max_batch=8)


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_default_model_bf16_concurrent_equal_alone_up_to_near_ties(quant):
    d = default_model_path()
    model, tok = load_model(d, dtype=torch.bfloat16, quant=quant), load_tokenizer(d)
    reqs = [dict(prompt_ids=tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True),
                 max_tokens=24) for q in QUESTIONS]
    _check_equal_up_to_near_ties(model, tok, reqs, max_batch=8)
