"""The generation loop: greedy equal to transformers' generate, batches equal one-by-one, stops, streams, cancels.

Tiny random checkpoints (tests/tiny_phi3.py) cover the variants cheaply; the default model (SmolLM2
in Phi-3 layout) covers real text. A "scripted" model, which emits a fixed token sequence, drives the
detokenization and stop-string paths through the Generator with inputs chosen to be hard (characters and stop
strings split across tokens).
"""
from __future__ import annotations

import threading

import pytest
import torch
from tiny_phi3 import StubTokenizer, TINY, longrope, make_hf_checkpoint, random_prompt
from transformers import Phi3ForCausalLM as HFModel

from phiforge.engine import Generator, load_model, load_tokenizer
from phiforge.engine.formats.default_model import default_model_path

N_NEW = 32


def _hf_greedy(hf, prompt: list[int], n: int = N_NEW) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


# ---- tiny configs vs transformers --------------------------------------------------------------------------------
TINY_CASES = {
    # name: (config overrides, prompt length, same-regime reference overrides for transformers or None)
    "gqa": (dict(num_key_value_heads=2), 20, None),
    "sliding-window": (dict(sliding_window=15, num_key_value_heads=2), 20, None),   # 20 + 32 > window 15
    "longrope-short": (longrope(8, orig=64), 20, None),                             # 20 + 32 <= 64: short
    "longrope-long": (longrope(8, orig=64), 80, None),                              # prompt already > 64
    "longrope-crossing": (longrope(8, orig=64), 40, "long"),                        # 40 + 32 > 64: long at admission
    # the edge: the last forward runs position prompt + 32 - 2; transformers goes long iff that position + 1 > 64
    "longrope-edge-short": (longrope(8, orig=64), 33, None),                        # runs up to 63: short
    "longrope-edge-long": (longrope(8, orig=64), 34, "long"),                       # runs up to 64: long
}


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_tiny_greedy_equals_transformers(tmp_path, case):
    overrides, plen, regime = TINY_CASES[case]
    hf = make_hf_checkpoint(tmp_path, overrides)
    gen = Generator(load_model(tmp_path, dtype=torch.float32), StubTokenizer())
    prompt = random_prompt(plen, 1)
    [res] = gen.generate(prompt, max_new_tokens=N_NEW, temperature=0)
    if "longrope" in case:  # transformers' test at its last forward: position plen + N_NEW - 2, plus 1, > 64
        assert res.rope_long == (plen + N_NEW - 1 > 64)
    if regime == "long":
        # transformers re-prefills with the long table when the sequence crosses original_max; phiforge uses the
        # long table from the first token. The same-regime reference: transformers with short_factor := long_factor.
        assert res.rope_long
        rope = overrides["rope_scaling"]
        ref_dir = tmp_path / "long-everywhere"
        make_hf_checkpoint(ref_dir, {**overrides, "rope_scaling": {**rope, "short_factor": rope["long_factor"]}})
        hf = HFModel.from_pretrained(ref_dir, dtype=torch.float32).eval()
    assert res.token_ids == _hf_greedy(hf, prompt)
    assert res.finish_reason == ("stop" if res.token_ids[-1] == TINY["eos_token_id"] else "length")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_hf_checkpoint(d, dict(sliding_window=15, num_key_value_heads=2))
    return Generator(load_model(d, dtype=torch.float32), StubTokenizer())


def test_batch_equals_one_by_one(tiny):
    prompts = [random_prompt(n, n) for n in (5, 23, 11, 1)]
    stops = [["q"], [], ["zz", "k"], []]  # each row its own stop strings
    batch = tiny.generate(prompts, max_new_tokens=24, temperature=0, stop=stops)
    for p, s, got in zip(prompts, stops, batch):
        [alone] = tiny.generate(p, max_new_tokens=24, temperature=0, stop=s)
        assert (got.token_ids, got.text, got.finish_reason) == (alone.token_ids, alone.text, alone.finish_reason)
    assert {r.finish_reason for r in batch} >= {"stop", "length"}  # the stops actually fired somewhere


def test_longrope_batch_mixing_regimes_equals_one_by_one(tmp_path):
    make_hf_checkpoint(tmp_path, longrope(8, orig=64))
    gen = Generator(load_model(tmp_path, dtype=torch.float32), StubTokenizer())
    prompts = [random_prompt(10, 1), random_prompt(50, 2), random_prompt(20, 3)]  # + 24 new: short, long, short
    batch = gen.generate(prompts, max_new_tokens=24, temperature=0)
    assert [r.rope_long for r in batch] == [False, True, False]
    for p, got in zip(prompts, batch):
        assert got.token_ids == gen.generate(p, max_new_tokens=24, temperature=0)[0].token_ids


def test_seeded_sampling_is_reproducible(tiny):
    kw = dict(max_new_tokens=24, temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.2)
    p = random_prompt(9, 4)
    a = tiny.generate(p, seed=7, **kw)[0].token_ids
    assert tiny.generate(p, seed=7, **kw)[0].token_ids == a
    assert tiny.generate(p, seed=8, **kw)[0].token_ids != a
    # a row's draws depend on its own seed only, not on its batch mates
    batch = tiny.generate([random_prompt(3, 5), p], seed=[1, 7], **kw)
    assert batch[1].token_ids == a


def test_overlong_prompt_is_an_error_before_any_compute(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(tiny.model, "forward", lambda *a, **k: calls.append(1))
    ctx = TINY["max_position_embeddings"]
    with pytest.raises(ValueError, match=rf"prompt 1: 250 prompt tokens \+ max_new_tokens 10 = 260 > .* {ctx}"):
        tiny.generate([random_prompt(5, 1), random_prompt(250, 1)], max_new_tokens=10)
    with pytest.raises(ValueError, match="empty"):
        tiny.generate([[]], max_new_tokens=10)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny.generate([5, 10_000], max_new_tokens=10)
    assert calls == []


def test_cancellation(tiny):
    # a callable, checked before every step: stops after a few tokens
    n = {"calls": 0}

    def cancel():
        n["calls"] += 1
        return n["calls"] > 3
    [r] = tiny.generate(random_prompt(5, 1), max_new_tokens=200, temperature=0, cancel=cancel)
    assert r.finish_reason == "cancelled" and len(r.token_ids) == 3
    # an Event set from the consumer while streaming (as a server would on disconnect)
    ev = threading.Event()
    pieces = []
    for piece in tiny.stream(random_prompt(5, 1), max_new_tokens=200, temperature=0, cancel=ev):
        pieces.append(piece)
        ev.set()
    assert len(pieces) <= 2
    # between prefill chunks: the prompt is never finished
    tiny.prefill_chunk = 4
    n["calls"] = 0
    try:
        [r] = tiny.generate(random_prompt(40, 1), max_new_tokens=10, cancel=cancel)
    finally:
        tiny.prefill_chunk = 512
    assert (r.finish_reason, r.token_ids, n["calls"]) == ("cancelled", [], 4)


def test_chunked_prefill_equals_one_chunk(tiny):
    p = random_prompt(37, 6)
    ref = tiny.generate(p, max_new_tokens=16, temperature=0)[0].token_ids
    tiny.prefill_chunk = 8
    try:
        assert tiny.generate(p, max_new_tokens=16, temperature=0)[0].token_ids == ref
    finally:
        tiny.prefill_chunk = 512


# ---- the default model ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_dir():
    return default_model_path()


@pytest.fixture(scope="module")
def smol(default_dir):
    return Generator(load_model(default_dir, dtype=torch.float32), load_tokenizer(default_dir))


STORY = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def test_default_model_greedy_32_equals_transformers(smol, default_dir):
    hf = HFModel.from_pretrained(default_dir, dtype=torch.float32).eval()
    prompt = smol.tokenizer.apply_chat_template(STORY)
    [res] = smol.generate(STORY, max_new_tokens=N_NEW, temperature=0)
    assert len(res.token_ids) == N_NEW and res.finish_reason == "length"
    assert res.token_ids == _hf_greedy(hf, prompt)
    assert res.text == smol.tokenizer.decode(res.token_ids, skip_special_tokens=True)


def _drain(run, n: int) -> tuple[dict[int, list[str]], list]:
    """A batch stream's pieces per prompt index (n prompts) and its return value, the results."""
    pieces: dict[int, list[str]] = {i: [] for i in range(n)}
    while True:
        try:
            i, piece = next(run)
        except StopIteration as done:
            return pieces, done.value
        pieces[i].append(piece)


def test_default_model_stream_stop_and_batch(smol):
    q = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
    [full] = smol.generate(q, max_new_tokens=24, temperature=0)
    assert full.text == "The capital of France is Paris." and full.finish_reason == "stop"
    assert full.token_ids[-1] in smol.tokenizer.stop_ids  # ended by <|im_end|>, the end-of-turn token
    pieces = list(smol.stream(q, max_new_tokens=24, temperature=0))
    assert "".join(pieces) == full.text and len(pieces) > 3
    # a stop string spanning two tokens (" of" + " France") is cut exactly where it starts
    [cut] = smol.generate(q, max_new_tokens=24, temperature=0, stop=["f Fr", "zebra"])
    assert (cut.text, cut.finish_reason) == ("The capital o", "stop")
    # a batch (streamed: (index, piece) pairs) with a prompt of another length equals one by one
    pieces, batch = _drain(smol.stream([STORY, q], max_new_tokens=8, temperature=0), 2)
    assert ["".join(pieces[0]), "".join(pieces[1])] == [r.text for r in batch]
    assert batch[1].token_ids == full.token_ids[:8]
    assert batch[0].token_ids == smol.generate(STORY, max_new_tokens=8, temperature=0)[0].token_ids


class Scripted(torch.nn.Module):
    """A stand-in model that emits a fixed token sequence per row (prompt length known), to drive hard cases."""

    def __init__(self, real, scripts: list[list[int]], prompt_lens: list[int]) -> None:
        super().__init__()
        self.real, self.scripts, self.plens = real, scripts, prompt_lens
        self.config, self.rotary_emb = real.config, real.rotary_emb

    @property
    def dtype(self):
        return self.real.dtype

    def new_cache(self, *a, **k):
        return self.real.new_cache(*a, **k)

    def forward(self, input_ids, position_ids=None, cache=None, num_logits=None, return_hidden=False):
        B = input_ids.shape[0]
        logits = torch.zeros(B, 1, self.config.vocab_size)
        for b in range(B):
            row = getattr(cache, "row", b)  # the engine runs each row alone, through a view naming its cache row
            k = int(position_ids[b, -1]) + 1 - self.plens[row]  # index of the token this call produces
            script = self.scripts[row]
            logits[b, 0, script[min(k, len(script) - 1)]] = 1.0
        return logits


def _scripted(smol, texts: list[str]):
    tok = smol.tokenizer
    end = tok.token_to_id("<|im_end|>")  # a stop id after each script: rows end by "stop", not by repetition
    scripts = [tok.encode(t, add_special_tokens=False) + [end] for t in texts]
    prompts = [[tok.encode("Hi", add_special_tokens=False)[0]] for _ in texts]
    return Generator(Scripted(smol.model, scripts, [1] * len(texts)), tok, lean_decode=False), prompts, scripts


def test_utf8_and_split_stop_strings_through_the_loop(smol):
    tok = smol.tokenizer
    utf8 = "Le café ☕ à 東京 🙂🙂!"
    stopped = "Answer: 42<|stop|> and more"
    false_alarm = "a <|st b <| c"
    gen, prompts, scripts = _scripted(smol, [utf8, stopped, false_alarm])
    # the hard part is real: some tokens of the UTF-8 text are half a character on their own
    assert any("\ufffd" in tok.decode([t]) for t in scripts[0])
    stop_tokens = tok.encode("<|stop|>", add_special_tokens=False)
    assert len(stop_tokens) > 1  # the stop string arrives over several tokens
    pieces, results = _drain(gen.stream(prompts, max_new_tokens=40, temperature=0, stop=["<|stop|>"]), 3)
    assert not any("\ufffd" in p for ps in pieces.values() for p in ps)
    assert not any("<" in p for p in pieces[1])  # no beginning of the stop string ever escaped
    assert [r.text for r in results] == [utf8, "Answer: 42", false_alarm]
    assert ["".join(pieces[i]) for i in range(3)] == [r.text for r in results]
    assert [r.finish_reason for r in results] == ["stop"] * 3
    assert results[0].token_ids == scripts[0] and len(results[1].token_ids) < len(scripts[1])


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_prefix_cache_next_turn_equals_a_fresh_run(tmp_path):
    """A one-prompt call reuses the K/V of the previous call's tokens it starts with (a chat's next turn), and
    generates what a fresh Generator generates; sliding window model, so reused slots must still age out."""
    make_hf_checkpoint(tmp_path, dict(sliding_window=15, num_key_value_heads=2))
    model = load_model(tmp_path, dtype=torch.float32)
    # token-granular reuse (batch-invariant reuse is by whole prefill chunks: tests/engine/serve/test_engine.py)
    warm = Generator(model, StubTokenizer(), prefix_cache=True, batch_invariant=False)
    cold = Generator(model, StubTokenizer())
    kw = dict(max_new_tokens=10, temperature=0)
    first = random_prompt(20, 4)
    [r1] = warm.generate([first], **kw)
    assert warm.reused_tokens == 0
    turn2 = first + r1.token_ids + random_prompt(7, 5)          # the conversation so far, then a new turn
    [r2] = warm.generate([turn2], **kw)
    assert warm.reused_tokens == r2.cached_tokens == len(first) + len(r1.token_ids) - 1  # all fed tokens
    assert r2.token_ids == cold.generate([turn2], **kw)[0].token_ids
    other = first[:12] + random_prompt(9, 6)                   # shares only a part: reuse stops at the first difference
    [r3] = warm.generate([other], **kw)
    assert warm.reused_tokens == _common(turn2 + r2.token_ids[:-1], other)
    assert r3.token_ids == cold.generate([other], **kw)[0].token_ids
    [r4] = warm.generate([other], **kw)                  # the same prompt again: all but its last token
    assert warm.reused_tokens == len(other) - 1 and r4.token_ids == r3.token_ids
    warm.generate([first, other], **kw)                  # a batch neither reuses nor leaves tokens to reuse
    assert warm.reused_tokens == 0
    warm.generate([first], **kw)
    assert warm.reused_tokens == 0 and cold.reused_tokens == 0


def test_stream_keeps_the_callers_grad_mode_and_one_call_at_a_time(tiny):
    """Inference mode is on only while the loop runs: between pieces, after a stream left unfinished, and when
    a stream is resumed from another thread, the caller's grad mode is its own. A second call while one runs is
    a RuntimeError, and the stream releases the Generator when closed."""
    s = tiny.stream(random_prompt(9, 1), max_new_tokens=20, temperature=0)
    next(s)
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    with pytest.raises(RuntimeError, match="already running"):
        tiny.generate(random_prompt(5, 2), max_new_tokens=2, temperature=0)
    pieces = []
    t = threading.Thread(target=lambda: pieces.append(next(s)))     # resumed from another thread
    t.start(); t.join()
    assert pieces and not torch.is_inference_mode_enabled()
    s.close()
    w = torch.ones(2, requires_grad=True)
    (w * 2).sum().backward()                                         # autograd still works here
    assert w.grad is not None and tiny.generate(random_prompt(5, 2), max_new_tokens=2, temperature=0)


def test_a_second_call_during_admission_is_refused(tiny):
    """The one-call guard is taken before admission (tokenizing, chat templates), so a second thread cannot slip
    in while the first is still admitting and share the KV cache."""
    entered, release = threading.Event(), threading.Event()

    class SlowTokenizer(StubTokenizer):
        def encode(self, text):
            entered.set()
            release.wait(10)
            return [5, 6, 7]

    gen = Generator(tiny.model, SlowTokenizer())
    first = threading.Thread(target=lambda: gen.generate("slow", max_new_tokens=2, temperature=0))
    first.start()
    assert entered.wait(10)
    try:
        with pytest.raises(RuntimeError, match="already running"):
            gen.generate(random_prompt(4, 1), max_new_tokens=2, temperature=0)
    finally:
        release.set()
        first.join()
    assert gen.generate(random_prompt(4, 1), max_new_tokens=2, temperature=0)


def test_prefix_cache_is_never_used_by_a_batch_call_split_by_regime(tmp_path):
    """A batch whose prompts choose different LongRoPE regimes runs as one-prompt sub-batches; it still neither
    reuses cached tokens nor reports any."""
    make_hf_checkpoint(tmp_path, longrope(8, orig=64))
    gen = Generator(load_model(tmp_path, dtype=torch.float32), StubTokenizer(), prefix_cache=True)
    short, long = random_prompt(10, 1), random_prompt(50, 2)
    gen.generate([short], max_new_tokens=4, temperature=0)           # the cache now holds `short`
    rs = gen.generate([short + [9], long], max_new_tokens=24, temperature=0)
    assert [r.rope_long for r in rs] == [False, True]
    assert [r.cached_tokens for r in rs] == [0, 0] and gen.reused_tokens == 0
