"""Load time and peak memory for the default model: phiforge vs transformers, one JSON object on stdout.

Each loader runs in its own subprocess so one's peak RSS cannot hide the other's; "rss_after_import" is measured
before loading, so "load_peak_mb" (peak minus that) is what the load itself cost.

    python bench/bench_load.py [--model DIR] [--dtype bfloat16|float32] [--repeats N]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(2)
which, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
def rss_mb():  # current RSS from /proc (ru_maxrss is the peak)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
if which == "phiforge":
    from phiforge.engine import load_model
    load = lambda: load_model(path, dtype=dtype)
else:
    from transformers import Phi3ForCausalLM
    load = lambda: Phi3ForCausalLM.from_pretrained(path, dtype=dtype).eval()
base = rss_mb()
t0 = time.perf_counter()
model = load()
seconds = time.perf_counter() - t0
with torch.no_grad():  # both must produce the same thing: check one forward
    logits = model(torch.tensor([[1, 2, 3, 4]]))
    logits = logits if torch.is_tensor(logits) else logits.logits
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "rss_after_import_mb": base, "peak_rss_mb": peak,
                  "load_peak_mb": peak - base, "logit_checksum": float(logits.float().sum())}))
"""


def run(which: str, path: str, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, path, dtype], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{which} loader failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the default model)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.model is None:
        from phiforge.engine.formats.default_model import default_model_path
        args.model = str(default_model_path())
    results: dict = {"model": args.model, "dtype": args.dtype}
    for which in ("phiforge", "transformers"):
        try:
            runs = [run(which, args.model, args.dtype) for _ in range(args.repeats)]
        except RuntimeError as e:
            results[which] = {"error": str(e)}
            continue
        best = min(runs, key=lambda r: r["seconds"])
        results[which] = {**best, "seconds_all": [round(r["seconds"], 4) for r in runs]}
    p, t = results.get("phiforge", {}), results.get("transformers", {})
    if "seconds" in p and "seconds" in t:
        results["speedup_vs_transformers"] = t["seconds"] / p["seconds"]
        results["peak_ratio_vs_transformers"] = p["load_peak_mb"] / max(t["load_peak_mb"], 1e-9)
        results["same_logits"] = abs(p["logit_checksum"] - t["logit_checksum"]) <= 1e-2 * abs(t["logit_checksum"])
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
