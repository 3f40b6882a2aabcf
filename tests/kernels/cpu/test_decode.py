"""The native whole-step decode computes what the torch decode step computes (tests/engine/serve/test_decode.py holds
that step, native, to model.forward), at every instruction-set tier this CPU runs (AVX-512 with and without BF16, AVX2):
fp32 to fp32 rounding, bf16 no further from an fp32 reference than torch's own bf16 step; on odd shapes (K and N not
multiples of the vector width, head dim 8), GQA, sliding window, partial rotary, tied embeddings, long rope,
left-padded batches (more rows than one 8-row block); NF4 models (QLoRA's base) equal the torch step too; rows of
different adapters and of none in one step (an AdapterSet: the LoRA epilogue of csrc/decode_lora.h) equal the torch
step with the same adapters, on dense and NF4 bases; a batch gives the same bits on any thread count; and it steps
aside for what it does not cover (too many rows, single-adapter LoRA projections, NF4 weights the torch step
dequantizes)."""
from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_phi3 import VARIANTS, make_hf_checkpoint

from phiforge.engine import load_model
from phiforge.engine.model.lora import LoRALinear
from phiforge.engine.model.phi3 import part_sizes
from phiforge.engine.model.quant import quantize_model_
from phiforge.engine.serve.decode import DecodeStep
from phiforge.engine.serve.multi_lora import AdapterSet
from phiforge.kernels.cpu import decode as cpu_decode, native, nf4 as nf4_cpu

LIB = cpu_decode.LIB  # tests/kernels/conftest.py: every test runs at each tier; skipped only where the CPU cannot


def test_library_builds(tier):
    status = LIB.status()
    assert status.state == "active" and status.detail == tier, str(status)


# hidden 40 (bf16 K tail 8), head dim 8, intermediate 52, vocab 97 (N % 4 = 1), one KV head, window 9, half rotary
ODD = dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=1, intermediate_size=52, vocab_size=97,
           sliding_window=9, partial_rotary_factor=0.5)
CASES = {"odd": ODD, **{k: VARIANTS[k][0] for k in ("gqa", "mini-4k-window", "partial-tied", "longrope-long")}}


def _run(model, prompt: torch.Tensor, steps: torch.Tensor, native: bool, rope_long: bool = False):
    """Prefill with model.forward, then decode `steps` one token at a time; logits (steps, V) and the cache."""
    cache = model.new_cache(1, prompt.shape[1] + steps.shape[0], rope_long=rope_long)
    with contextlib.nullcontext() if native else cpu_decode.LIB.disabled():
        with torch.inference_mode():
            model(prompt, cache=cache, num_logits=1)
            step = DecodeStep(model, cache)
            assert (step.native is not None) == native
            out = [step(steps[t:t + 1], torch.tensor([prompt.shape[1] + t])) for t in range(steps.shape[0])]
    return torch.cat(out).float(), cache


def _ids(vocab: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_equals_torch_step_and_forward(tmp_path, case):
    make_hf_checkpoint(tmp_path, CASES[case])
    model = load_model(tmp_path, dtype=torch.float32)
    vocab = model.config.vocab_size
    prompt, steps = _ids(vocab, 13, 1), _ids(vocab, 20, 2)[0]     # 13 + 20 > every window above
    long = case == "longrope-long"
    got, c1 = _run(model, prompt, steps, native=True, rope_long=long)
    ref, c2 = _run(model, prompt, steps, native=False, rope_long=long)
    assert (got - ref).abs().max().item() <= 1e-4
    assert torch.equal(c1.pos, c2.pos) and c1.length == c2.length
    assert (c1.k - c2.k).abs().max().item() <= 1e-5 and (c1.v - c2.v).abs().max().item() <= 1e-5


def _assert_bf16_no_worse_than_torch(path, overrides: dict, prompt_len: int, steps: int, seed: int) -> None:
    make_hf_checkpoint(path, overrides)
    model = load_model(path, dtype=torch.bfloat16)
    exact = load_model(path, dtype=torch.bfloat16).float()       # the same bf16 weights, fp32 arithmetic
    vocab = model.config.vocab_size
    prompt, tokens = _ids(vocab, prompt_len, seed), _ids(vocab, steps, seed + 1)[0]
    got, _ = _run(model, prompt, tokens, native=True)
    torch_bf16, _ = _run(model, prompt, tokens, native=False)
    ref, _ = _run(exact, prompt, tokens, native=False)
    err, budget = (got - ref).abs().max().item(), (torch_bf16 - ref).abs().max().item()
    assert err <= 1.5 * budget + 1e-3 * ref.abs().max().item(), (err, budget)


HS96 = dict(hidden_size=192, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)  # a 64 + 32 split


@pytest.mark.parametrize("case", ["odd", "gqa", "partial-tied", "hs96"])
def test_bf16_no_worse_than_torch_bf16(tmp_path, case):
    _assert_bf16_no_worse_than_torch(tmp_path, HS96 if case == "hs96" else CASES[case], 11, 12, 3)


def test_default_shapes_bf16_no_worse_than_torch_bf16(tmp_path):
    """The hot loops (K a multiple of 32, N of 4) on the default model's layer shapes, two layers."""
    _assert_bf16_no_worse_than_torch(tmp_path, dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                                    num_key_value_heads=3, vocab_size=512), 30, 6, 5)


def test_steps_aside_for_batches_nf4_and_lora(tmp_path):
    make_hf_checkpoint(tmp_path, VARIANTS["gqa"][0])
    model = load_model(tmp_path, dtype=torch.float32)
    assert DecodeStep(model, model.new_cache(1, 8)).native is not None
    assert DecodeStep(model, model.new_cache(cpu_decode.MAX_BATCH, 8)).native is not None
    wide = DecodeStep(model, model.new_cache(cpu_decode.MAX_BATCH + 1, 8))  # more rows than one native call takes:
    assert wide.native.max_rows == cpu_decode.MAX_BATCH                    # a step over more of them goes torch
    assert DecodeStep(model, model.new_cache(1, 8, dtype=torch.bfloat16)).native is None  # cache dtype differs
    name, lin = next(model.linears())
    model.set_submodule(name, LoRALinear(lin, r=4, alpha=8))
    assert DecodeStep(model, model.new_cache(1, 8)).native is None                 # a LoRA projection
    nf4 = quantize_model_(load_model(tmp_path, dtype=torch.float32))               # intermediate 96: K % 64 != 0
    assert DecodeStep(nf4, nf4.new_cache(1, 8)).native is None                     # (the torch step dequantizes)


# NF4 needs every K a whole number of 64-blocks: hidden 320 (5 heads of 64), intermediate 128, one KV head, window,
# half rotary
NF4_ODD = dict(ODD, hidden_size=320, intermediate_size=128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["nf4-odd", "nf4-gqa"])
def test_nf4_equals_torch_step(tmp_path, case, dtype):
    """An NF4 model (QLoRA's base) runs natively with kernels/cpu/nf4.py's kernels, the ones the torch step calls
    per projection, so the two agree to fp32 rounding (bf16: the same roundings in the same places): the fused GEMV
    up to nf4_cpu.GEMV_MAX_M rows, the tile GEMM from tile_min_m() up to TILE_MAX_M rows; beyond, the torch step
    dequantizes instead and so does not go native."""
    make_hf_checkpoint(tmp_path, NF4_ODD if case == "nf4-odd" else dict(VARIANTS["gqa"][0], intermediate_size=128))
    model = quantize_model_(load_model(tmp_path, dtype=dtype))
    vocab = model.config.vocab_size
    prompt, steps = _ids(vocab, 13, 1), _ids(vocab, 20, 2)[0]
    got, c1 = _run(model, prompt, steps, native=True)
    ref, c2 = _run(model, prompt, steps, native=False)
    assert (got - ref).abs().max().item() <= (1e-4 if dtype == torch.float32 else 1e-2 * ref.abs().max().item())
    assert (c1.k.float() - c2.k.float()).abs().max().item() <= 1e-4 * max(1.0, c2.k.float().abs().max().item())
    assert DecodeStep(model, model.new_cache(nf4_cpu.TILE_MAX_M, 8)).native.max_rows == nf4_cpu.TILE_MAX_M
    assert DecodeStep(model, model.new_cache(nf4_cpu.TILE_MAX_M + 1, 8)).native.max_rows == nf4_cpu.TILE_MAX_M
    for lens in ([7, 3, 9], [5, 3, 9, 9, 2, 11, 4, 6, 8]):                       # left-padded; tile: 8 + 1 rows
        got, c1 = _run_batch(model, lens, 6, native=True, seed=4)
        ref, c2 = _run_batch(model, lens, 6, native=False, seed=4)
        assert (got - ref).abs().max().item() <= (1e-4 if dtype == torch.float32 else 1e-2 * ref.abs().max().item())


def test_nf4_tiles_grow_with_the_threads(tmp_path):
    """An NF4 step holds one tile GEMM buffer per thread; run on more threads than it was made under, it makes
    one for each (two threads in one tile would overwrite each other's weights) and still equals the torch step."""
    make_hf_checkpoint(tmp_path, NF4_ODD)
    model = quantize_model_(load_model(tmp_path, dtype=torch.bfloat16))
    rows = nf4_cpu.GEMV_MAX_M + 1                                                # the tile GEMM at every tier
    tokens, positions = _ids(model.config.vocab_size, rows, 3)[0], torch.zeros(rows, dtype=torch.long)  # (B,) each
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        step = DecodeStep(model, model.new_cache(rows, 4))
        assert step.native.scratch["tile"].shape[0] == 1
        torch.set_num_threads(2)
        with torch.inference_mode():
            got = step(tokens, positions)                                       # (B, V)
        assert step.native.scratch["tile"].shape[0] == 2
        with cpu_decode.LIB.disabled(), torch.inference_mode():
            ref = DecodeStep(model, model.new_cache(rows, 4))(tokens, positions)
    finally:
        torch.set_num_threads(threads)
    assert (got.float() - ref.float()).abs().max().item() <= 1e-2 * ref.float().abs().max().item()


def test_steps_aside_for_weights_it_cannot_read_flat(tmp_path):
    """A strided embedding or norm weight (read through raw pointers) keeps the torch step, which still decodes."""
    make_hf_checkpoint(tmp_path, VARIANTS["gqa"][0])
    model = load_model(tmp_path, dtype=torch.float32)
    vocab = model.config.vocab_size
    prompt, steps = _ids(vocab, 9, 7), _ids(vocab, 5, 8)[0]
    ref, _ = _run(model, prompt, steps, native=True)
    for module in (model.model.embed_tokens, model.model.layers[1].post_attention_layernorm):
        w = module.weight.detach()
        strided = torch.empty(*w.shape[::-1]).t() if w.dim() == 2 else torch.empty(2 * w.shape[0])[::2]
        module.weight = torch.nn.Parameter(strided.copy_(w), requires_grad=False)
        assert not module.weight.is_contiguous()
        assert DecodeStep(model, model.new_cache(1, 8)).native is None
    got, _ = _run(model, prompt, steps, native=False)
    assert (got - ref).abs().max().item() <= 1e-4


def _decode(model, lens: list[int], steps: int, native: bool, seed: int, adapters=None, slots=None,
            rowwise: bool = False):
    """Left-padded prompts of `lens` tokens (pad slots at position -1), then `steps` batched decode steps; with
    `adapters`, row b on adapter slot slots[b] (-1: the base) in the prefill and every step (rowwise: the native
    epilogue one row at a time instead of grouped by adapter). Returns (logits per step, cache, the DecodeStep)."""
    vocab, B, P = model.config.vocab_size, len(lens), max(lens)
    ids = torch.randint(0, vocab, (B, P + steps), generator=torch.Generator().manual_seed(seed))
    pos = torch.full((B, P), -1)
    for b, n in enumerate(lens):
        pos[b, P - n:] = torch.arange(n)
    cache = model.new_cache(B, P + steps)
    rows = adapters.rows(torch.tensor(slots)) if adapters is not None else contextlib.nullcontext()
    with contextlib.nullcontext() if native else cpu_decode.LIB.disabled():
        with torch.inference_mode(), rows:
            model(ids[:, :P], position_ids=pos, cache=cache, num_logits=1)
            step = DecodeStep(model, cache)
            assert (step.native is not None) == native
            if rowwise:
                step.native.set_lora_rowwise(True)
            nxt, out = torch.tensor(lens), []
            for t in range(steps):
                out.append(step(ids[:, P + t], nxt).float())
                nxt = nxt + 1
    return torch.stack(out), cache, step


def _run_batch(model, lens: list[int], steps: int, native: bool, seed: int):
    out, cache, _ = _decode(model, lens, steps, native, seed)
    return out, cache


@pytest.mark.parametrize("lens", [[7, 19, 1], [5, 3, 9, 9, 2, 11, 4, 6, 8]])     # 9 rows: blocks of 8 and 1
def test_batches_fp32_equal_torch_step(tmp_path, lens):
    make_hf_checkpoint(tmp_path, ODD)
    model = load_model(tmp_path, dtype=torch.float32)
    got, c1 = _run_batch(model, lens, 14, native=True, seed=8)
    ref, c2 = _run_batch(model, lens, 14, native=False, seed=8)
    assert (got - ref).abs().max().item() <= 1e-4
    assert torch.equal(c1.pos, c2.pos) and (c1.k - c2.k).abs().max().item() <= 1e-5


def test_batches_bf16_no_worse_than_torch_bf16(tmp_path):
    make_hf_checkpoint(tmp_path, CASES["gqa"])
    model = load_model(tmp_path, dtype=torch.bfloat16)
    exact = load_model(tmp_path, dtype=torch.bfloat16).float()
    lens = [6, 13, 2, 9]
    got, _ = _run_batch(model, lens, 10, native=True, seed=9)
    torch_bf16, _ = _run_batch(model, lens, 10, native=False, seed=9)
    ref, _ = _run_batch(exact, lens, 10, native=False, seed=9)
    err, budget = (got - ref).abs().max().item(), (torch_bf16 - ref).abs().max().item()
    assert err <= 1.5 * budget + 1e-3 * ref.abs().max().item(), (err, budget)


@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batches_do_not_depend_on_the_thread_count(tmp_path, dtype, quant):
    """Every value of a step is computed whole by one thread (a weight row's sums, a (row, head) attention, a row's
    norms and SwiGLU), so 1, 2 or 3 threads give the same bits; 9 rows: GEMM blocks of 8 and 1 and the row-split
    vector work with more rows than threads."""
    make_hf_checkpoint(tmp_path, NF4_ODD if quant else CASES["gqa"])
    model = load_model(tmp_path, dtype=dtype)
    if quant:
        quantize_model_(model)
    lens, threads = [5, 3, 9, 9, 2, 11, 4, 6, 8], torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(_run_batch(model, lens, 6, native=True, seed=10)[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_struct_layout_is_checked_against_the_c_side():
    """A ctypes mirror that drifts from csrc/decode.h (here two fields swapped) is refused at load, not used."""
    import ctypes
    lib = cpu_decode.LIB.get()
    cpu_decode.check_layout(lib, cpu_decode._Model, "decode_model")            # the shipped mirror matches
    fields = list(cpu_decode._NF4Desc._fields_)
    fields[0], fields[1] = fields[1], fields[0]
    drifted = type("Drifted", (ctypes.Structure,), {"_fields_": fields})
    with pytest.raises(ValueError, match="packed"):
        cpu_decode.check_layout(lib, drifted, "decode_nf4desc")


def _adapters(model, seed: int) -> AdapterSet:
    """Three slots: 0 rank 4 on every projection; 1 rank 2 on q_proj (the q rows of the fused qkv) and up_proj (the
    up half of gate_up) only, as engine/formats/peft.py fuses split adapters; 2 rank 3 on o_proj and down_proj only."""
    g = torch.Generator().manual_seed(seed)
    adapters = AdapterSet(model, max_adapters=3)
    for name, layer in adapters.layers.items():
        site = name.rsplit(".", 1)[-1]
        K, N = layer.in_features, layer.out_features
        layer.grow_rank(4)
        for slot, rank in ((0, 4), (1, 2), (2, 3)):
            if (slot == 1 and site not in ("qkv_proj", "gate_up_proj")) or (slot == 2 and site not in
                                                                             ("o_proj", "down_proj")):
                continue
            B = torch.randn(N, rank, generator=g) * 0.3
            if slot == 1:  # only the first part's rows (q of q|k|v) or the second's (up of gate|up)
                sizes = list(part_sizes(model.config, site).values())
                keep = torch.zeros(N, 1)
                if site == "qkv_proj":
                    keep[:sizes[0]] = 1
                else:
                    keep[sizes[0]:] = 1
                B = B * keep
            layer.set_slot(slot, torch.randn(rank, K, generator=g) / K ** 0.5, B, 1.5 + slot)
    return adapters


def _run_adapters(model, adapters, lens: list[int], slots: list[int], steps: int, native: bool, seed: int,
                  rowwise: bool = False):
    """_decode with adapter rows; returns (logits per step, the paths the steps took)."""
    out, _, step = _decode(model, lens, steps, native, seed, adapters, slots, rowwise)
    return out, step.steps


@pytest.mark.parametrize("case", ["dense", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_adapter_rows_equal_torch_step(tmp_path, case, dtype):
    """Rows on adapter 0, none, adapter 1, adapter 0 and adapter 2 in one native step (NF4: five rows, the tile GEMM
    at every tier) each equal the torch step with the same adapters: fp32 to rounding, bf16 within its rounding."""
    make_hf_checkpoint(tmp_path, ODD if case == "dense" else NF4_ODD)
    model = load_model(tmp_path, dtype=dtype)
    if case == "nf4":
        model = quantize_model_(model)
    adapters = _adapters(model, seed=11)
    lens, slots = [7, 3, 9, 5, 4], [0, -1, 1, 0, 2]
    got, took = _run_adapters(model, adapters, lens, slots, 6, native=True, seed=12)
    ref, ref_took = _run_adapters(model, adapters, lens, slots, 6, native=False, seed=12)
    base, _ = _run_adapters(model, adapters, lens, [-1] * len(lens), 6, native=True, seed=12)
    assert took == {"native": 0, "native_lora": 6, "torch": 0} and ref_took["torch"] == 6
    tol = 1e-4 if dtype == torch.float32 else 2e-2 * ref.abs().max().item()
    assert (got - ref).abs().max().item() <= tol
    changed = (ref - base).abs().amax(dim=(0, 2))                       # per row: what its adapter changes
    assert (changed[torch.tensor(slots) >= 0] > 20 * tol).all()
    assert torch.equal(got[:, 1], base[:, 1])                         # the base row: untouched by its neighbours'
    rowwise, _ = _run_adapters(model, adapters, lens, slots, 6, native=True, seed=12, rowwise=True)
    assert torch.equal(rowwise, got)                                  # grouping rows changes no sum
    adapters.layers[next(iter(adapters.layers))].set_slot(0, None, None)   # an unload reaches the native step
    got, _ = _run_adapters(model, adapters, lens, slots, 6, native=True, seed=12)
    ref, _ = _run_adapters(model, adapters, lens, slots, 6, native=False, seed=12)
    assert (got - ref).abs().max().item() <= tol


def test_lora_struct_layout_is_checked():
    import ctypes
    lib = cpu_decode.LIB.get()
    cpu_decode.check_layout(lib, cpu_decode._LoRA, "decode_lora")
    for fields in (cpu_decode._LoRA._fields_[1:], [cpu_decode._LoRA._fields_[1], cpu_decode._LoRA._fields_[0],
                                                    *cpu_decode._LoRA._fields_[2:]]):
        drifted = type("Drifted", (ctypes.Structure,), {"_fields_": fields})
        with pytest.raises(ValueError, match="decode_lora"):
            cpu_decode.check_layout(lib, drifted, "decode_lora")
    model_fields = [f for f in cpu_decode._Model._fields_ if f[0] != "lgroup"]      # a Model field dropped
    with pytest.raises(ValueError, match="decode_model"):
        cpu_decode.check_layout(lib, type("Drifted", (ctypes.Structure,), {"_fields_": model_fields}),
                                "decode_model")
