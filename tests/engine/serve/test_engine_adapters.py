"""Many LoRA adapters through the serving engine: requests for different adapters (and for none) share steps, and
each equals the same request run alone on a model loaded with only its adapter (engine/model/lora.py's LoRALinear, the
single-adapter path), on a dense and an NF4 base; run-time load/unload; unknown and busy adapters; prefix reuse
never crosses adapters."""
from __future__ import annotations

import json
import threading

import pytest
import torch
from tiny_phi3 import randomize_lora_B, save_tiny

from phiforge.engine.formats.loader import load_model
from phiforge.engine.formats.peft import AdapterError, save_adapter
from phiforge.engine.model.lora import apply_lora
from phiforge.engine.model.quant import NF4Linear
from phiforge.engine.serve.decode import DecodeStep
from phiforge.engine.serve.engine import Engine
from phiforge.engine.serve.multi_lora import MultiLoRALinear
from phiforge.engine.serve.request import AdapterBusy, EngineError, Request, UnknownAdapter

pytestmark = pytest.mark.usefixtures("one_thread")

# name: (rank, alpha, targets, method)
ADAPTERS = {
    "a": (4, 8, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), "lora"),
    "b": (8, 16, ("qkv_proj", "o_proj"), "lora"),
    "c": (2, 4, ("gate_up_proj", "down_proj"), "lora"),
    "q": (4, 8, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), "qlora"),
    "q2": (6, 6, ("gate_up_proj", "down_proj"), "qlora"),
}


class StubTokenizer:
    stop_ids: set[int] = set()  # no stop token: every request runs its max_tokens, so lengths are known

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def _tiny(root, names, **overrides):
    path = save_tiny(root / "model", **overrides)[0]
    dirs = {}
    for i, (name, (r, alpha, targets, method)) in enumerate(ADAPTERS.items()):
        if name not in names:
            continue
        model = load_model(path, dtype=torch.float32, quant="nf4" if method == "qlora" else None)
        torch.manual_seed(30 + i)
        apply_lora(model, r=r, alpha=alpha, dropout=0.0, targets=targets)
        randomize_lora_B(model, seed=40 + i, std=0.3)
        dirs[name] = str(save_adapter(model, root / name))
        (root / name / "training_args.json").write_text(json.dumps({"method": method}))
    return path, dirs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("engine_adapters"), ADAPTERS)


@pytest.fixture(scope="module")
def tiny_nf4(tmp_path_factory):
    """Every projection's input a whole number of NF4 blocks (intermediate 128), so the native step takes it."""
    return _tiny(tmp_path_factory.mktemp("engine_adapters_nf4"), ("q", "q2"), intermediate_size=128)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _alone(tiny, adapter, reqs, quant=None):
    """Each request alone (one KV row, nothing reused) on a model loaded with that adapter only."""
    path, dirs = tiny
    model = load_model(path, dtype=torch.float32, quant=quant, adapter=None if adapter is None else dirs[adapter])
    e = Engine(model, StubTokenizer(), max_batch=1, kv_tokens=128, prefix_cache=False)
    try:
        return [e.submit(Request(r.prompt_ids, r.max_tokens)).result(120).token_ids for r in reqs]
    finally:
        e.shutdown()


def _record_rows(engine):
    """Wrap the engine's AdapterSet.rows to record each step call's slots."""
    seen, rows = [], engine.adapter_set.rows

    def spy(slots, segments=None):
        seen.append(torch.as_tensor(slots).tolist())
        return rows(slots, segments)
    engine.adapter_set.rows = spy
    return seen


def _torch_step_refused(*args, **kwargs):
    raise AssertionError("the torch decode step ran")


def _mixed_run(tiny, names, quant=None, native_only=False, max_batch=8, **engine_kw):
    """The mixed requests through one engine; native_only: the torch decode step raises while it runs."""
    path, dirs = tiny
    pattern = [names[0], None, names[1], names[-1], names[0], names[1], None, names[-1], names[0], names[1]]
    reqs = [Request(_prompt(3 + 4 * i, i), 6 + (5 * i) % 11, adapter=a) for i, a in enumerate(pattern)]
    e = Engine(load_model(path, dtype=torch.float32), StubTokenizer(), max_batch=max_batch, kv_tokens=8 * 64,
               prefill_chunk=16, prefix_cache=False, adapters={n: dirs[n] for n in names}, **engine_kw)
    seen = _record_rows(e)
    handles = [None] * len(reqs)

    def go(i):
        handles[i] = e.submit(reqs[i])
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(reqs))]
    # the scheduler thread steps only once every thread has submitted: on a loaded machine the first requests could
    # otherwise finish before the last arrive, and no step would mix the adapters this test is about
    gate, step = threading.Event(), e.step
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(e, "step", lambda: (gate.wait(), step())[1])
        if native_only:
            patch.setattr(DecodeStep, "_step", _torch_step_refused)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        gate.set()
        got = [h.result(120).token_ids for h in handles]
        e.shutdown()
    want = [None] * len(reqs)
    for a in {r.adapter for r in reqs}:
        idx = [i for i, r in enumerate(reqs) if r.adapter == a]
        for i, w in zip(idx, _alone(tiny, a, [reqs[i] for i in idx], quant)):
            want[i] = w
    return e, reqs, got, want, seen


def test_mixed_adapters_in_one_batch_each_equal_alone(tiny):
    """10 concurrent greedy fp32 requests over 3 LoRA adapters and the base, 8 rows: each equals itself alone, with
    every decode step in the native step (the torch step is switched off: it raises)."""
    e, reqs, got, want, seen = _mixed_run(tiny, ["a", "b", "c"], native_only=True)
    assert got == want
    assert all(len(g) == r.max_tokens for g, r in zip(got, reqs))
    base = _alone(tiny, None, reqs)
    assert sum(g != w for g, w, r in zip(got, base, reqs) if r.adapter) >= 4  # the adapters change the tokens
    # rows of different adapters and of none shared decode calls: the batching under test really happened
    assert any(len(set(s)) >= 3 and -1 in s for s in seen if len(s) > 1)
    steps = e._decode[False].steps  # steps with adapter rows ran natively, none in torch
    assert steps["native_lora"] > 0 and steps["torch"] == 0, steps


def test_nf4_base_with_qlora_adapters(tiny):
    """QLoRA adapters given to an engine over a dense model: the base is quantized to NF4 at start (the base they
    were trained on), and mixed rows equal each adapter alone on an NF4-loaded model."""
    e, reqs, got, want, seen = _mixed_run(tiny, ["q", "q2"], quant="nf4")
    assert all(isinstance(m.base_layer, NF4Linear) for m in e.adapter_set.layers.values())
    assert got == want
    assert any(len(set(s)) >= 3 for s in seen if len(s) > 1)


def test_nf4_base_with_qlora_adapters_native(tiny_nf4):
    """The same on an NF4 base the native step takes (4 rows, its NF4 limit): every decode step native, the torch
    step switched off, each request equal to its adapter alone."""
    e, reqs, got, want, seen = _mixed_run(tiny_nf4, ["q", "q2"], quant="nf4", native_only=True, max_batch=4)
    assert got == want
    base = _alone(tiny_nf4, None, reqs, "nf4")
    assert sum(g != w for g, w, r in zip(got, base, reqs) if r.adapter) >= 4  # the adapters change the tokens
    assert any(len(set(s)) >= 3 for s in seen if len(s) > 1)
    steps = e._decode[False].steps
    assert steps["native_lora"] > 0 and steps["torch"] == 0, steps


def test_base_mismatch_and_bad_sets_are_refused(tiny):
    path, dirs = tiny
    with pytest.raises(ValueError, match="'q' .*QLoRA.* and 'a' .*LoRA.*two engines"):
        Engine(load_model(path), StubTokenizer(), adapters={"q": dirs["q"], "a": dirs["a"]}, start=False)
    with pytest.raises(ValueError, match="'a' .* is LoRA, trained on the dense base, but the model is NF4"):
        Engine(load_model(path, quant="nf4"), StubTokenizer(), adapters={"a": dirs["a"]}, start=False)
    with pytest.raises(ValueError, match="max_adapters 1: must be >= 0 and hold the 2 adapters given"):
        Engine(load_model(path), StubTokenizer(), adapters={"a": dirs["a"], "b": dirs["b"]}, max_adapters=1)
    e = Engine(load_model(path), StubTokenizer(), max_adapters=2, start=False)
    with pytest.raises(AdapterError, match="trained on the NF4 base"):  # run time: AdapterSet's own check
        e.load_adapter("q", dirs["q"])
    plain = Engine(load_model(path), StubTokenizer(), start=False)  # no adapters asked for: the model is untouched
    assert plain.adapter_set is None and not any(isinstance(m, MultiLoRALinear) for m in plain.model.modules())
    with pytest.raises(EngineError, match="no adapter slots"):
        plain.load_adapter("a", dirs["a"])


def test_load_unload_at_run_time_busy_and_unknown(tiny):
    path, dirs = tiny
    e = Engine(load_model(path, dtype=torch.float32), StubTokenizer(), max_batch=2, kv_tokens=2 * 160,
               max_adapters=2, prefill_chunk=4)   # batch-invariant reuse is by whole chunks: small ones here
    p = _prompt(12, 99)
    try:
        with pytest.raises(UnknownAdapter, match="'a' is not loaded") as err:
            e.submit(Request(p, 4, adapter="a"))
        assert err.value.field == "adapter"
        e.load_adapter("a", dirs["a"])   # through the scheduler thread, between steps
        e.load_adapter("b", dirs["b"])
        assert e.adapters() == ["a", "b"]
        with pytest.raises(AdapterError, match="all 2 adapter slots are in use"):
            e.load_adapter("c", dirs["c"])
        assert e.submit(Request(p, 5, adapter="a")).result(120).token_ids == _alone(tiny, "a", [Request(p, 5)])[0]

        long = e.submit(Request(_prompt(8, 5), 140, adapter="b"))  # busy for many steps
        with pytest.raises(AdapterBusy, match=f"'b' is in use by 1 request.*{long.id}"):
            e.unload_adapter("b")
        assert e.adapters() == ["a", "b"] and not long.done
        long.abort()
        assert long.result(120).finish_reason == "abort"
        e.unload_adapter("b")
        assert e.adapters() == ["a"]
        with pytest.raises(UnknownAdapter):
            e.unload_adapter("b")
        with pytest.raises(UnknownAdapter):
            e.submit(Request(p, 4, adapter="b"))

        # prefix reuse stays within one adapter load: "a" reloaded with c's weights must not reuse a's K/V
        again = e.submit(Request(p, 5, adapter="a")).result(120)
        assert again.usage.cached_tokens > 0  # same adapter load, same prompt: its K/V were reused
        e.unload_adapter("a")
        e.load_adapter("a", dirs["c"])
        r = e.submit(Request(p, 5, adapter="a")).result(120)
        assert r.usage.cached_tokens == 0 and r.token_ids == _alone(tiny, "c", [Request(p, 5)])[0]
        assert e.submit(Request(p, 5)).result(120).usage.cached_tokens == 0  # the base never reuses adapter K/V
    finally:
        e.shutdown()
