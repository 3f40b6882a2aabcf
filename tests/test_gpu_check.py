"""bench/gpu_check.py in CI's mode (`--device cpu --tiny`, the kernels under Triton's interpreter), so the prepared
CUDA check never rots: every part must pass, or skip because this machine has no CUDA device.

It runs as a subprocess, as `make gpu-check CHECK_DEVICE=cpu` does: the script sets its own environment up
(PHIFORGE_KERNELS=triton) and must work from the command line, not only inside pytest's process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
PARTS = {"kernels", "model_triton", "qlora_train", "generate", "cuda_graph", "nf4_speed", "lora_speed",
         "decode_speed", "train_speed"}


def test_gpu_check_cpu_tiny(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("PHIFORGE_KERNELS", None)
    p = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=900)
    report_path = tmp_path / "gpu_check.json"
    assert report_path.is_file(), f"no JSON written (exit {p.returncode}):\n{p.stderr[-4000:]}"
    report = json.loads(report_path.read_text())
    assert (tmp_path / "gpu_check.log").is_file()
    assert set(report["parts"]) == PARTS
    problems = []
    for name, res in report["parts"].items():
        if res["status"] == "fail":
            problems.append(f"{name} failed: {res['error']}\n{res['traceback']}")
        elif res["status"] == "skip" and "cuda" not in res["reason"].lower():
            problems.append(f"{name} skipped for a reason other than the missing CUDA device: {res['reason']}")
        elif res["status"] not in ("ok", "skip"):
            problems.append(f"{name}: unknown status {res['status']}")
    assert not problems, "\n\n".join(problems)
    assert p.returncode == 0, p.stderr[-4000:]
    assert report["parts"]["cuda_graph"]["status"] == "skip"  # this machine has no CUDA device
    assert report["environment"]["device"] == "cpu" and report["tiny"] is True
    # --tiny trains the tiny checkpoint, not Phi-3-mini's shapes (15 GB of fp32 weights on this machine)
    train = report["parts"]["train_speed"]["result"]
    assert all(train[f"phiforge_{m}"]["peak_memory_bytes"] < 8 * 2**30 for m in ("lora", "qlora"))
