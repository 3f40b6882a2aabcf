"""GGUF export on the default model: export time and file size per type, and llama.cpp's decode speed on each export
(where llama-cpp-python is installed), one JSON object.

    python -m phiforge.bench.bench_export [--model DIR] [--types f32,f16,bf16,q8_0,q4_0] [--tokens 64]
                                          [--llama-python PATH] [--out FILE.json]

llama.cpp runs in a child process when `--llama-python` names an interpreter that has it (or this one does); it is
never a dependency. Its greedy tokens on each export are reported beside phiforge's, so a file that loads but
computes something else shows up here too.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from phiforge.bench.report import emit
from phiforge.engine.formats.default_model import default_model_path
from phiforge.engine.formats.gguf.writer import TYPES, export_gguf
from phiforge.engine.formats.loader import load_model
from phiforge.engine.model.tokenizer import load_tokenizer
from phiforge.engine.serve.generate import Generator

PROMPT = [{"role": "user", "content": "Explain in three sentences why the sky is blue."}]

LLAMA_CHILD = r"""
import json, sys, time
from llama_cpp import Llama
path, n = sys.argv[1], int(sys.argv[2])
prompt = json.loads(sys.stdin.read())
llm = Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=2, verbose=False)
best, tokens = None, None
for _ in range(3):  # best of three: the machine is shared
    t0, times, out = time.perf_counter(), [], []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        times.append(time.perf_counter()); out.append(int(tok))
        if len(out) == n:
            break
    rate = (n - 1) / (times[-1] - times[0])
    best, tokens = max(best or 0, rate), out
print(json.dumps({"decode_tokens_per_s": best, "tokens": tokens}))
"""


def llama_cpp(python: str, path: Path, prompt: list[int], n: int) -> dict | str:
    out = subprocess.run([python, "-c", LLAMA_CHILD, str(path), str(n)], input=json.dumps(prompt),
                         capture_output=True, text=True)
    if out.returncode != 0:
        return f"failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the default model)")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens to decode per export")
    ap.add_argument("--llama-python", default=None, help="a Python with llama-cpp-python installed")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    model_dir = Path(args.model) if args.model else default_model_path()
    llama_py = args.llama_python or (sys.executable if importlib.util.find_spec("llama_cpp") else None)
    model = load_model(model_dir, dtype=torch.float32)
    tok = load_tokenizer(model_dir)
    prompt = tok.apply_chat_template(PROMPT)
    gen = Generator(model, tok)
    gen.stop_ids = frozenset()  # decode exactly --tokens tokens, as llama.cpp does
    [ours] = gen.generate([prompt], max_new_tokens=args.tokens, temperature=0)
    report = {"model": str(model_dir), "threads": torch.get_num_threads(), "prompt_tokens": len(prompt),
              "phiforge_fp32_decode_tokens_per_s": ours.decode_tokens_per_s, "types": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for t in args.types.split(","):
            path = Path(tmp) / f"model.{t}.gguf"
            t0 = time.perf_counter()
            export_gguf(model, model_dir, path, t)
            row = {"export_s": time.perf_counter() - t0, "file_mib": path.stat().st_size / 2**20}
            if llama_py:
                res = llama_cpp(llama_py, path, prompt, args.tokens)
                if isinstance(res, dict):
                    toks = res.pop("tokens")
                    same = next((i for i, (a, b) in enumerate(zip(toks, ours.token_ids)) if a != b), len(toks))
                    res["greedy_tokens_equal_phiforge"] = same  # leading tokens equal to phiforge's fp32 ones
                row["llama_cpp"] = res
            else:
                row["llama_cpp"] = "not installed (pass --llama-python)"
            report["types"][t] = row
            print(t, json.dumps(row), file=sys.stderr, flush=True)
    emit(report, args.out)


if __name__ == "__main__":
    main()
