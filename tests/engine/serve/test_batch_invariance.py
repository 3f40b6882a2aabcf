"""Same request, same answer: on the default model, a request's logprobs (log_softmax of its logits, to the last
bit) and tokens are the same alone, beside 2-15 other requests (prefilling and decoding in the same steps, rows
freed and reused), asked again warm (its prompt from the prefix cache), and with the step's prompt budget under
pressure; seeded sampling too. bf16 and fp32, dense and NF4, through the native decode step. With
`batch_invariant=False` the same comparison sees bf16 logits move (so the check can fail)."""
from __future__ import annotations

import pytest
import torch
from tiny_phi3 import randomize_lora_B

from phiforge.engine.formats.default_model import default_model_path
from phiforge.engine.formats.loader import load_model
from phiforge.engine.formats.peft import save_adapter
from phiforge.engine.model.lora import apply_lora
from phiforge.engine.model.tokenizer import load_tokenizer
from phiforge.engine.serve.engine import Engine
from phiforge.engine.serve.request import Request
from phiforge.engine.serve.sampling import SamplingParams

QUESTIONS = ["Name three colors.", "What is the capital of France? Answer in one word.",
             "Write one sentence about rivers and the sea, and why the water is salty.", "Count to five."]
MATES = [f"Tell me something about the number {i} and its neighbours in a short line." * (1 + i % 3)
         for i in range(12)]
NEW = 10
SEEDED = SamplingParams(temperature=0.9, top_p=0.95)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_model_path())


def _ids(tok, text: str) -> list[int]:
    return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))


def _answer(r):
    """What must not move: the tokens and every logprob reported (the chosen token's and the top 5's)."""
    return r.token_ids, [(e.id, e.logprob, tuple(e.top)) for e in r.logprobs]


def _requests(tok, seeded: bool) -> list[Request]:
    kw = dict(sampling=SEEDED, seed=7) if seeded else {}
    return [Request(_ids(tok, q), NEW, logprobs=5, stop_token_ids=frozenset(), **kw) for q in QUESTIONS]


def _run(model, tok, reqs, mates: int, invariant: bool = True, step_tokens: int = 4096):
    """The requests (and `mates` others, half submitted mid-way) through one engine, driven step by step."""
    e = Engine(model, tok, max_batch=16, kv_tokens=16 * 256, prefill_chunk=32, step_tokens=step_tokens,
               batch_invariant=invariant, start=False)
    others = [Request(_ids(tok, m), 6 + i % 9, stop_token_ids=frozenset()) for i, m in enumerate(MATES[:mates])]
    handles = [e.submit(o) for o in others[: mates // 2]]
    for _ in range(2):
        e.step()
    mine = [e.submit(Request(r.prompt_ids, r.max_tokens, r.sampling, r.seed, logprobs=5, stop_token_ids=frozenset()))
            for r in reqs]
    handles += [e.submit(o) for o in others[mates // 2:]]
    while not all(h.done for h in mine + handles):
        e.step()
    again = [e.submit(Request(r.prompt_ids, r.max_tokens, r.sampling, r.seed, logprobs=5, stop_token_ids=frozenset()))
             for r in reqs]                                                        # warm: prefixes from the cache
    while not all(h.done for h in again):
        e.step()
    return [_answer(h.result()) for h in mine], [_answer(h.result()) for h in again], \
        [h.result().usage.cached_tokens for h in again]


def _alone(model, tok, reqs, invariant: bool = True):
    out = []
    for r in reqs:
        e = Engine(model, tok, max_batch=1, kv_tokens=256, prefill_chunk=32, batch_invariant=invariant, start=False)
        h = e.submit(r)
        while not h.done:
            e.step()
        out.append(_answer(h.result()))
    return out


@pytest.mark.parametrize("dtype,quant,modes", [(torch.bfloat16, None, (False, True)), (torch.float32, None, (False,)),
                                               (torch.bfloat16, "nf4", (True,))])
def test_logits_bitwise_equal_alone_busy_and_warm(tok, dtype, quant, modes):
    """modes: greedy (False) and / or seeded sampling (True)."""
    model = load_model(default_model_path(), dtype=dtype, quant=quant)
    for seeded in modes:
        reqs = _requests(tok, seeded)
        alone = _alone(model, tok, reqs)
        for mates in (3, 12):
            busy, warm, cached = _run(model, tok, reqs, mates)
            assert busy == alone, (dtype, quant, seeded, mates)
            assert warm == alone and all(c > 0 for c in cached), (dtype, quant, seeded, mates, cached)
        tight, _, _ = _run(model, tok, reqs, 12, step_tokens=64)   # two chunks a step: prompts wait their turn
        assert tight == alone


def test_without_invariance_bf16_logits_move(tok):
    """The same comparison with batch_invariant=False: the one-row GEMV and the batched GEMM sum in different
    orders, so some bf16 logprob differs in its last bits (the check above is able to fail)."""
    model = load_model(default_model_path(), dtype=torch.bfloat16)
    reqs = _requests(tok, False)
    alone = _alone(model, tok, reqs, invariant=False)
    busy, _, _ = _run(model, tok, reqs, 12, invariant=False)
    assert busy != alone


def test_adapter_rows_bitwise_equal_alone_and_beside_other_adapters(tok, tmp_path):
    """Rows of two LoRA adapters and of the base in one step (the native step's grouped adapter epilogue): each
    request's logprobs are what they are alone (bf16)."""
    dirs = {}
    for i, name in enumerate(("a", "b")):
        net = load_model(default_model_path(), dtype=torch.float32)
        apply_lora(net, r=4, alpha=8, dropout=0.0)
        randomize_lora_B(net, seed=30 + i, std=0.02)
        dirs[name] = str(save_adapter(net, tmp_path / name))
    def run(reqs):  # a fresh base each time: an Engine wraps its model's projections for the adapters
        model = load_model(default_model_path(), dtype=torch.bfloat16)
        e = Engine(model, tok, max_batch=16, kv_tokens=16 * 256, prefill_chunk=32, adapters=dirs, start=False)
        hs = [e.submit(r) for r in reqs]
        while not all(h.done for h in hs):
            e.step()
        if any(r.adapter for r in reqs):                 # the native step's adapter epilogue ran
            assert e._decode[False].steps["native_lora"] > 0, e._decode[False].steps
        return [_answer(h.result()) for h in hs]

    reqs = [Request(_ids(tok, q), NEW, logprobs=5, stop_token_ids=frozenset(), adapter=a)
            for q, a in zip(QUESTIONS * 3, ["a", "b", None] * 4)]
    together = run(reqs)
    assert together[:6] == [run([r])[0] for r in reqs[:6]]
    base = run([Request(reqs[0].prompt_ids, NEW, logprobs=5, stop_token_ids=frozenset())])[0]
    assert base != together[0]                            # the adapter changes the answer
