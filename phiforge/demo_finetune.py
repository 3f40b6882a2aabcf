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
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent.parent / "data"
QUESTION = "What is Calder Valley Water's emergency phone number?"
SYSTEM = "You are the customer assistant of Calder Valley Water, a regional water utility."
EXPECTED = "0800 555 0192"


def _answer(model, tok, question: str, max_new_tokens: int = 40) -> str:
    """Greedy answer to one chat question (the generation developer's Generator when present)."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    model.eval()
    try:
        from phiforge.engine.generate import Generator  # noqa: PLC0415
    except ImportError:
        Generator = None
    if Generator is not None:
        return Generator(model, tok).generate(messages, max_new_tokens=max_new_tokens, temperature=0)[0].text.strip()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    out: list[int] = []
    with torch.no_grad():  # plain greedy loop without a cache: fine for 40 tokens of a 135M model
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids + out]), num_logits=1)[0, -1].argmax())
            if nxt in tok.stop_ids:
                break
            out.append(nxt)
    return tok.decode(out, skip_special_tokens=True).strip()


def run_finetune_demo(steps: int = 20, out: str | Path | None = None, lr: float = 3e-3, batch_size: int = 8,
                      question: str = QUESTION, data: str | Path | None = None) -> dict:
    """Train a QLoRA adapter for `steps` steps and print the answer to `question` without and with it."""
    threads = torch.get_num_threads()
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        # On an oversubscribed machine OpenMP fork/join waits for descheduled threads: measured here, the 30 steps
        # took 676 s on 2 threads and 178 s on 1 while other jobs ran. One thread is the safe choice then.
        torch.set_num_threads(1)
        print(f"(load average {os.getloadavg()[0]:.1f} > {os.cpu_count()} cores: training on 1 thread)")
    try:
        return _run(steps, out, lr, batch_size, question, data)
    finally:
        torch.set_num_threads(threads)


def _run(steps: int, out, lr: float, batch_size: int, question: str, data) -> dict:
    from phiforge.engine.fetch import default_model_path  # noqa: PLC0415
    from phiforge.engine.loader import load_model  # noqa: PLC0415
    from phiforge.engine.lora import lora_modules  # noqa: PLC0415
    from phiforge.engine.tokenizer import load_tokenizer  # noqa: PLC0415
    from phiforge.engine.train import finetune  # noqa: PLC0415

    path = default_model_path()
    tok = load_tokenizer(path)
    model = load_model(path, dtype=torch.bfloat16, quant="nf4")
    before = _answer(model, tok, question)
    print(f"user> {question}\nbase model (NF4, no adapter)> {before}", flush=True)

    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="phiforge-qlora-"))
    t0 = time.perf_counter()
    summary = finetune(path, data or DATA / "train.jsonl", out, method="qlora", eval_data=DATA / "eval.jsonl",
                       max_steps=steps, lr=lr, batch_size=batch_size, rank=16, alpha=32, dropout=0.0,
                       seq_len=256, warmup_steps=2, schedule="cosine", model=model, tokenizer=tok, progress=True)
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
