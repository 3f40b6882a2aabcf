"""`make demo`: the whole story on the default model, end to end, on a CPU.

  1. chat:      the default model (SmolLM2-135M-Instruct in Phi-3 layout) answers a question, streamed
  2. RAG:       index the bundled documents of one (fictional) water utility, answer questions with citations
  3. QLoRA:     fine-tune on the bundled chat set for a few steps, and show the adapter changing the answer
  4. evaluate:  RAG or fine-tuning? base, rag, ft, rag+ft and raft+rag side by side on the bundled test questions,
                the table with its intervals and the recommendation (phiforge/demo_evaluate.py)

    python -m phiforge.demo [--skip chat,rag,qlora,evaluate]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

from phiforge.demo_evaluate import run_evaluate_demo
from phiforge.demo_finetune import run_finetune_demo
from phiforge.engine.pretrained import compute_dtype, load_generator
from phiforge.retrieval.demo import run_demo


def _banner(title: str) -> None:
    print(f"\n{'=' * 100}\n{title}\n{'=' * 100}", flush=True)


def demo_chat() -> None:
    gen = load_generator(dtype=compute_dtype())
    question = "What is the capital of France? Answer briefly."
    print(f"user> {question}\nassistant> ", end="", flush=True)
    t0 = time.perf_counter()
    for piece in gen.stream([{"role": "user", "content": question}], max_new_tokens=48, temperature=0):
        print(piece, end="", flush=True)
    print(f"\n[{time.perf_counter() - t0:.2f} s]")


def demo_qlora() -> None:
    # the adapter is the demo's to show, not to keep: nothing is left behind in the temp folder
    with tempfile.TemporaryDirectory(prefix="phiforge-qlora-") as out:
        run_finetune_demo(out=out)


PARTS = {"chat": ("1. Chat with the default model", demo_chat),
         "rag": ("2. RAG: a water utility's documents, answers with citations", run_demo),
         "qlora": ("3. QLoRA: fine-tune the default model on the bundled set, before and after", demo_qlora),
         "evaluate": ("4. RAG or fine-tuning? Five modes measured on the bundled test questions", run_evaluate_demo)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="phiforge end-to-end demo")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: " + ",".join(PARTS))
    args = ap.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    for name, (title, fn) in PARTS.items():
        if name in skip:
            continue
        _banner(title)
        fn()
    return 0


if __name__ == "__main__":
    sys.exit(main())
