"""LoRA adapters on disk, in PEFT's format, and the exact import of split-projection adapters.

A PEFT adapter directory is two files:

    adapter_model.safetensors   base_model.model.<module>.lora_A.weight (r, in)    fp32, metadata {"format": "pt"}
                                base_model.model.<module>.lora_B.weight (out, r)
    adapter_config.json         peft_type LORA, r, lora_alpha, target_modules, use_rslora, rank_pattern, ...
                                (the fields that define the adapter; PEFT defaults the rest)

with <module> the Hugging Face module path (`model.layers.3.self_attn.qkv_proj`); our module names are Hugging
Face's, so the keys are our state-dict keys with the `base_layer` level dropped. Written that way, the adapter
loads unchanged in `peft.PeftModel.from_pretrained` and transformers' `model.load_adapter`.

Split → fused. Adapters trained on Llama-style q/k/v (or gate/up) projections import exactly into Phi-3's fused
qkv_proj (gate_up_proj), whose output rows are q | k | v (gate | up):

    A' = [A_q; A_k; A_v]                     (r_q + r_k + r_v, in)        the input is shared
    B' = blockdiag(B_q·s_q/s', B_k·s_k/s', B_v·s_v/s')   (n_q + n_k + n_v, r')

so that s'·B'·A' stacks s_q·B_q·A_q, s_k·B_k·A_k, s_v·B_v·A_v row-block by row-block: exactly the three updates.
We choose alpha' so that s' equals the first member's scale (r' = 3r, alpha' = 3·alpha for plain LoRA; with rsLoRA
s = alpha/sqrt(r) so alpha' = sqrt(3)·alpha); the ratios s_i/s' are 1 unless rank_pattern/alpha_pattern give the
members different scales, in which case they fold into B. A member missing from the file (q/v-only adapters)
contributes no rank and zero rows.

Legend: r rank, in/out features; n_q = nh·hs, n_k = n_v = nkv·hs; I intermediate size.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from phiforge.engine.atomic import write_atomic, write_text_atomic
from phiforge.engine.model.lora import LoRALinear, base_features, lora_modules
from phiforge.engine.model.phi3 import FUSED_OF, FUSED_PARTS, part_sizes

PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter phiforge cannot load; names the file and the field or tensor."""


def peft_config(r: int, alpha: float, dropout: float, targets: list[str], use_rslora: bool,
                rank_pattern: dict, alpha_pattern: dict, base_model_name_or_path: str | None) -> dict:
    """adapter_config.json: the LoraConfig fields that define a plain LoRA on a causal LM, each with the value PEFT
    writes. PEFT fills every field left out with its default, so a release that adds a field (peft 0.22 added
    `astra_config`) changes nothing here; writing only what we set keeps every key one that PEFT knows."""
    return {
        "alpha_pattern": alpha_pattern, "base_model_name_or_path": base_model_name_or_path, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "lora_alpha": alpha,
        "lora_bias": False, "lora_dropout": dropout, "modules_to_save": None, "peft_type": "LORA", "r": r,
        "rank_pattern": rank_pattern, "target_modules": targets, "task_type": "CAUSAL_LM", "use_dora": False,
        "use_rslora": use_rslora,
    }


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter_model.safetensors + adapter_config.json (each atomically) for every LoRALinear in `model`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sites = list(lora_modules(model))
    if not sites:
        raise ValueError("save_adapter: the model has no LoRA modules (call apply_lora or load_adapter first)")
    tensors: dict[str, torch.Tensor] = {}
    for name, m in sites:
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().float().contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().float().contiguous().cpu()
    # The commonest rank/alpha become r/lora_alpha; modules that differ (e.g. fused split imports) go to the
    # patterns, keyed by full module name (PEFT matches pattern keys as a suffix of the module path).
    r = Counter(m.r for _, m in sites).most_common(1)[0][0]
    alpha = Counter(m.lora_alpha for _, m in sites).most_common(1)[0][0]
    rank_pattern = {n: m.r for n, m in sites if m.r != r}
    alpha_pattern = {n: _num(m.lora_alpha) for n, m in sites if m.lora_alpha != alpha}
    rslora = {m.use_rslora for _, m in sites}
    if len(rslora) > 1:
        raise ValueError("save_adapter: modules mix rsLoRA and plain scaling, which one PEFT config cannot express")
    targets = sorted({n.rsplit(".", 1)[-1] for n, _ in sites})
    cfg = peft_config(r, _num(alpha), sites[0][1].dropout_p, targets, rslora.pop(), rank_pattern, alpha_pattern,
                      None if base_model_name_or_path is None else str(base_model_name_or_path))
    write_atomic(out_dir / "adapter_model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    write_text_atomic(out_dir / "adapter_config.json", json.dumps(cfg, indent=2) + "\n")
    return out_dir


# ---- loading --------------------------------------------------------------------------------------------------------

# Fields of a PEFT LoraConfig that change the loaded adapter's math, with the one value phiforge computes with.
REFUSED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False, "use_qalora": False,
           "modules_to_save": None, "layer_replication": None, "trainable_token_indices": None,
           "target_parameters": None, "alora_invocation_tokens": None, "arrow_config": None, "use_bdlora": None}
# Fields phiforge reads, or that only describe how the adapter was made or where it came from: the tensors in the
# file already hold what they produced, and the file's keys (not target_modules) say which modules are adapted.
KNOWN = {"peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern",
         "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "task_type", "auto_mapping",
         "peft_version", "base_model_name_or_path", "revision", "inference_mode", "init_lora_weights",
         "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_config", "megatron_core",
         "qalora_group_size", "runtime_config", "ensure_weight_tying"}


class AdapterConfigWarning(UserWarning):
    """adapter_config.json sets a field this phiforge does not know; it is ignored, which changes the outputs if
    the field changes the adapter's math."""


def _read_config(path: Path) -> dict:
    p = path / "adapter_config.json"
    if not p.exists():
        raise AdapterError(f"{p}: no such file (a PEFT adapter directory has adapter_config.json)")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{p}: not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{p}: field peft_type is {cfg.get('peft_type')!r}; phiforge loads LORA adapters")
    for field, ok in REFUSED.items():
        if cfg.get(field, ok) != ok and not (ok is None and not cfg[field]):
            raise AdapterError(f"{p}: field {field} = {cfg[field]!r} is not supported (need {ok!r})")
    for field in ("r", "lora_alpha"):
        if not isinstance(cfg.get(field), (int, float)):
            raise AdapterError(f"{p}: field {field} is missing or not a number")
    # A newer PEFT's fields: unset (null, false, empty) they are PEFT's defaults and mean plain LoRA; set, they may not.
    unset = (None, False, {}, [], "")
    unknown = sorted(k for k, v in cfg.items() if k not in KNOWN | REFUSED.keys() and v not in unset)
    if unknown:
        warnings.warn(f"{p}: field(s) {', '.join(unknown)} set, unknown to phiforge and ignored; if they change the "
                      "adapter's math, outputs differ from PEFT's", AdapterConfigWarning, stacklevel=3)
    return cfg


def _pattern_value(pattern: dict, module: str, default):
    # PEFT: a pattern key matches when it equals a suffix of the module path at a '.' boundary (regex allowed).
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_tensors(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"A": (r, in), "B": (out, r)}} from adapter_model.safetensors."""
    f = path / "adapter_model.safetensors"
    if not f.exists():
        raise AdapterError(f"{f}: no such file (phiforge reads safetensors adapters only, never .bin pickles)")
    out: dict[str, dict[str, torch.Tensor]] = {}
    try:
        handle = safe_open(str(f), framework="pt")
    except Exception as e:  # noqa: BLE001 (the Rust error does not name the file)
        raise AdapterError(f"{f}: not a readable safetensors file ({e})") from None
    with handle:
        for key in handle.keys():
            m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
            if m is None:
                raise AdapterError(f"{f}: tensor {key!r} is not a LoRA A/B weight (DoRA and embeddings unsupported)")
            out.setdefault(m.group(1), {})[m.group(2)] = handle.get_tensor(key)
    for module, ab in out.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{f}: module {module!r} has lora_{'B' if 'A' in ab else 'A'} missing")
        if ab["A"].shape[0] != ab["B"].shape[1]:
            raise AdapterError(f"{f}: module {module!r}: lora_A {list(ab['A'].shape)} and lora_B "
                               f"{list(ab['B'].shape)} disagree on the rank")
    return out


def load_adapter(model: nn.Module, adapter_dir: str | Path, trainable: bool = False) -> list[str]:
    """Attach a PEFT LoRA adapter (unmerged) to `model`; returns the Phi-3 module names it wraps.

    Fused-name adapters load as they are; split q/k/v and gate/up adapters are fused exactly (module docstring).
    rank_pattern / alpha_pattern are honoured per module. With trainable=True the LoRA weights get gradients."""
    path = Path(adapter_dir)
    cfg = _read_config(path)
    tensors = _read_tensors(path)
    f = path / "adapter_model.safetensors"
    rslora = bool(cfg.get("use_rslora", False))
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}

    def scale_of(module: str, r_file: int) -> tuple[int, float, float]:
        r = int(_pattern_value(ranks, module, cfg["r"]))
        if r != r_file:
            raise AdapterError(f"{f}: module {module!r} has rank {r_file} in the file but {r} in adapter_config.json")
        alpha = float(_pattern_value(alphas, module, cfg["lora_alpha"]))
        return r, alpha, alpha / math.sqrt(r) if rslora else alpha / r

    # group the file's modules by the Phi-3 site they land on
    groups: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for module, ab in tensors.items():
        parent, leaf = module.rsplit(".", 1) if "." in module else ("", module)
        site_leaf = FUSED_OF.get(leaf, leaf)
        groups.setdefault(f"{parent}.{site_leaf}" if parent else site_leaf, {})[leaf] = ab

    names = []
    for site, members in groups.items():
        try:
            base = model.get_submodule(site)
        except AttributeError:
            raise AdapterError(f"{f}: module {next(iter(members))!r} has no counterpart {site!r} in the model") from None
        if isinstance(base, LoRALinear):
            base = base.base_layer  # replace an existing adapter rather than stacking
        in_f, out_f = base_features(base)
        leaf = site.rsplit(".", 1)[-1]
        if leaf in members:  # fused name: as is
            if len(members) > 1:
                raise AdapterError(f"{f}: {site!r} appears both fused and split ({sorted(members)})")
            A, B = members[leaf]["A"], members[leaf]["B"]
            r, alpha, _ = scale_of(f"{site}", A.shape[0])
            if A.shape[1] != in_f or B.shape[0] != out_f:
                raise AdapterError(f"{f}: {site!r}: lora_A {list(A.shape)} / lora_B {list(B.shape)} do not fit the "
                                   f"model's ({out_f}, {in_f}) projection")
        else:
            A, B, r, alpha = _fuse(f, site, members, part_sizes(model.config, leaf), in_f, rslora, scale_of)
        lora = LoRALinear(base, r, alpha, dropout=float(cfg.get("lora_dropout", 0.0) or 0.0), use_rslora=rslora,
                          init=False)
        with torch.no_grad():
            lora.lora_A.weight.copy_(A)
            lora.lora_B.weight.copy_(B)
        lora.lora_A.weight.requires_grad_(trainable)
        lora.lora_B.weight.requires_grad_(trainable)
        lora.train(model.training)
        model.set_submodule(site, lora)
        names.append(site)
    if not names:
        raise AdapterError(f"{f}: holds no LoRA tensors")
    return names


def _fuse(f: Path, site: str, members: dict, sizes: dict[str, int], in_f: int, rslora: bool, scale_of):
    """Concatenated A, block-diagonal B (scales folded relative to the first member), r' and alpha'."""
    parent = site.rsplit(".", 1)[0]
    order = FUSED_PARTS[site.rsplit(".", 1)[-1]]
    present = [n for n in order if n in members]
    scales, As, Bs = {}, [], {}
    for n in present:
        A, B = members[n]["A"].float(), members[n]["B"].float()
        if A.shape[1] != in_f or B.shape[0] != sizes[n]:
            raise AdapterError(f"{f}: {parent}.{n}: lora_A {list(A.shape)} / lora_B {list(B.shape)} do not fit "
                               f"({sizes[n]}, {in_f})")
        _, _, scales[n] = scale_of(f"{parent}.{n}", A.shape[0])
        As.append(A)
        Bs[n] = B
    r_total = sum(a.shape[0] for a in As)
    s = scales[present[0]]
    alpha = s * math.sqrt(r_total) if rslora else s * r_total  # so that LoRALinear's scaling equals s
    B_fused = torch.zeros(sum(sizes.values()), r_total)  # (out, r')
    row, col = 0, 0
    for n in order:
        if n in Bs:
            rn = Bs[n].shape[1]
            B_fused[row:row + sizes[n], col:col + rn] = Bs[n] * (scales[n] / s)
            col += rn
        row += sizes[n]
    return torch.cat(As, dim=0), B_fused, r_total, alpha


# ---- the base an adapter was trained on -----------------------------------------------------------------------------
# A LoRA adapter's update was learnt against its base's exact weights: QLoRA's against the NF4 base, LoRA's against
# the dense one. training_args.json's `method` records which; every rule about an adapter's base reads this table.
BASE_OF_METHOD = {"qlora": "nf4", "lora": "dense"}
METHOD_OF_BASE = {base: method for method, base in BASE_OF_METHOD.items()}


def quant_of_method(method: str) -> str | None:
    """The `quant` to load a base with for training or serving `method`: "nf4" for QLoRA, None (dense) for LoRA."""
    return "nf4" if BASE_OF_METHOD[method] == "nf4" else None


def trained_base(adapter_dir: str | Path) -> str | None:
    """"nf4" for a QLoRA adapter, "dense" for a LoRA one (training_args.json's method), None when the directory does
    not say (an adapter trained elsewhere)."""
    p = Path(adapter_dir) / "training_args.json"
    if not p.exists():
        return None
    try:
        method = json.loads(p.read_text()).get("method")
    except (json.JSONDecodeError, AttributeError) as e:
        raise AdapterError(f"{p}: not a JSON object ({e})") from None
    return BASE_OF_METHOD.get(method)


def resolve_quant(quant: str | None, adapter_dir: str | Path | None) -> str | None:
    """The quantization to load with: "none" means dense, None the adapter's trained base (dense without one)."""
    if quant == "none":
        return None
    if quant is None and adapter_dir is not None:
        return "nf4" if trained_base(adapter_dir) == "nf4" else None
    return quant


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """The adapter directory, checked before any model is loaded: it exists and holds adapter_config.json."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"--adapter {d}: no such directory (a PEFT LoRA adapter directory, e.g. a finetune "
                                "--out)")
    if not (d / "adapter_config.json").is_file():
        raise AdapterError(f"--adapter {d}: no adapter_config.json there, so it is not a PEFT LoRA adapter directory")
    return d
