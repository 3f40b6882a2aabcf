"""LoRA against PEFT on a tiny Phi-3: same gradients, adapters that round-trip both ways, exact split→fused import,
and merge parity."""
from __future__ import annotations

import argparse
import dataclasses
import json
import warnings

import pytest
import torch
from safetensors import safe_open

from phiforge.cli import main as cli_main
from phiforge.commands.merge import run as merge_run
from phiforge.engine.formats.loader import load_model
from phiforge.engine.formats.peft import AdapterConfigWarning, AdapterError, load_adapter, save_adapter
from phiforge.engine.model.lora import LoRALinear, apply_lora, lora_modules, merge_adapter
from phiforge.engine.model.phi3 import LINEAR_NAMES
from phiforge.engine.train.loss import IGNORE, lm_loss_sum, lm_loss_sum_ref
from tiny_phi3 import hf_llama_from_phi3, hf_phi3, randomize_lora_B, save_tiny


pytestmark = pytest.mark.usefixtures("one_thread")


peft = pytest.importorskip("peft")
# the fields whose values change what a loaded adapter computes
MATH_FIELDS = ("peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
               "bias", "fan_in_fan_out", "use_dora", "lora_bias", "modules_to_save")
IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))


def shifted(ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), IGNORE)], dim=1)


def peft_model(base, r=4, alpha=8, targets=LINEAR_NAMES, **kw):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), **kw)
    pm = peft.get_peft_model(base, cfg)
    randomize_lora_B(pm)
    return pm


def copy_from_peft(ours, pm) -> None:
    with torch.no_grad():
        for name, m in lora_modules(ours):
            src = pm.base_model.model.get_submodule(name)
            m.lora_A.weight.copy_(src.lora_A["default"].weight)
            m.lora_B.weight.copy_(src.lora_B["default"].weight)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")[0]


@pytest.mark.parametrize("fused,rslora,ckpt", [(True, False, True), (False, False, False), (True, True, False)])
def test_gradients_equal_peft(tiny, fused, rslora, ckpt, monkeypatch):
    monkeypatch.setattr(LoRALinear, "use_fused", fused)
    pm = peft_model(hf_phi3(), use_rslora=rslora)
    pm.train()
    ref = pm(input_ids=IDS, labels=IDS).loss
    ref.backward()

    ours = load_model(tiny, dtype=torch.float32)
    names = apply_lora(ours, r=4, alpha=8, dropout=0.0, use_rslora=rslora)
    assert len(names) == 4 * 2
    copy_from_peft(ours, pm)
    ours.train()
    ours.gradient_checkpointing = ckpt
    targets = shifted(IDS)
    loss = lm_loss_sum(ours, IDS, targets) / (targets != IGNORE).sum()
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for name, m in lora_modules(ours):
        src = pm.base_model.model.get_submodule(name)
        for ab in ("lora_A", "lora_B"):
            g_ref = getattr(src, ab)["default"].weight.grad
            torch.testing.assert_close(getattr(m, ab).weight.grad, g_ref, rtol=1e-4, atol=1e-7, msg=f"{name}.{ab}")


def test_chunked_loss_equals_full_logits(tiny):
    ours = load_model(tiny, dtype=torch.float32)
    apply_lora(ours, r=4, alpha=8, dropout=0.0)
    randomize_lora_B(ours)
    targets = shifted(IDS)
    targets[0, :4] = IGNORE
    grads = []
    for fn in (lambda: lm_loss_sum(ours, IDS, targets, chunk=3), lambda: lm_loss_sum_ref(ours, IDS, targets)):
        ours.zero_grad()
        loss = fn()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in ours.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_targets_that_match_nothing_are_an_error(tiny):
    model = load_model(tiny, dtype=torch.float32)
    with pytest.raises(ValueError, match="qkv_proj"):
        apply_lora(model, targets=("q_proj", "v_proj"))
    with pytest.raises(ValueError, match="match no module"):
        apply_lora(model, targets=())
    names = apply_lora(model, targets=("o_proj",))
    assert all(n.endswith("o_proj") for n in names) and len(names) == 2


def test_init_is_peft_like(tiny):
    model = load_model(tiny, dtype=torch.float32)
    apply_lora(model, r=8, alpha=16)
    m = next(m for _, m in lora_modules(model))
    assert torch.count_nonzero(m.lora_B.weight) == 0
    bound = 1 / m.in_features ** 0.5  # kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
    assert m.lora_A.weight.abs().max() <= bound and m.lora_A.weight.std() > bound / 3
    assert m.scaling == 2.0


def _lora_model(tiny, dropout: float):
    """The tiny model with r=4, alpha=8 LoRA on every target, B randomized (so the adapter matters), in eval mode,
    and its logits."""
    ours = load_model(tiny, dtype=torch.float32)
    apply_lora(ours, r=4, alpha=8, dropout=dropout)
    randomize_lora_B(ours)
    ours.eval()
    return ours, ours(IDS)


def test_saved_adapter_loads_in_peft_and_transformers(tiny, tmp_path):
    ours, want = _lora_model(tiny, dropout=0.05)
    save_adapter(ours, tmp_path / "ad", base_model_name_or_path=str(tiny))

    # the files and keys PEFT writes for the same LoraConfig
    pm = peft.get_peft_model(hf_phi3(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05,
                                                         target_modules=list(LINEAR_NAMES), task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path / "peft")
    mine = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    # every key we write is a LoraConfig field, with the value PEFT writes for the same adapter; a field PEFT adds
    # in a later release is one we leave to its default
    assert set(mine) <= {f.name for f in dataclasses.fields(peft.LoraConfig)}, set(mine) - set(theirs)
    assert set(MATH_FIELDS) <= set(mine)
    for k in mine:
        if k not in ("target_modules", "base_model_name_or_path"):
            assert mine[k] == theirs[k], k
    assert sorted(mine["target_modules"]) == sorted(theirs["target_modules"])
    # and PEFT, filling in the fields we leave out, reads the same config as its own
    read = [{k: v for k, v in peft.LoraConfig.from_pretrained(tmp_path / d).to_dict().items()
             if k not in ("base_model_name_or_path", "peft_version")} for d in ("ad", "peft")]
    assert read[0] == read[1]
    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys()) and a.metadata() == b.metadata()

    loaded = peft.PeftModel.from_pretrained(hf_phi3(), tmp_path / "ad").eval()
    torch.testing.assert_close(loaded(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)
    hf = hf_phi3()
    hf.load_adapter(str(tmp_path / "ad"))
    torch.testing.assert_close(hf(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_loads_peft_saved_adapter(tiny, tmp_path):
    pm = peft_model(hf_phi3(), r=4, alpha=16, rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 4})
    pm.eval()
    want = pm(input_ids=IDS).logits
    pm.save_pretrained(tmp_path / "peft")
    ours = load_model(tiny, dtype=torch.float32, adapter=tmp_path / "peft")
    assert len(list(lora_modules(ours))) == 8
    assert not any(p.requires_grad for p in ours.parameters())
    torch.testing.assert_close(ours(IDS), want, rtol=1e-5, atol=1e-5)
    # and it saves back to an equivalent adapter (rank/alpha patterns preserved)
    save_adapter(ours, tmp_path / "again")
    back = peft.PeftModel.from_pretrained(hf_phi3(), tmp_path / "again").eval()
    torch.testing.assert_close(back(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets,kw", [
    (("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), {}),
    (("q_proj", "v_proj", "up_proj"), {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 3}}),
    (("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), {"use_rslora": True}),
])
def test_split_adapter_fuses_exactly(tiny, tmp_path, targets, kw):
    llama = hf_llama_from_phi3(hf_phi3())
    torch.testing.assert_close(llama(input_ids=IDS).logits, hf_phi3()(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    pm = peft_model(llama, r=4, alpha=8, targets=targets, **kw).eval()
    want = pm(input_ids=IDS).logits
    pm.save_pretrained(tmp_path / "split")
    ours = load_model(tiny, dtype=torch.float32)
    names = load_adapter(ours, tmp_path / "split")
    assert any(n.endswith("qkv_proj") for n in names)
    torch.testing.assert_close(ours(IDS), want, rtol=1e-5, atol=1e-5)
    if not kw:  # plain LoRA: r' = 3r, alpha' = 3 alpha on qkv; 2r, 2 alpha on gate_up
        qkv = ours.get_submodule("model.layers.0.self_attn.qkv_proj")
        assert (qkv.r, qkv.lora_alpha, qkv.scaling) == (12, 24.0, 2.0)
    # re-saved fused, it loads in PEFT on the Phi-3 model with the same logits
    save_adapter(ours, tmp_path / "fused")
    back = peft.PeftModel.from_pretrained(hf_phi3(), tmp_path / "fused").eval()
    torch.testing.assert_close(back(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_bad_adapters_are_clear_errors(tiny, tmp_path):
    model = load_model(tiny, dtype=torch.float32)
    with pytest.raises(AdapterError, match="adapter_config.json"):
        load_adapter(model, tmp_path)
    pm = peft_model(hf_phi3())
    pm.save_pretrained(tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora"):
        load_adapter(model, tmp_path / "a")
    cfg_path.write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(AdapterError, match="rank 4 in the file but 8"):
        load_adapter(model, tmp_path / "a")


def test_newer_peft_fields_load_and_set_ones_are_named(tiny, tmp_path):
    """A config from a newer PEFT: fields it adds load when unset (their defaults are plain LoRA); a set one whose
    meaning phiforge does not know is named in a warning; a set one known to change the math is refused."""
    pm = peft_model(hf_phi3()).eval()
    want = pm(input_ids=IDS).logits
    pm.save_pretrained(tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "astra_config": None, "some_future_config": {}, "some_future_flag": False}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # unset new fields: no warning at all
        ours = load_model(tiny, dtype=torch.float32, adapter=tmp_path / "a")
    torch.testing.assert_close(ours(IDS), want, rtol=1e-5, atol=1e-5)
    cfg_path.write_text(json.dumps({**cfg, "astra_config": {"mode": "knowledge"}, "some_future_flag": True}))
    with pytest.warns(AdapterConfigWarning, match="astra_config, some_future_flag"):
        load_adapter(load_model(tiny, dtype=torch.float32), tmp_path / "a")
    for field, value in (("use_qalora", True), ("layer_replication", [[0, 1]]), ("modules_to_save", ["lm_head"])):
        cfg_path.write_text(json.dumps({**cfg, field: value}))
        with pytest.raises(AdapterError, match=f"field {field} = "):
            load_adapter(load_model(tiny, dtype=torch.float32), tmp_path / "a")


def test_merge_parity_and_cli(tiny, tmp_path):
    ours, want = _lora_model(tiny, dropout=0.0)
    save_adapter(ours, tmp_path / "ad")
    merge_adapter(ours)
    assert not list(lora_modules(ours))
    torch.testing.assert_close(ours(IDS), want, rtol=1e-5, atol=1e-5)

    assert cli_main(["merge", "--model", str(tiny), "--adapter", str(tmp_path / "ad"), "--out",
                     str(tmp_path / "merged32"), "--dtype", "float32"]) == 0
    args = argparse.Namespace(model=str(tiny), adapter=str(tmp_path / "ad"), out=str(tmp_path / "merged32"),
                              dtype="float32", quant=None)
    torch.testing.assert_close(load_model(tmp_path / "merged32")(IDS), want, rtol=1e-5, atol=1e-5)
    # PEFT's own merge agrees with ours
    pm = peft.PeftModel.from_pretrained(hf_phi3(), tmp_path / "ad").merge_and_unload()
    torch.testing.assert_close(pm(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)
    args.out, args.dtype = str(tmp_path / "merged16"), "bfloat16"
    merge_run(args)
    bf16 = load_model(tmp_path / "merged16")
    assert bf16.dtype == torch.bfloat16
    assert (bf16(IDS).float() - want).abs().max() < 0.1


def test_qlora_merge_onto_dequantized_base(tiny, tmp_path):
    q = load_model(tiny, dtype=torch.float32, quant="nf4")
    apply_lora(q, r=4, alpha=8, dropout=0.0)
    randomize_lora_B(q)
    q.eval()
    want = q(IDS)
    save_adapter(q, tmp_path / "ad")
    (tmp_path / "ad" / "training_args.json").write_text(json.dumps({"method": "qlora"}))
    merge_run(argparse.Namespace(model=str(tiny), adapter=str(tmp_path / "ad"), out=str(tmp_path / "m"),
                                 dtype="float32", quant=None))
    torch.testing.assert_close(load_model(tmp_path / "m")(IDS), want, rtol=1e-4, atol=1e-4)


def test_qlora_gradients_equal_lora_on_the_dequantized_base(tiny):
    """QLoRA through the fused NF4 path = LoRA on a dense copy of the dequantized weights (torchtune's parity test)."""
    q = load_model(tiny, dtype=torch.float32, quant="nf4")
    dense = load_model(tiny, dtype=torch.float32)
    with torch.no_grad():
        for name, m in q.linears():
            dense.get_submodule(name).weight.copy_(m.dequantize(torch.float32))
    grads = []
    for model in (q, dense):
        torch.manual_seed(0)
        apply_lora(model, r=4, alpha=8, dropout=0.0)
        randomize_lora_B(model)
        model.train()
        model.gradient_checkpointing = True
        targets = shifted(IDS)
        (lm_loss_sum(model, IDS, targets) / (targets != IGNORE).sum()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)
