"""Generation speed on the default model: phiforge vs transformers (and llama.cpp where installed), one JSON object.

For each dtype (float32, bfloat16) and batch size (1, 8), with 512-token prompts and greedy decoding of N tokens
(stop tokens ignored on both sides, so both decode exactly N):

  - ttft_s: call start → first new token (prefill of 512 tokens + one sample), median over repeats; for a batch,
    until every row has its first token, as transformers' batched generate gives them all at once;
  - decode_tokens_per_s: tokens after the first ÷ the time they took, per row; `aggregate` multiplies by batch;
    for a batch, from every row's first token to the last row's end (a batch whose prompts exceed one step's
    prefill budget decodes its first rows while the rest prefill: that time is the batch's TTFT, not decode);
  - ratios phiforge / transformers, measured interleaved in the same run (this machine is shared: only
    same-run ratios mean anything);
  - roofline: batch-1 decode reads every weight once per token, so tokens/s ≤ copy bandwidth ÷ weight bytes,
    with the bandwidth of a large tensor copy (bytes read + written ÷ time) measured in the same run (the issue's
    definition); `fraction_of_read_bandwidth` uses a large read instead, the stricter ceiling for a GEMV;
  - tokens_match: phiforge's greedy tokens equal transformers' (float32 only; bf16 rounding may differ);
  - next_turn: a chat's next turn (the prompt, a reply, 32 new tokens): TTFT with the prefix cache and without;
  - long_prompt: TTFT of a 1536-token prompt (three prefill chunks on phiforge's side), batch 1;
  - nf4_bfloat16_batch1: the QLoRA base model served as is (NF4 weights, bf16 compute) vs transformers with
    bitsandbytes' NF4, batch 1 (skipped with --no-nf4 or --quick, or without bitsandbytes);
  - ttft_floor: the prefill's projections alone (the same GEMMs, timed in the same run) and that time as a
    fraction of transformers' TTFT: a TTFT ratio below that fraction is out of reach for any attention or
    overhead savings. Also the prefill's arithmetic (GEMMs + causal attention, in GFLOP) over this CPU's
    arithmetic peak in the dtype (12 independent FMA / bf16 dot-product chains a thread, timed here): the TTFT
    ratio even a prefill at 100% of peak would reach.

llama.cpp (llama-cpp-python on the GGUF the default model is converted from) runs in a child process when
`--llama-python` names an interpreter that has it, or when this one does; it is never a dependency.

    python bench/bench_generate.py [--quick] [--threads T] [--ablations] [--new-tokens N] [--repeats R]
                                   [--llama-python PATH] [--no-nf4]
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import statistics
import subprocess
import sys
import time

import torch
from transformers import BitsAndBytesConfig, Phi3ForCausalLM
from transformers.generation.streamers import BaseStreamer

from phiforge.engine import Generator, load_model, load_tokenizer
from phiforge.engine.formats.default_model import default_gguf_path, default_model_path
from phiforge.engine.model.quant import quantize_model_
from phiforge.kernels.cpu import attention as cpu_attention, decode as cpu_decode, native

PROMPT_LEN = 512
LONG_PROMPT_LEN = 1536


def copy_bandwidth_gbs(mb: int = 256, repeats: int = 5) -> float:
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * src.numel() * 4 / best / 1e9


def read_bandwidth_gbs(mb: int = 256, repeats: int = 5) -> float:
    """A large sum: reads only. A copy also writes (and on most CPUs reads each destination line first), so this
    is the higher ceiling and the one a GEMV, which only reads weights, can approach."""
    src = torch.ones(mb * 2**20 // 4)
    src.sum()
    return src.numel() * 4 / min(_timed(src.sum) for _ in range(repeats)) / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of every weight a decode step reads: all parameters, except that an *untied* embedding table is read
    one row per token (a tied one is read whole, as the lm_head)."""
    seen, total = set(), 0
    embed = model.model.embed_tokens.weight
    tied = model.lm_head.weight is embed
    for p in model.parameters():
        if p.data_ptr() in seen or (p is embed and not tied):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


@torch.inference_mode()
def prefill_matmul_floor_s(model: torch.nn.Module, T: int = PROMPT_LEN, repeats: int = 3) -> float:
    """Seconds the projections alone take for a T-token prefill (every layer's four GEMMs through the model's own
    linear modules, plus the lm_head on one row), best of `repeats`: no TTFT can be below this with these GEMMs."""
    cfg, dt = model.config, model.dtype
    xs = {n: torch.randn(T, n, dtype=dt) for n in (cfg.hidden_size, cfg.intermediate_size,
                                                    cfg.num_attention_heads * cfg.head_dim)}

    def run():
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            a.qkv_proj(xs[cfg.hidden_size]), a.o_proj(xs[cfg.num_attention_heads * cfg.head_dim])
            m.gate_up_proj(xs[cfg.hidden_size]), m.down_proj(xs[cfg.intermediate_size])
        model.lm_head(xs[cfg.hidden_size][-1:])
    run()
    return min(_timed(run) for _ in range(repeats))


_PEAK = native.NativeLib("bench_peak", "peak.c", tiers=("avx512bf16",), register=False, functions={
    "peak": (None, [ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]),
})


def arithmetic_peak_gflops(dtype: torch.dtype, n: int = 20_000_000) -> float | None:
    """GFLOP/s of the CPU's widest multiply-add in `dtype` on all torch threads (None without a compiler or bf16
    dot products): what no kernel can exceed. The probe is kernels/cpu/csrc/peak.c."""
    lib = _PEAK.get()
    if lib is None:
        return None
    bf, threads = int(dtype == torch.bfloat16), torch.get_num_threads()
    sink = torch.zeros(threads)
    lib.peak(n // 10, bf, threads, sink.data_ptr())
    best = min(_timed(lambda: lib.peak(n, bf, threads, sink.data_ptr())) for _ in range(3))
    return threads * n * 12 * (64 if bf else 32) / best / 1e9


def prefill_gflop(cfg, T: int = PROMPT_LEN) -> float:
    """Multiply-adds x 2 of a T-token prefill: every layer's projections, causal attention (q·k and p·v over the
    T(T+1)/2 visible pairs of each head), and the lm_head on the last row."""
    hs, nh, nkv, C, inter = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size, \
        cfg.intermediate_size
    proj = C * (nh + 2 * nkv) * hs + nh * hs * C + C * 2 * inter + inter * C
    attn = 2 * nh * hs * T * (T + 1) // 2
    return 2 * (cfg.num_hidden_layers * (T * proj + attn) + C * cfg.vocab_size) / 1e9


def next_turn_ttft(gen, prompt: list[int], repeats: int, reply: int = 32, turn: int = 32) -> dict:
    """A chat's next turn: the 512-token prompt, its reply, and `turn` new tokens. TTFT with the prefix cache (the
    previous call's K/V reused) and without (the whole conversation prefilled again), median over repeats."""
    follow = prompt + list(range(1000, 1000 + reply + turn))  # any ids: the reply as generated, then the new turn
    runs = {"cached": [], "cold": []}
    for _ in range(repeats):
        for name in runs:
            gen.prefix_cache = name == "cached"
            gen.generate([follow[:len(prompt) + reply]], max_new_tokens=1, temperature=0)  # the previous turn
            [r] = gen.generate([follow], max_new_tokens=4, temperature=0)
            runs[name].append(r.ttft_s)
            assert (r.cached_tokens > 0) == (name == "cached")
    gen.prefix_cache = False
    cached, cold = (statistics.median(runs[k]) for k in ("cached", "cold"))
    return {"prompt_tokens": len(follow), "new_tokens_prefilled": turn, "ttft_cached_s": cached,
            "ttft_cold_s": cold, "speedup": cold / cached}


def make_prompts(tok, batch: int, length: int = PROMPT_LEN) -> list[list[int]]:
    text = " ".join(f"Section {i}: station {i % 13} reported {i * 37 % 101} psi and {i * 11 % 7} alarms."
                    for i in range(800))
    ids = tok.encode(text, add_special_tokens=False)
    return [ids[16 * b: 16 * b + length] for b in range(batch)]


def long_prompt_ttft(ours, hf, tok, repeats: int, length: int = LONG_PROMPT_LEN) -> dict:
    """TTFT of one `length`-token prompt (a RAG prompt with several retrieved chunks): phiforge prefills it in
    512-token chunks against its KV cache, transformers in one pass; medians over repeats, interleaved."""
    [prompt] = make_prompts(tok, 1, length)
    assert len(prompt) == length
    ours_t, theirs_t = [], []
    for _ in range(repeats):
        ours_t.append(run_phiforge(ours, [prompt], 2)["ttft_s"])
        theirs_t.append(run_transformers(hf, [prompt], 2)["ttft_s"])
    p, t = statistics.median(ours_t), statistics.median(theirs_t)
    return {"prompt_tokens": length, "phiforge_ttft_s": p, "transformers_ttft_s": t, "ttft_ratio": p / t}


def run_phiforge(gen, prompts, n: int) -> dict:
    rs = gen.generate(prompts, max_new_tokens=n, temperature=0)
    assert all(len(r.token_ids) == n for r in rs)
    first = max(r.ttft_s for r in rs)                                    # seconds from the call, as each row's end
    end = max(r.ttft_s + (n - 1) / r.decode_tokens_per_s for r in rs)
    return {"ttft_s": first, "decode_tokens_per_s": (n - 1) / (end - first), "tokens": [r.token_ids for r in rs]}


def run_transformers(hf, prompts, n: int) -> dict:
    class Stamps(BaseStreamer):  # generate() calls put() once with the prompt, then once per new token
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    ids = torch.tensor(prompts)
    s = Stamps()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, streamer=s, pad_token_id=0)
    first, last = s.times[1], s.times[-1]
    return {"ttft_s": first - t0, "decode_tokens_per_s": (n - 1) / (last - first),
            "tokens": out[:, ids.shape[1]:].tolist()}


LLAMA_CHILD = r"""
import json, sys, time
from llama_cpp import Llama
gguf, n, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
prompt = json.loads(sys.stdin.read())
llm = Llama(model_path=gguf, n_ctx=2048, n_batch=512, n_threads=2, verbose=False)
runs = []
for _ in range(repeats + 1):  # the first is a warm-up
    llm.reset()
    t0, times = time.perf_counter(), []
    for i, tok in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
        times.append(time.perf_counter())
        if len(times) == n:
            break
    runs.append({"ttft_s": times[0] - t0, "decode_tokens_per_s": (n - 1) / (times[-1] - times[0])})
runs = runs[1:]
print(json.dumps({k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}))
"""


def run_llama_cpp(python: str, prompt: list[int], n: int, repeats: int) -> dict | str:
    out = subprocess.run([python, "-c", LLAMA_CHILD, str(default_gguf_path()), str(n), str(repeats)],
                         input=json.dumps(prompt), capture_output=True, text=True)
    if out.returncode != 0:
        return f"failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def nf4_batch1(model_dir: str, tok, n: int, repeats: int) -> dict:
    """QLoRA's base model served as is: NF4 weights (blocksize 64, double quant), bf16 compute, batch 1, against
    transformers with bitsandbytes' NF4 (the same settings), interleaved."""
    if importlib.util.find_spec("bitsandbytes") is None:  # transformers' 4-bit path
        return {"skipped": "bitsandbytes not installed"}
    ours = Generator(quantize_model_(load_model(model_dir, dtype=torch.bfloat16)), tok)
    ours.stop_ids = frozenset()
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    hf = Phi3ForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, quantization_config=q).eval()
    prompts = make_prompts(tok, 1)
    run_phiforge(ours, prompts, 4), run_transformers(hf, prompts, 4)
    runs_p, runs_t = [], []
    for _ in range(repeats):
        runs_p.append(run_phiforge(ours, prompts, n))
        runs_t.append(run_transformers(hf, prompts, n))
    p = {k: _median(runs_p, k) for k in ("ttft_s", "decode_tokens_per_s")}
    t = {k: _median(runs_t, k) for k in ("ttft_s", "decode_tokens_per_s")}
    return {"phiforge": p, "transformers_bnb": t, "decode_speedup": p["decode_tokens_per_s"] / t["decode_tokens_per_s"],
            "ttft_ratio": p["ttft_s"] / t["ttft_s"]}


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the default model)")
    ap.add_argument("--quick", action="store_true", help="16 new tokens, 1 repeat, batch 1 only")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--llama-python", default=None, help="a Python with llama-cpp-python installed")
    ap.add_argument("--no-nf4", action="store_true", help="skip the NF4 (QLoRA base) batch-1 comparison")
    ap.add_argument("--ablations", action="store_true",
                    help="batch 1 also without the native decode step, with SDPA for the prefill attention, and with "
                         "model.forward as the decode step")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.repeats, args.batches = 16, 1, "1"
    if args.model is None:
        args.model = str(default_model_path())
    return args


ABLATIONS = {"no_native_step": [cpu_decode.LIB], "sdpa_prefill": [cpu_attention.LIB], "model_forward_decode": []}


def run_ablation(ours, prompts: list[list[int]], n: int, name: str) -> dict:
    """One phiforge run with a native library switched off, or model.forward as the decode step."""
    ours.lean_decode = name != "model_forward_decode"
    try:
        with native.disabled(*ABLATIONS[name]):
            return run_phiforge(ours, prompts, n)
    finally:
        ours.lean_decode = True


def measure_batch(ours, hf, tok, batch: int, n: int, args: argparse.Namespace) -> dict:
    """phiforge and transformers interleaved on `batch` prompts: medians, ratios and the ablations."""
    prompts = make_prompts(tok, batch)
    runs_p, runs_t = [], []
    ablations = {name: [] for name in ABLATIONS} if args.ablations and batch == 1 else {}
    for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
        runs_p.append(run_phiforge(ours, prompts, n))
        runs_t.append(run_transformers(hf, prompts, n))
        for name, runs in ablations.items():
            runs.append(run_ablation(ours, prompts, n, name))
    p = {k: _median(runs_p, k) for k in ("ttft_s", "decode_tokens_per_s")}
    t = {k: _median(runs_t, k) for k in ("ttft_s", "decode_tokens_per_s")}
    entry = {
        "phiforge": {**p, "aggregate_tokens_per_s": p["decode_tokens_per_s"] * batch},
        "transformers": {**t, "aggregate_tokens_per_s": t["decode_tokens_per_s"] * batch},
        "decode_speedup": p["decode_tokens_per_s"] / t["decode_tokens_per_s"],
        "ttft_ratio": p["ttft_s"] / t["ttft_s"],
    }
    for name, runs in ablations.items():
        entry[f"phiforge_{name}"] = {k: _median(runs, k) for k in ("ttft_s", "decode_tokens_per_s")}
    if ours.model.dtype == torch.float32:
        entry["tokens_match"] = runs_p[0]["tokens"] == runs_t[0]["tokens"]
    print(f"# {ours.model.dtype} batch {batch}: phiforge {p['decode_tokens_per_s']:.1f} tok/s, "
          f"TTFT {p['ttft_s'] * 1000:.0f} ms | transformers {t['decode_tokens_per_s']:.1f} tok/s, "
          f"TTFT {t['ttft_s'] * 1000:.0f} ms", file=sys.stderr, flush=True)
    return entry


def batch1_extras(entry: dict, ours, hf, tok, prompt: list[int], report: dict, repeats: int) -> None:
    """Batch 1 only: the chat's next turn, a long prompt, the TTFT floor and the decode roofline."""
    p, t, dtype = entry["phiforge"], entry["transformers"], ours.model.dtype
    entry["next_turn"] = next_turn_ttft(ours, prompt, repeats)
    entry["long_prompt"] = long_prompt_ttft(ours, hf, tok, repeats)
    floor = prefill_matmul_floor_s(ours.model)
    gflop, peak = prefill_gflop(ours.model.config), arithmetic_peak_gflops(dtype)
    entry["ttft_floor"] = {"prefill_matmuls_s": floor, "as_ratio_of_transformers_ttft": floor / t["ttft_s"],
                           "prefill_gflop": gflop, "arithmetic_peak_gflops": peak}
    if peak:
        entry["ttft_floor"].update({"at_peak_s": gflop / peak,
                                    "at_peak_ratio_of_transformers_ttft": gflop / peak / t["ttft_s"],
                                    "phiforge_prefill_fraction_of_peak": gflop / peak / p["ttft_s"]})
    wbytes = weight_bytes_per_token(ours.model)
    roof = report["copy_bandwidth_gbs"] * 1e9 / wbytes
    entry["roofline"] = {"weight_bytes_per_token": wbytes, "roofline_tokens_per_s": roof,
                         "fraction": p["decode_tokens_per_s"] / roof,
                         "fraction_of_read_bandwidth": p["decode_tokens_per_s"] * wbytes / 1e9
                         / report["read_bandwidth_gbs"]}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    n, batches = args.new_tokens, [int(b) for b in args.batches.split(",")]
    report: dict = {"model": args.model, "prompt_tokens": PROMPT_LEN, "new_tokens": n, "repeats": args.repeats,
                    "threads": torch.get_num_threads(), "copy_bandwidth_gbs": round(copy_bandwidth_gbs(), 2),
                    "read_bandwidth_gbs": round(read_bandwidth_gbs(), 2)}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        # prefix cache off (the default): every repeat sends the same prompt, and TTFT means a cold prefill
        ours = Generator(load_model(args.model, dtype=dtype), tok, prefix_cache=False)
        ours.stop_ids = frozenset()  # decode exactly n tokens, as min_new_tokens does on transformers' side
        hf = Phi3ForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
        warm = make_prompts(tok, 1)
        run_phiforge(ours, warm, 4), run_transformers(hf, warm, 4)
        for batch in batches:
            entry = measure_batch(ours, hf, tok, batch, n, args)
            if batch == 1:
                batch1_extras(entry, ours, hf, tok, make_prompts(tok, 1)[0], report, args.repeats)
            report[f"{dtype_name}_batch{batch}"] = entry
        del ours, hf
    if not args.no_nf4 and not args.quick:
        report["nf4_bfloat16_batch1"] = nf4_batch1(args.model, tok, n, args.repeats)
    llama_py = args.llama_python or (sys.executable if importlib.util.find_spec("llama_cpp") else None)
    report["llama_cpp"] = (run_llama_cpp(llama_py, make_prompts(tok, 1)[0], n, args.repeats) if llama_py
                           else "not installed (pass --llama-python)")
    print(json.dumps(report, indent=1, default=lambda x: round(x, 4) if isinstance(x, float) else str(x)))


if __name__ == "__main__":
    main()
