"""Many adapters in one batch (engine/serve/multi_lora.py): each row of a mixed batch equals that row run alone through
the single-adapter path (engine/formats/peft.py's load_adapter -> LoRALinear), on dense and NF4 bases, for a padded
prefill, a packed (segmented) prefill and torch decode steps; PEFT as the outside reference for one adapter; the
registry's rules (slots, base mismatch, ranks, unload)."""
from __future__ import annotations

import json

import pytest
import torch

from phiforge.engine.formats.loader import load_model
from phiforge.engine.formats.peft import AdapterError, save_adapter
from phiforge.engine.formats.peft import trained_base
from phiforge.engine.model.lora import apply_lora
from phiforge.engine.model.phi3 import KVCache
from phiforge.engine.serve.decode import DecodeStep
from phiforge.engine.serve.multi_lora import AdapterSet, MultiLoRALinear
from tiny_phi3 import hf_phi3, randomize_lora_B, save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

# name: (rank, alpha, targets, rslora, method)
ADAPTERS = {
    "a": (4, 8, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), False, "lora"),
    "b": (8, 16, ("qkv_proj", "o_proj"), True, "lora"),
    "c": (2, 4, ("gate_up_proj", "down_proj"), False, "lora"),
    "q": (4, 8, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), False, "qlora"),
    "q2": (6, 6, ("gate_up_proj",), False, "qlora"),
}
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    path = save_tiny(root / "model")[0]
    dirs = {}
    for i, (name, (r, alpha, targets, rslora, method)) in enumerate(ADAPTERS.items()):
        model = load_model(path, quant="nf4" if method == "qlora" else None)
        torch.manual_seed(10 + i)
        apply_lora(model, r=r, alpha=alpha, dropout=0.0, targets=targets, use_rslora=rslora)
        randomize_lora_B(model, seed=20 + i, std=0.2)
        dirs[name] = save_adapter(model, root / name)
        (dirs[name] / "training_args.json").write_text(json.dumps({"method": method}))
    return path, dirs


def _alone(tiny, name, quant=None):
    """The single-adapter path: load_model(adapter=...) wraps the projections in LoRALinear."""
    path, dirs = tiny
    return load_model(path, quant=quant, adapter=None if name is None else dirs[name])


def _multi(tiny, names, quant=None, **kw):
    path, dirs = tiny
    model = load_model(path, quant=quant)
    adapters = AdapterSet(model, **kw)
    for n in names:
        adapters.load(n, dirs[n])
    return model, adapters


IDS = torch.randint(0, 128, (5, 9), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("quant,names,rows", [
    (None, ["a", "b", "c"], ["a", None, "b", "c", "a"]),
    ("nf4", ["q", "q2"], ["q2", "q", None, "q", "q2"]),
])
def test_prefill_rows_equal_each_adapter_alone(tiny, quant, names, rows, kernel_path):
    model, adapters = _multi(tiny, names, quant=quant, max_adapters=4)
    slots = torch.tensor([adapters.slot(n) for n in rows])
    with torch.no_grad(), adapters.rows(slots):
        got = model(IDS)  # (B, T, V)
    with torch.no_grad():
        base = _alone(tiny, None, quant)(IDS)
    for b, n in enumerate(rows):
        with torch.no_grad():
            want = _alone(tiny, n, quant)(IDS[b:b + 1])[0]
        torch.testing.assert_close(got[b], want, **TOL)
        if n is not None:  # the adapter really changes the output, so equality above means something
            assert (want - base[b]).abs().max() > 1e-2


def test_decode_steps_equal_each_adapter_alone(tiny, kernel_path):
    rows = ["b", None, "a", "c"]
    model, adapters = _multi(tiny, ["a", "b", "c"])
    slots = torch.tensor([adapters.slot(n) for n in rows])
    B, steps = len(rows), 4
    cfg = model.config

    def run(m, ids, adapters=None, slots=None):
        cache = KVCache(cfg, ids.shape[0], ids.shape[1] + steps, torch.float32)
        step = DecodeStep(m, cache, native=adapters is None)  # the native step computes base weights only
        ctx = adapters.rows(slots) if adapters is not None else torch.no_grad()
        out = []
        with torch.no_grad(), ctx:
            logits = m(ids, cache=cache)[:, -1]  # (B, V)
            for _ in range(steps):
                out.append(logits)
                tok = logits.argmax(-1)
                pos = torch.full((ids.shape[0],), cache.length)
                logits = step(tok, pos)
        return torch.stack(out, 1)  # (B, steps, V)

    # the native step reads through the multi-LoRA layers to the base weights (the engine's adapter-free steps)
    assert DecodeStep(model, KVCache(cfg, 1, 4, torch.float32)).native is not None
    got = run(model, IDS[:B], adapters, slots)
    for b, n in enumerate(rows):
        torch.testing.assert_close(got[b], run(_alone(tiny, n), IDS[b:b + 1])[0], **TOL)


def test_packed_segments_equal_each_adapter_alone(tiny, kernel_path):
    """A packed prefill: segments back to back in one row, positions restarting, segment_ids isolating them."""
    model, adapters = _multi(tiny, ["a", "b", "c"])
    lens, names = [4, 7, 3, 6], ["c", "a", None, "b"]
    ids = torch.randint(0, 128, (1, sum(lens)), generator=torch.Generator().manual_seed(4))
    seg_ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))[None]  # (1, T)
    pos = torch.cat([torch.arange(n) for n in lens])[None]  # (1, T)
    with torch.no_grad(), adapters.rows(torch.tensor([adapters.slot(n) for n in names]), torch.tensor(lens)):
        got = model(ids, position_ids=pos, segment_ids=seg_ids)[0]  # (T, V)
    start = 0
    for n, L in zip(names, lens):
        with torch.no_grad():
            want = _alone(tiny, n)(ids[:, start:start + L])[0]
        torch.testing.assert_close(got[start:start + L], want, **TOL)
        start += L


def test_peft_is_the_outside_reference(tmp_path):
    """An adapter PEFT wrote (fused Phi-3 names), served in a mixed batch, equals PEFT's own forward."""
    peft = pytest.importorskip("peft")
    path, hf = save_tiny(tmp_path / "model", seed=7)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0,
                                                 target_modules=["qkv_proj", "down_proj"]))
    randomize_lora_B(pm, std=0.2)
    pm.save_pretrained(tmp_path / "peft")
    model = load_model(path)
    adapters = AdapterSet(model, max_adapters=2)
    adapters.load("p", tmp_path / "peft")
    with torch.no_grad():
        with adapters.rows(torch.tensor([-1, 0])):
            got = model(IDS[:2])
        want = pm(input_ids=IDS[1:2]).logits[0]
        with pm.disable_adapter():
            base = pm(input_ids=IDS[:1]).logits[0]
    torch.testing.assert_close(got[1], want, **TOL)
    torch.testing.assert_close(got[0], base, **TOL)


def test_no_adapter_rows_are_the_base_model_exactly(tiny):
    model, adapters = _multi(tiny, ["a"])
    with torch.no_grad():
        base = _alone(tiny, None)(IDS)
        with adapters.rows(torch.full((IDS.shape[0],), -1)):
            assert torch.equal(model(IDS), base)
        assert torch.equal(model(IDS), base)  # outside rows(): the base model too


def test_registry_slots_unload_and_limits(tiny):
    path, dirs = tiny
    model, adapters = _multi(tiny, ["a", "b"], max_adapters=2, max_rank=8)
    assert adapters.names() == ["a", "b"] and adapters.slot("a") == 0 and adapters.slot("b") == 1
    assert adapters.slot(None) == -1 and "a" in adapters
    assert all(isinstance(m, MultiLoRALinear) for m in adapters.layers.values())
    with pytest.raises(AdapterError, match="all 2 adapter slots are in use"):
        adapters.load("c", dirs["c"])
    with pytest.raises(AdapterError, match="loaded already"):
        adapters.load("a", dirs["c"])
    adapters.unload("a")
    with pytest.raises(AdapterError, match="'a' is not loaded"):
        adapters.slot("a")
    assert adapters.load("c", dirs["c"]) == 0  # the freed slot
    with torch.no_grad(), adapters.rows(torch.tensor([0, 1])):
        got = model(IDS[:2])
    for b, n in enumerate(["c", "b"]):  # slot 0 now holds c alone: nothing of a is left in it
        with torch.no_grad():
            torch.testing.assert_close(got[b], _alone(tiny, n)(IDS[b:b + 1])[0], **TOL)
    small = AdapterSet(load_model(path), max_adapters=2, max_rank=4)
    with pytest.raises(AdapterError, match="rank 8 is over the maximum rank 4"):
        small.load("b", dirs["b"])
    with pytest.raises(AdapterError, match="not a directory"):
        small.load("x", path / "nope")
    with pytest.raises(AdapterError, match="adapter_config.json"):
        small.load("x", path)  # a model directory, not an adapter
    with pytest.raises(ValueError, match="slots must be -1..1"):
        with small.rows(torch.tensor([2])):
            pass


def test_base_mismatch_is_refused_unless_allowed(tiny):
    path, dirs = tiny
    assert trained_base(dirs["q"]) == "nf4" and trained_base(dirs["a"]) == "dense"
    dense = AdapterSet(load_model(path))
    with pytest.raises(AdapterError, match="method qlora: the adapter was trained on the NF4 base"):
        dense.load("q", dirs["q"])
    nf4 = AdapterSet(load_model(path, quant="nf4"))
    with pytest.raises(AdapterError, match="method lora: the adapter was trained on the dense base"):
        nf4.load("a", dirs["a"])
    assert nf4.load("a", dirs["a"], allow_base_mismatch=True) == 0


def test_wrapping_a_model_that_already_has_an_adapter_is_refused(tiny):
    with pytest.raises(ValueError, match="already carries an adapter"):
        AdapterSet(_alone(tiny, "a"))
