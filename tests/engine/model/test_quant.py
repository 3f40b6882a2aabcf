"""NF4 in the model (engine/model/quant.py) against transformers + bitsandbytes: their checkpoints load into phiforge
with their logits, `phiforge quantize` writes checkpoints they load with ours, split layouts fuse exactly, and Phi-3-mini
fits the memory budget.

The reference model runs bnb's portable 4-bit path (dequantize_4bit, then a matmul). On CPUs with AVX512-BF16, bnb
otherwise repacks the weights for a CPU-only kernel that rounds absmax to bf16 first; that is not the format's math
and not what bnb computes on a GPU, so we switch it off on the reference (`support_avx512bf16_for_cpu = False`).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

transformers = pytest.importorskip("transformers")
bnb_F = pytest.importorskip("bitsandbytes.functional")

from phiforge.cli import main as cli_main  # noqa: E402
from phiforge.engine import Phi3Config, Phi3ForCausalLM, load_model  # noqa: E402
from phiforge.engine.formats.bnb import _fuse, load_nf4_state, save_nf4_checkpoint  # noqa: E402
from phiforge.engine.model.quant import NF4Linear, quantize_model_  # noqa: E402
from phiforge.kernels.nf4 import dequantize_nf4_ref, quantize_nf4  # noqa: E402

# hidden 64, intermediate 128: every K is a multiple of the blocksize, which bnb's CPU kernels need
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128, original_max_position_embeddings=128,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
BNB = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
           bnb_4bit_compute_dtype=torch.bfloat16)
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny random bf16 Phi-3, and the same model quantized and saved by transformers + bitsandbytes."""
    root = tmp_path_factory.mktemp("quant")
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**TINY)).to(torch.bfloat16)
    model.save_pretrained(root / "dense")
    q = _hf_nf4(root / "dense", quantization_config=transformers.BitsAndBytesConfig(**BNB))
    q.save_pretrained(root / "bnb")
    return {"dense": root / "dense", "bnb": root / "bnb", "root": root}


def _hf_nf4(path, **kw):
    m = transformers.Phi3ForCausalLM.from_pretrained(path, device_map="cpu", **kw)
    for mod in m.modules():
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False  # bnb's portable path; see the module docstring
    return m.eval()


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    out = model(IDS)
    return (out.logits if hasattr(out, "logits") else out).float()


@torch.no_grad()
def _fp32_reference(dense_dir: Path, nf4_model: nn.Module) -> torch.Tensor:
    """transformers in fp32 with the NF4 weights dequantized: the exact value bf16 runs approximate."""
    ref = transformers.Phi3ForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    sd = ref.state_dict()
    for name, m in nf4_model.named_modules():
        if isinstance(m, NF4Linear):
            sd[name + ".weight"] = m.dequantize(torch.float32)
    ref.load_state_dict(sd)
    return ref(IDS).logits


def _assert_same_logits(ours, theirs, exact32):
    """Ours must be no further from the fp32 result than transformers' own bf16 run is. (Not bit-equal: the native
    prefill attention keeps the probabilities in fp32 where SDPA rounds them to bf16.)"""
    noise = (theirs - exact32).abs().max().item()
    assert noise > 0  # the bf16 run really rounds, so the bound below means something
    assert (ours - exact32).abs().max().item() <= 1.25 * noise


def test_bnb_checkpoint_loads_with_its_logits(dirs):
    ours = load_model(dirs["bnb"])
    names = [n for n, m in ours.named_modules() if isinstance(m, NF4Linear)]
    assert len(names) == 4 * TINY["num_hidden_layers"]
    theirs = _hf_nf4(dirs["bnb"])
    # the weights are bnb's, bit for bit
    for n in names:
        lin = theirs.get_submodule(n)
        w = bnb_F.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
        assert torch.equal(ours.get_submodule(n).dequantize(), w), n
    _assert_same_logits(_logits(ours), _logits(theirs), _fp32_reference(dirs["dense"], ours))
    # fp32 compute over the same weights is the reference itself
    ours32 = load_model(dirs["bnb"], dtype=torch.float32)
    assert torch.allclose(_logits(ours32), _fp32_reference(dirs["dense"], ours32), rtol=0, atol=1e-5)


def test_quantize_cli_output_loads_in_transformers(dirs):
    out = dirs["root"] / "ours"
    assert cli_main(["quantize", "--model", str(dirs["dense"]), "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["bnb_4bit_quant_type"] == "nf4"
    assert cfg["bnb_4bit_use_double_quant"] is True and cfg["bnb_4bit_compute_dtype"] == "bfloat16"
    # same key set and dtypes as transformers' own save of the same model
    with safe_open(str(out / "model.safetensors"), "pt") as a, \
            safe_open(str(dirs["bnb"] / "model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            ta, tb = a.get_tensor(k), b.get_tensor(k)
            assert ta.dtype == tb.dtype and ta.shape == tb.shape, k
            if k.endswith(".weight") and ta.dtype == torch.uint8:
                assert torch.equal(ta, tb), k  # the packed nibbles are bnb's
    ours = load_model(dirs["dense"], quant="nf4")
    theirs = _hf_nf4(out)
    _assert_same_logits(_logits(ours), _logits(theirs), _fp32_reference(dirs["dense"], ours))
    assert not list(out.parent.glob(".ours.*"))  # the atomic write left no temp dir behind


def test_quantize_model_in_place_and_state_dict_round_trip(dirs, tmp_path):
    model = load_model(dirs["dense"])
    quantize_model_(model, blocksize=128, double_quant=False)
    lin = model.model.layers[1].mlp.down_proj
    assert isinstance(lin, NF4Linear) and lin.nested_absmax is None and lin.blocksize == 128
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    sd = model.state_dict()
    key = "model.layers.1.mlp.down_proj.weight"
    assert sd[key].shape == (64 * 128 // 2, 1) and sd[key + ".absmax"].dtype == torch.float32
    save_nf4_checkpoint(model, tmp_path / "nf4")
    again = load_model(tmp_path / "nf4")
    assert torch.equal(_logits(again), _logits(model))
    assert torch.equal(again.get_submodule("model.layers.1.mlp.down_proj").packed, lin.packed)
    # .to(dtype) changes the compute dtype only, never the stored codes and scales
    code = lin.code.clone()
    model.to(torch.float32)
    assert lin.dtype == torch.float32 and lin.code.dtype == torch.float32 and torch.equal(lin.code, code)


def _write_split_checkpoint(dense_dir: Path, out: Path, blocksize: int) -> dict[str, torch.Tensor]:
    """The split q/k/v, gate/up layout, each part quantized by bitsandbytes and serialized by its QuantState."""
    dense = load_file(str(dense_dir / "model.safetensors"))
    C, I = TINY["hidden_size"], TINY["intermediate_size"]
    tensors, parts_deq = {}, {}
    for key, w in dense.items():
        module = key[: -len(".weight")]
        if key.endswith("qkv_proj.weight"):
            split = dict(zip(("q_proj", "k_proj", "v_proj"), w.split(C)))
        elif key.endswith("gate_up_proj.weight"):
            split = dict(zip(("gate_proj", "up_proj"), w.split(I)))
        elif key.endswith(("o_proj.weight", "down_proj.weight")):
            split = {module.rsplit(".", 1)[1]: w}
        else:
            tensors[key] = w
            continue
        parent = module.rsplit(".", 1)[0]
        for name, part in split.items():
            packed, state = bnb_F.quantize_4bit(part.contiguous(), blocksize=blocksize, compress_statistics=True,
                                                quant_type="nf4")
            tensors[f"{parent}.{name}.weight"] = packed
            for k, v in state.as_dict(packed=True).items():
                tensors[f"{parent}.{name}.weight.{k}"] = v
            parts_deq.setdefault(module, []).append(bnb_F.dequantize_4bit(packed, state))
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dense_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                  "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                                  "bnb_4bit_compute_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(cfg))
    return {k: torch.cat(v) for k, v in parts_deq.items()}


def test_split_layout_fused_exactly(dirs, tmp_path):
    expected = _write_split_checkpoint(dirs["dense"], tmp_path / "split", blocksize=64)
    model = load_model(tmp_path / "split")
    for module, w in expected.items():
        lin = model.get_submodule(module)
        assert isinstance(lin, NF4Linear), module
        assert torch.equal(lin.dequantize(), w), module  # bnb's own dequantization of each part, stacked
    # fused parts keep their exact fp32 scales: same logits as the fused checkpoint's math
    ref = load_model(dirs["dense"])
    for module, w in expected.items():
        ref.get_submodule(module).weight.data.copy_(w)
    diff = (_logits(model) - _logits(ref)).abs().max().item()
    assert diff <= 0.5 * (_logits(ref) - _fp32_reference(dirs["dense"], model)).abs().max().item()


def test_fuse_falls_back_when_blocks_straddle_parts():
    g = torch.Generator().manual_seed(0)
    parts = [quantize_nf4(torch.randn(n, 64, generator=g), 128, True) for n in (3, 5)]  # 192 values: no block edge
    fused = _fuse(parts, torch.float32)
    dense = torch.cat([dequantize_nf4_ref(p, torch.float32) for p in parts])
    assert torch.equal(dequantize_nf4_ref(fused), dequantize_nf4_ref(quantize_nf4(dense, 128, True)))
    aligned = [quantize_nf4(torch.randn(n, 64, generator=g), 64, True) for n in (3, 5)]
    assert torch.equal(dequantize_nf4_ref(_fuse(aligned, torch.float32)),
                       torch.cat([dequantize_nf4_ref(p) for p in aligned]))


def test_bad_checkpoints_name_file_and_tensor(dirs, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((dirs["bnb"] / "config.json").read_text())
    tensors = load_file(str(dirs["bnb"] / "model.safetensors"))
    key = "model.layers.1.self_attn.o_proj.weight.absmax"
    save_file({k: v for k, v in tensors.items() if k != key}, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight\.absmax"):
        load_model(bad)
    cfg = json.loads((dirs["bnb"] / "config.json").read_text())
    cfg["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="fp4"):
        load_model(bad)


# --- memory: Phi-3-mini ------------------------------------------------------------------------------------------

def test_phi3_mini_nf4_fits_in_2_4_gb():
    """Phi-3-mini (hidden 3072, intermediate 8192, 32 layers, vocab 32064, untied lm_head) in NF4 with double
    quantization, embeddings, lm_head and norms in bf16. To keep the test's RAM and time low we quantize ONE
    decoder layer's four real-shaped random bf16 weights, measure the NF4Weight byte counts, and multiply by 32
    (every layer has the same shapes); the bf16 tensors are counted from their shapes."""
    C, I, V, L = 3072, 8192, 32064, 32
    g = torch.Generator().manual_seed(0)
    layer_bytes, layer_params = 0, 0
    for n, k in [(3 * C, C), (C, C), (2 * I, C), (C, I)]:  # qkv_proj, o_proj, gate_up_proj, down_proj
        w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
        q = quantize_nf4(w, 64, True)
        del w
        layer_bytes += q.nbytes
        layer_params += n * k
    bits_per_param = 8 * layer_bytes / layer_params
    dense_bytes = 2 * (2 * V * C + (2 * L + 1) * C)  # embed_tokens + lm_head + norms, bf16
    total_gb = (L * layer_bytes + dense_bytes) / 1e9
    print(f"Phi-3-mini NF4: {total_gb:.3f} GB total, {bits_per_param:.4f} bits per linear parameter")
    assert abs(bits_per_param - 4.127) < 0.002  # 4 + 8/64 + 32/(64*256) + the two small tables
    assert total_gb <= 2.4


_PEAK_SCRIPT = r"""
import json, sys, torch
from phiforge.engine import load_model
from phiforge.engine.model.quant import NF4Linear
from phiforge.kernels.nf4 import quantize_nf4
quantize_nf4(torch.randn(64, 64), 64, True)  # warm up allocator and imports before measuring

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = rss("VmRSS:")
model = load_model(sys.argv[1], quant="nf4")
nf4 = sum(m.qweight.nbytes for m in model.modules() if isinstance(m, NF4Linear))
print(json.dumps({"peak": rss("VmHWM:") - before, "nf4": nf4}))
"""


def test_load_with_quant_nf4_peak_memory(tmp_path):
    """load_model(path, quant="nf4") never holds the dense model: its peak RSS stays near the NF4 total plus one
    dense projection (measured in a fresh process, 4 layers of 32 MB dense bf16 each)."""

    C, I, L, V = 1024, 4096, 4, 1024
    cfg = transformers.Phi3Config(**{**TINY, "hidden_size": C, "intermediate_size": I, "num_hidden_layers": L,
                                     "vocab_size": V, "num_attention_heads": 8, "num_key_value_heads": 8})
    cfg.dtype = "bfloat16"
    d = tmp_path / "mid"
    d.mkdir()
    cfg.save_pretrained(d)
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (V, C), "lm_head.weight": (V, C), "model.norm.weight": (C,)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
                       p + "self_attn.qkv_proj.weight": (3 * C, C), p + "self_attn.o_proj.weight": (C, C),
                       p + "mlp.gate_up_proj.weight": (2 * I, C), p + "mlp.down_proj.weight": (C, I)})
    tensors = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    dense_linear = sum(t.numel() * 2 for k, t in tensors.items() if "proj" in k)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(d)], capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"dense projections {dense_linear / 2**20:.0f} MiB, NF4 {m['nf4'] / 2**20:.0f} MiB, "
          f"peak {m['peak'] / 2**20:.0f} MiB")
    # the NF4 total + dense embed/lm_head + one dense decoder layer + the quantizer's fixed-size chunk temporaries;
    # holding the dense model (what a load-then-quantize would do) breaks both bounds
    dense_layer = dense_linear // L
    assert m["peak"] < m["nf4"] + 2 * V * C * 2 + dense_layer + 24 * 2**20
    assert m["peak"] < dense_linear


def test_load_nf4_state_from_a_dict(dirs):
    """The dict interface gives the same model as the loader's memory-mapped reader."""
    cfg = Phi3Config.from_file(dirs["bnb"])
    model = Phi3ForCausalLM(cfg, device="meta")
    model.rotary_emb.to("cpu")
    load_nf4_state(model, load_file(str(dirs["bnb"] / "model.safetensors")), cfg, dtype=torch.bfloat16)
    assert torch.equal(_logits(model.eval()), _logits(load_model(dirs["bnb"])))
