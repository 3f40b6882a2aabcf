"""`make demo`, part 3: QLoRA-fine-tune the default model on the bundled water-utility chat set, before and after.

The question asks for a made-up fact (Calder Valley Water's emergency number, from data/docs/) that the base model
cannot know. We load the default model with its decoder projections in NF4, answer greedily, train LoRA adapters
on data/train.jsonl for a few steps through the fused NF4+LoRA path, and answer again with the adapter attached
(unmerged). A few dozen steps at a high learning rate are enough for a 135M model to memorize a phone number.

    python -m phiforge.demo_finetune [--steps 20] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from phiforge.engine.formats.default_model import default_model_path
from phiforge.engine.formats.loader import load_model
from phiforge.engine.model.lora import lora_modules
from phiforge.engine.model.tokenizer import load_tokenizer
from phiforge.engine.serve.generate import Generator
from phiforge.engine.train.config import TrainConfig
from phiforge.engine.train.loop import finetune

DATA = Path(__file__).resolve().parent.parent / "data"
QUESTION = "What is Calder Valley Water's emergency phone number?"
SYSTEM = "You are the customer assistant of Calder Valley Water, a regional water utility."
EXPECTED = "0800 555 0192"


def _answer(model, tok, question: str, max_new_tokens: int = 40) -> str:
    """Greedy answer to one chat question."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    model.eval()
    return Generator(model, tok).generate(messages, max_new_tokens=max_new_tokens, temperature=0)[0].text.strip()


def run_finetune_demo(steps: int = 20, out: str | Path | None = None, lr: float = 3e-3, batch_size: int = 8,
                      question: str = QUESTION, data: str | Path | None = None) -> dict:
    """Train a QLoRA adapter for `steps` steps and print the answer to `question` without and with it."""
    with training_threads():
        return _run(steps, out, lr, batch_size, question, data)


@contextmanager
def training_threads() -> Iterator[None]:
    """One torch thread while the machine is oversubscribed, torch's own count back afterwards."""
    threads = torch.get_num_threads()
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        # On an oversubscribed machine OpenMP fork/join waits for descheduled threads: one thread is the safe choice.
        torch.set_num_threads(1)
        print(f"(load average {os.getloadavg()[0]:.1f} > {os.cpu_count()} cores: training on 1 thread)")
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run(steps: int, out: str | Path | None, lr: float, batch_size: int, question: str,
         data: str | Path | None) -> dict:
    path = default_model_path()
    tok = load_tokenizer(path)
    model = load_model(path, dtype=torch.bfloat16, quant="nf4")
    before = _answer(model, tok, question)
    print(f"user> {question}\nbase model (NF4, no adapter)> {before}", flush=True)

    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="phiforge-qlora-"))
    config = TrainConfig(data=str(data or DATA / "train.jsonl"), out=str(out), model=str(path), method="qlora",
                         eval_data=str(DATA / "eval.jsonl"), max_steps=steps, lr=lr, batch_size=batch_size, rank=16,
                         alpha=32, dropout=0.0, seq_len=256, warmup_steps=2, schedule="cosine")
    t0 = time.perf_counter()
    summary = finetune(config, base_model=model, tokenizer=tok)
    took = time.perf_counter() - t0
    model = summary["model"]
    assert any(True for _ in lora_modules(model))
    after = _answer(model, tok, question)
    print(f"with the QLoRA adapter ({steps} steps, {took:.0f} s, adapter in {out})> {after}")
    first, last = summary["losses"][0], summary["final_loss"]
    print(f"train loss {first:.3f} -> {last:.3f}; held-out loss {summary['eval_loss']:.3f} "
          f"(ppl {summary['eval_ppl']:.2f}); the expected answer contains {EXPECTED!r}: "
          f"before {EXPECTED in before}, after {EXPECTED in after}")
    return dict(before=before, after=after, out=str(out), seconds=took, losses=summary["losses"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)
    run_finetune_demo(steps=args.steps, out=args.out, lr=args.lr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
