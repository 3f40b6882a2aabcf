"""logprobs and n through the server, with the real openai client: chat and completions logprobs equal
log_softmax of transformers' logits (fp32, 1e-4) in OpenAI's shapes, with bytes and text offsets that rebuild the
text; streamed logprobs equal the whole response's; n = 3 gives three indexed choices (distinct when sampled, equal
when greedy), usage summing their tokens, streamed and not."""
from __future__ import annotations

import pytest
import torch
from transformers import Phi3ForCausalLM as HFModel

from server_harness import CHAT, client, server, serving, tiny, adapters  # noqa: F401  (fixtures)
from phiforge.engine.model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def hf_logprobs(tiny):
    hf = HFModel.from_pretrained(tiny, torch_dtype=torch.float32).eval()

    def run(prompt_ids: list[int], out_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = hf(torch.tensor([prompt_ids + out_ids])).logits[0].float()
        return torch.log_softmax(logits, -1)[len(prompt_ids) - 1:-1]                   # (T, V)
    return run


def test_chat_logprobs_equal_transformers_and_carry_bytes(server, tiny, hf_logprobs):
    tok = load_tokenizer(tiny)
    r = client(server).chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0,
                                               logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    prompt = list(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True))
    out = tok.encode(r.choices[0].message.content, add_special_tokens=False)
    assert b"".join(bytes(c.bytes) for c in content).decode() == r.choices[0].message.content
    ref = hf_logprobs(prompt, out)
    assert len(content) == len(out) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    for t, c in enumerate(content):
        assert c.logprob == pytest.approx(ref[t, out[t]].item(), abs=1e-4)
        top = ref[t].topk(3)
        assert [x.logprob for x in c.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [bytes(x.bytes) for x in c.top_logprobs] == [tok.token_bytes(i) for i in top.indices.tolist()]
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob)   # greedy chose the best


def test_completion_logprobs_shape_offsets_and_stream(server, tiny, hf_logprobs):
    tok = load_tokenizer(tiny)
    c = client(server)
    r = c.completions.create(model="tiny", prompt="The colors are", max_tokens=8, temperature=0, logprobs=2)
    lp, text = r.choices[0].logprobs, r.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    pieces = [text[a:b] for a, b in zip(lp.text_offset, lp.text_offset[1:] + [len(text)])]
    assert "".join(pieces) == text
    for tokstr, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[tokstr] == pytest.approx(v) and len(top) <= 3
    prompt = tok.encode("The colors are")
    ids = []
    for piece in lp.tokens:  # the ids back from the byte strings, to score them with transformers
        ids.append(next(i for i in range(tok.vocab_size) if tok.token_bytes(i).decode("utf-8", "replace") == piece))
    ref = hf_logprobs(prompt, ids)
    assert lp.token_logprobs == pytest.approx([ref[t, i].item() for t, i in enumerate(ids)], abs=1e-4)
    streamed = [ch for ch in c.completions.create(model="tiny", prompt="The colors are", max_tokens=8,
                                                  temperature=0, logprobs=2, stream=True)]
    got = [v for ch in streamed if ch.choices and ch.choices[0].logprobs
           for v in ch.choices[0].logprobs.token_logprobs]
    assert got == pytest.approx(lp.token_logprobs, abs=1e-5)  # the prompt's K/V now come from the prefix cache


def test_n_choices_streamed_and_not(tiny):
    with serving(tiny, max_batch=4) as (url, _):
        c = client(url)
        r = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, n=3, temperature=1.0, seed=5,
                                      logprobs=True)
        assert [ch.index for ch in r.choices] == [0, 1, 2]
        texts = [ch.message.content for ch in r.choices]
        assert len(set(texts)) == 3
        # every output token has a logprob entry but a stop token: so usage sums the three choices
        assert r.usage.completion_tokens == sum(len(ch.logprobs.content) + (ch.finish_reason == "stop")
                                                for ch in r.choices)
        one = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=1.0, seed=5)
        assert one.choices[0].message.content == texts[0]           # choice 0 keeps the request's seed
        assert r.usage.prompt_tokens == one.usage.prompt_tokens     # the prompt counted once
        streamed = list(c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, n=3, temperature=1.0,
                                                  seed=5, stream=True, stream_options={"include_usage": True}))
        by = {0: "", 1: "", 2: ""}
        finishes = {}
        for ch in streamed:
            for x in ch.choices:
                by[x.index] += x.delta.content or ""
                if x.finish_reason:
                    assert x.index not in finishes
                    finishes[x.index] = x.finish_reason
        assert list(by.values()) == texts and set(finishes) == {0, 1, 2}
        assert streamed[-1].usage.completion_tokens == r.usage.completion_tokens
        greedy = c.completions.create(model="tiny", prompt="Colors:", max_tokens=5, n=2, temperature=0)
        alone = c.completions.create(model="tiny", prompt="Colors:", max_tokens=5, temperature=0)
        assert greedy.choices[0].text == greedy.choices[1].text == alone.choices[0].text
        assert greedy.usage.completion_tokens == 2 * alone.usage.completion_tokens
