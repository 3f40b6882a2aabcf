"""bench/gpu_check.py's correctness parts: the Triton kernels, the model through them, training, generation and the
CUDA-graph decode step, each against its reference on the device at hand (see gpu_check.py's docstring)."""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import os

import torch

from phiforge.bench.gpu_check_common import Ctx, Skip, default_model_dir, ref_error, rel_diff, require_cuda, tiny_model
from phiforge.engine.formats.loader import load_model
from phiforge.engine.model.lora import LoRALinear, apply_lora, trainable_parameters
from phiforge.engine.model.quant import quantize_model_
from phiforge.engine.model.tokenizer import load_tokenizer
from phiforge.engine.serve.decode import DecodeStep
from phiforge.engine.serve.decode_graph import CUDAGraphDecode
from phiforge.kernels.lora import lora_linear, lora_linear_ref
from phiforge.kernels.nf4 import quantize_nf4
from phiforge.kernels.nf4 import dequantize_nf4_ref
from phiforge.kernels.nf4_matmul import LoRAEpilogue, dequantize_into_buffer, nf4_matmul, nf4_matmul_ref, nf4_matmul_t
from phiforge.kernels.nf4_matmul import nf4_matmul_t_ref

try:  # a reference only, optional on the GPU machine
    import transformers
except ImportError:  # pragma: no cover
    transformers = None

# (N, K): Phi-3-mini's qkv, gate_up and down projections; odd shapes (K off the blocksize, blocks straddle rows)
MINI_SHAPES = [(9216, 3072), (16384, 3072), (3072, 8192)]
ODD_SHAPES = [(33, 128), (65, 96), (17, 75)]


def _kernel_cases(ctx: Ctx):
    if ctx.tiny:  # the interpreter is slow and has no bf16 arithmetic: a few odd shapes in fp16
        return [(33, 128), (17, 75)], [torch.float16], [1, 17]
    return ODD_SHAPES + MINI_SHAPES, [torch.float16, torch.bfloat16], [1, 8, 64, 512]  # GEMV and both GEMMs


def check_kernels(ctx: Ctx) -> dict:
    """NF4 dequantize, GEMV, GEMM, transposed GEMM (each with and without the LoRA epilogue) and the fused LoRA
    linear (forward and backward, dense and NF4) against the pure-torch references, by tests/ref_error.py's rule."""
    dev = ctx.device
    shapes, dtypes, rows = _kernel_cases(ctx)
    cases, failures = 0, []
    g = torch.Generator().manual_seed(0)

    def record(name: str, res: dict) -> None:
        nonlocal cases
        cases += 1
        if not res["ok"]:
            failures.append(dict(case=name, **res))

    for N, K in shapes:
        w = quantize_nf4(torch.randn(N, K, generator=g) * 0.05).to(dev)
        for dtype in dtypes:
            exact = dequantize_nf4_ref(w, dtype)
            got = dequantize_into_buffer(w, dtype).clone()
            record(f"dequantize {N}x{K} {dtype}", dict(ok=torch.equal(got, exact), error=rel_diff(got, exact),
                                                       ref_error=0.0))
            for M in rows:
                x = (torch.randn(M, K, generator=g)).to(dev, dtype)
                dy = (torch.randn(M, N, generator=g)).to(dev, dtype)
                tag = f"{N}x{K} M={M} {dtype}"
                record(f"nf4_matmul {tag}", ref_error(nf4_matmul(x, w), nf4_matmul_ref(x, w),
                                                      nf4_matmul_ref(x.double(), w)))
                record(f"nf4_matmul_t {tag}", ref_error(nf4_matmul_t(dy, w), nf4_matmul_t_ref(dy, w),
                                                        nf4_matmul_t_ref(dy.double(), w)))
                r = 16
                A = (torch.randn(r, K, generator=g) * 0.05).to(dev, dtype)
                B = (torch.randn(N, r, generator=g) * 0.05).to(dev, dtype)
                P = x @ A.T  # (M, r)
                out = nf4_matmul(x, w, LoRAEpilogue(P, B, 2.0))

                def ref(xx):
                    return nf4_matmul_ref(xx, w) + 2.0 * (xx @ A.to(xx.dtype).T) @ B.to(xx.dtype).T  # (M, N)
                record(f"nf4_matmul+lora {tag}", ref_error(out, ref(x), ref(x.double())))
                for base in ("dense", "nf4"):
                    weight = w if base == "nf4" else dequantize_nf4_ref(w, dtype)
                    record(f"lora_linear {base} {tag}", _lora_case(x, weight, A, B, dy))
    return dict(cases=cases, failures=failures[:20], failed=len(failures),
                shapes=[list(s) for s in shapes], dtypes=[str(d) for d in dtypes], rows=rows,
                **({} if not failures else _raise(f"{len(failures)} of {cases} kernel cases off the reference")))


def _raise(msg: str):
    raise AssertionError(msg)


def _lora_case(x, weight, A, B, dy) -> dict:
    """Forward and the three gradients of the fused LoRA linear against lora_linear_ref in x's dtype and in fp64."""
    def run(fn, dt):
        xx, a, b = (t.detach().to(dt).requires_grad_() for t in (x, A, B))
        y = fn(xx, weight, a, b, 2.0)
        (y * dy.to(dt)).sum().backward()
        return [y.detach(), xx.grad, a.grad, b.grad]
    got, ref, ref64 = run(lora_linear, x.dtype), run(lora_linear_ref, x.dtype), run(lora_linear_ref, torch.float64)
    checks = [ref_error(k, r, d) for k, r, d in zip(got, ref, ref64)]
    return dict(ok=all(c["ok"] for c in checks), error=max(c["error"] for c in checks),
                ref_error=max(c["ref_error"] for c in checks))


def _fwd_bwd(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids)                                                          # (B, T, V)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach().cpu().double(), {n: p.grad.detach().cpu().double() for n, p in trainable_parameters(model)}


def _qlora_tiny(device: str):
    model = quantize_model_(tiny_model("cpu"))
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, m in model.named_modules():
            if isinstance(m, LoRALinear):
                getattr(m.lora_B, "weight", m.lora_B).normal_(0, 0.05)
    return model.to(device)


@contextlib.contextmanager
def torch_path():
    """CPU tensors take the torch path inside, even where PHIFORGE_KERNELS=triton sends them to the interpreter."""
    saved = os.environ.pop("PHIFORGE_KERNELS", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["PHIFORGE_KERNELS"] = saved


def check_model_triton(ctx: Ctx) -> dict:
    """A tiny Phi-3 with NF4 bases and LoRA adapters, forward and backward through the Triton kernels (on the device;
    the interpreter on CPU) against the torch path on CPU, in fp32 (on GPU tl.dot rounds fp32 inputs to TF32)."""
    ids = torch.randint(0, 211, (2, 24), generator=torch.Generator().manual_seed(0))
    ref_model = _qlora_tiny("cpu")
    dev_model = copy.deepcopy(ref_model).to(ctx.device)
    with torch_path():
        want_logits, want_grads = _fwd_bwd(ref_model, ids)
    got_logits, got_grads = _fwd_bwd(dev_model, ids.to(ctx.device))
    tol = 2e-2 if ctx.cuda else 1e-4
    diffs = dict(logits=rel_diff(got_logits, want_logits),
                 grads=max(rel_diff(got_grads[n], want_grads[n]) for n in want_grads))
    if max(diffs.values()) > tol:
        raise AssertionError(f"Triton path off the torch path: {diffs} (tolerance {tol})")
    return dict(relative_difference=diffs, tolerance=tol, lora_parameters=len(want_grads))


def _train_losses(model, ids, steps: int) -> list[float]:
    params = [p for _, p in trainable_parameters(model)]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        logits = model(ids)                                                      # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def check_qlora_train(ctx: Ctx) -> dict:
    """QLoRA training steps (AdamW, no dropout) on the device match the same steps on CPU through torch."""
    steps = ctx.iters(8, 3)
    ids = torch.randint(0, 211, (2, 32), generator=torch.Generator().manual_seed(2))
    ref_model = _qlora_tiny("cpu")
    dev_model = copy.deepcopy(ref_model).to(ctx.device)
    with torch_path():
        want = _train_losses(ref_model, ids, steps)
    got = _train_losses(dev_model, ids.to(ctx.device), steps)
    diff = max(abs(a - b) / abs(b) for a, b in zip(got, want))
    tol = 2e-2 if ctx.cuda else 1e-4
    if diff > tol or not want[-1] < want[0]:
        raise AssertionError(f"losses {got} vs the CPU reference {want} (relative {diff:.3g}, tolerance {tol})")
    return dict(losses=got, reference_losses=want, max_relative_difference=diff, tolerance=tol)


def _greedy(model, ids: torch.Tensor, n: int, step_cls=None) -> list[list[int]]:
    """Greedy tokens by prefill + one step per token through model.forward (or a decode-step class)."""
    B, P = ids.shape
    cache = model.new_cache(B, P + n)
    with torch.inference_mode():
        logits = model(ids, cache=cache, num_logits=1)[:, -1]                    # (B, V)
        step = step_cls(model, cache) if step_cls else None
        out, pos = [], torch.full((B,), P, device=ids.device)
        for _ in range(n):
            tok = logits.argmax(-1)                                              # (B,)
            out.append(tok)
            logits = step(tok, pos) if step else model(tok[:, None], position_ids=pos[:, None], cache=cache)[:, -1]
            pos += 1
    return torch.stack(out, 1).tolist()


def check_generate(ctx: Ctx) -> dict:
    """The default model, greedy, through phiforge and through transformers on the same device, in fp32."""
    if importlib.util.find_spec("transformers") is None:
        raise Skip("transformers not installed")
    path = default_model_dir()
    n = ctx.iters(32, 4)
    tok = load_tokenizer(path)
    prompt = tok.encode("The three primary colours are")
    ids = torch.tensor([prompt], device=ctx.device)
    ours = load_model(path, dtype=torch.float32, device=ctx.device)
    # on CPU the torch path: this part is about token parity; the Triton path's is model_triton's
    with torch_path() if not ctx.cuda else contextlib.nullcontext():
        got = _greedy(ours, ids, n)[0]
        got_lean = _greedy(ours, ids, n, DecodeStep)[0]
    del ours
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(ctx.device).eval()
    with torch.inference_mode():
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False)[0, len(prompt):].tolist()
    if got != want or got_lean != want:
        raise AssertionError(f"greedy tokens differ: model.forward {got}, DecodeStep {got_lean}, transformers {want}")
    return dict(tokens=n, prompt_tokens=len(prompt), equal=True)


def check_cuda_graph(ctx: Ctx) -> dict:
    """CUDAGraphDecode's replay against the eager DecodeStep, dense bf16 and NF4, batch 1 and 8."""
    require_cuda(ctx)
    out = {}
    for quant in (False, True):
        model = tiny_model("cpu", seed=3, sliding_window=40)
        if quant:
            quantize_model_(model)
        model = model.to("cuda", torch.bfloat16)
        for B in (1, 8):
            ids = torch.randint(0, 211, (B, 16), generator=torch.Generator().manual_seed(B)).cuda()
            eager, graph = _greedy_logits(model, ids, 48, DecodeStep), _greedy_logits(model, ids, 48, CUDAGraphDecode)
            diff = rel_diff(graph, eager)
            same = bool((graph.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.95)
            out[f"{'nf4' if quant else 'bf16'}_batch{B}"] = dict(relative_difference=diff, argmax_agree=same)
            if diff > 2e-2 or not same:
                raise AssertionError(f"CUDA graph step off the eager step: {out}")
    return out


def _greedy_logits(model, ids, n, step_cls) -> torch.Tensor:
    """Logits of n steps fed with the same (teacher-forced) tokens, so both steps see identical inputs."""
    B, P = ids.shape
    cache = model.new_cache(B, P + n + 8)
    feed = torch.randint(0, 211, (B, n), generator=torch.Generator().manual_seed(9)).to(ids.device)
    with torch.inference_mode():
        model(ids, cache=cache, num_logits=1)
        step, pos, outs = step_cls(model, cache), torch.full((B,), P, device=ids.device), []
        for t in range(n):
            outs.append(step(feed[:, t], pos).float())
            pos += 1
    return torch.stack(outs, 1)                                                  # (B, n, V)


PARTS = dict(kernels=check_kernels, model_triton=check_model_triton, qlora_train=check_qlora_train,
             generate=check_generate, cuda_graph=check_cuda_graph)
