"""`make demo`, part 4: RAG or fine-tuning? The five modes of `phiforge evaluate` on the bundled test questions.

1. The demo index of part 2 (the bundled water-utility documents), brought up to date.
2. Two LoRA adapters trained on data/qa/train.jsonl, the way `phiforge finetune` trains them: `ft` on closed-book
   rows (question -> answer) and `raft` on RAFT rows (each question with chunks retrieved from the demo index, the
   gold among them with probability 0.8, the target quoting and citing it). They are kept in
   $PHIFORGE_HOME/demo-eval/ with a key of everything that shapes them (options, Q/A file, documents); a rerun whose
   key matches reuses them instead of training again.
3. `evaluate` answers every question of data/qa/test.jsonl in the modes base, rag, ft, rag+ft and raft+rag, and
   prints the table (with 95% bootstrap intervals) and the recommendation written from it; the report files
   (Markdown, JSON, PNG chart, per-question JSONL) go to $PHIFORGE_HOME/demo-eval/report.
4. Structured answers: `evaluate --json-schema data/schemas/tariff.json` on data/qa/tariffs.jsonl (questions whose
   answers are JSON fields) in the base and rag modes: how many answers are valid JSON of the schema, and how many
   of their fields are right; the report goes to $PHIFORGE_HOME/demo-eval/report-json.

    python -m phiforge.demo_evaluate [--steps 60] [--raft-steps 30] [--retrain]
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

from phiforge.commands.finetune import prepare_data
from phiforge.demo_finetune import training_threads
from phiforge.engine.atomic import write_json_atomic
from phiforge.engine.formats.default_model import default_model_path
from phiforge.engine.paths import phiforge_home
from phiforge.engine.serve.constraint import read_schema
from phiforge.engine.train.config import TrainConfig
from phiforge.engine.train.loop import finetune
from phiforge.evaluation import evaluate
from phiforge.evaluation.report import markdown
from phiforge.retrieval.demo import data_dir, demo_index_dir, refresh_demo_index
from phiforge.retrieval.store import Index

KEY_FILE = "demo_key.json"


def _home() -> Path:
    return phiforge_home() / "demo-eval"


def _sha(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _configs(steps: int, raft_steps: int, lr: float, index: Path, out: Path) -> dict[str, TrainConfig]:
    data = data_dir()
    # bf16 without gradient checkpointing: a 135M model's activations fit, and it trains ~2x faster than fp32 with it
    common = dict(data=str(data / "qa" / "train.jsonl"), model=str(default_model_path()), method="lora", lr=lr,
                  rank=16, alpha=32, dropout=0.0, warmup_steps=4, schedule="cosine", seed=0, dtype="bfloat16",
                  gradient_checkpointing=False)
    return {"ft": TrainConfig(out=str(out / "ft"), max_steps=steps, batch_size=8, seq_len=256, **common),
            # RAFT rows carry their sources: k=2 keeps a row under 512 tokens (k=4 needs 1024, several times slower)
            "raft": TrainConfig(out=str(out / "raft"), max_steps=raft_steps, batch_size=4, seq_len=512, raft=True,
                                index=str(index), raft_k=2, raft_p=0.8, **common)}


def _key(config: TrainConfig) -> dict:
    data = data_dir()
    # paths differ between checkouts and say nothing of the content: the hashes below stand for them
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("out", "index", "model", "data")}
    key = {"config": fields, "qa_sha256": _sha([Path(config.data)]),
           "docs_sha256": _sha([p for p in (data / "docs").iterdir() if p.is_file()])}
    return json.loads(json.dumps(key))  # as read back from its file: tuples become lists


def _adapter(name: str, config: TrainConfig, retrain: bool) -> Path:
    out = Path(config.out)
    key = _key(config)
    if not retrain and (out / KEY_FILE).is_file() and json.loads((out / KEY_FILE).read_text()) == key:
        print(f"{name}: reusing the adapter in {out} (trained with these options on this data; --retrain trains "
              "it again)")
        return out
    if out.exists():
        shutil.rmtree(out)
    print(f"{name}: training {config.max_steps} LoRA steps on {config.data}" + (" (RAFT rows)" if config.raft else
                                                                                 " (closed-book rows)"), flush=True)
    t0 = time.perf_counter()
    summary = finetune(prepare_data(config))
    print(f"{name}: train loss {summary['losses'][0]:.3f} -> {summary['final_loss']:.3f} in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    write_json_atomic(out / KEY_FILE, key)  # last: an interrupted run is never taken as trained
    return out


def prepare(steps: int = 60, raft_steps: int = 30, lr: float = 3e-3, retrain: bool = False) -> tuple[Path, dict]:
    """The demo index (refreshed) and the ft and raft adapters (trained, or reused when their key matches)."""
    index = demo_index_dir()
    with Index.open(index) as ix:
        refresh_demo_index(ix)
    with training_threads():
        configs = _configs(steps, raft_steps, lr, index, _home())
        return index, {name: _adapter(name, cfg, retrain) for name, cfg in configs.items()}


def run_evaluate_demo(steps: int = 60, raft_steps: int = 30, lr: float = 3e-3, retrain: bool = False, k: int = 3,
                      max_new_tokens: int = 48) -> dict:
    """Train (or reuse) the ft and raft adapters, evaluate the five modes on the test split, print the table."""
    home = _home()
    index, adapters = prepare(steps, raft_steps, lr, retrain)
    test = data_dir() / "qa" / "test.jsonl"
    print(f"\nevaluate: {test} in five modes (greedy, {max_new_tokens} new tokens, top-{k} retrieval)", flush=True)
    report = evaluate(None, test, index=index, adapters=adapters, k=k, out=home / "report",
                      max_new_tokens=max_new_tokens, max_batch=16,
                      log=lambda s: print(f"  {s}", flush=True))
    print()
    print(markdown(report), end="")
    print(f"\nreport files (Markdown, JSON, chart.png, per-question results.jsonl) in {home / 'report'}")
    structured(index, k, home / "report-json")
    return report


def structured(index: Path, k: int, out: Path) -> dict:
    """Step 4: structured answers held to a schema, scored for validity and per-field exact match."""
    data, schema = data_dir() / "qa" / "tariffs.jsonl", data_dir() / "schemas" / "tariff.json"
    print(f"\nevaluate --json-schema {schema.name}: {data.name}, answers as JSON fields (base and rag)", flush=True)
    report = evaluate(None, data, index=index, modes="base,rag", k=k, out=out, max_new_tokens=96, max_batch=8,
                      json_schema=read_schema(schema), log=lambda s: print(f"  {s}", flush=True))
    print()
    print(markdown(report), end="")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="training steps of the ft adapter")
    ap.add_argument("--raft-steps", type=int, default=30, help="training steps of the raft adapter")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--retrain", action="store_true", help="train the adapters even if the kept ones match")
    args = ap.parse_args(argv)
    run_evaluate_demo(steps=args.steps, raft_steps=args.raft_steps, lr=args.lr, retrain=args.retrain)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
