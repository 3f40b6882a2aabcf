"""`phiforge finetune`: a hand-written LoRA / QLoRA training loop.

One optimizer step:

    micro-batches b_1..b_k (k = grad_accum)        N = Σ_j labelled_tokens(b_j)      (known before any forward)
    for each b_j:  (Σ_{t in b_j} −log p(y_t)) / N  .backward()                       grads accumulate in A, B
    clip ‖g‖ ≤ max_grad_norm;  lr ← schedule(step);  AdamW step;  zero grads

Why divide every micro-batch by the step's total N rather than averaging per-micro-batch means: a micro-batch with
10 labelled tokens and one with 1000 would otherwise weigh the same, so accumulating k micro-batches would not
equal one batch k times larger (transformers#34191). With N, the step's gradient is exactly the gradient of the
mean token loss over everything the step saw, however it is split.

The base is frozen (bf16/fp32 for LoRA, NF4 for QLoRA); only the LoRA A/B matrices (fp32) get gradients and AdamW
state. Activations are checkpointed per decoder layer (non-reentrant), the loss never materializes full logits
(engine/loss.py), and on CUDA the forward runs under bf16 autocast. Schedule: linear warmup to lr, then cosine or
linear decay towards 0. See engine/train_state.py for checkpoints that resume bit-for-bit.

Outputs in OUT/: the final adapter (PEFT format), training_args.json, metrics.jsonl (one record per optimizer step,
plus eval records), loss_curve.png, checkpoint-<step>/ directories.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch

from .adapter import save_adapter
from .data import DataError, Loader, load_dataset
from .lora import apply_lora, trainable_parameters
from .loss import lm_loss_sum
from .model import LINEAR_NAMES
from .train_state import latest_checkpoint, load_checkpoint, save_checkpoint


def lr_at(step: int, base_lr: float, total: int, warmup: int, schedule: str) -> float:
    """Learning rate of optimizer step `step` (0-based): warmup (step+1)/warmup · lr, then decay towards 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    if schedule == "constant":
        return base_lr
    raise ValueError(f"schedule must be cosine, linear or constant, got {schedule!r}")


def step_batches(loader: Loader, step: int, grad_accum: int) -> tuple[list, int]:
    """The micro-batches of optimizer step `step` and their total labelled-token count N (the loss divisor)."""
    batches = [loader.batch(step * grad_accum + j) for j in range(grad_accum)]
    n_labels = sum(b.n_labels for b in batches)
    if n_labels == 0:
        raise DataError(f"step {step}: every token of its {grad_accum} micro-batch(es) is masked "
                        "(no assistant/completion tokens): nothing to learn")
    return batches, n_labels


@torch.no_grad()
def evaluate(model, loader: Loader, device, autocast) -> tuple[float, float]:
    """Mean token NLL over the whole loader and its perplexity exp(NLL)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for m in range(len(loader)):
        b = loader.batch(m).to(device)
        with autocast():
            total += float(lm_loss_sum(model, b.input_ids, b.targets, b.position_ids, b.segment_ids))
        count += b.n_labels
    model.train(was)
    nll = total / max(count, 1)
    return nll, math.exp(min(nll, 50.0))


def plot_losses(metrics_path: Path, png: Path) -> None:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    recs = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)


def _rewrite_metrics(path: Path, upto_step: int) -> None:
    """On resume, drop records the interrupted run wrote after its last checkpoint (they will be redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= upto_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def finetune(model_path: str | Path, data: str | Path, out: str | Path, method: str = "lora",
             eval_data: str | Path | None = None, max_steps: int | None = None, epochs: int = 1, lr: float = 2e-4,
             rank: int = 16, alpha: float = 32, dropout: float = 0.05, targets=LINEAR_NAMES, seq_len: int = 512,
             batch_size: int = 4, grad_accum: int = 1, seed: int = 0, save_every: int | None = None,
             resume: bool = False, pack: bool = False, warmup_steps: int | None = None, warmup_ratio: float = 0.03,
             schedule: str = "cosine", max_grad_norm: float = 1.0, weight_decay: float = 0.0,
             eval_every: int | None = None, skip_bad: bool = False, use_rslora: bool = False,
             gradient_checkpointing: bool = True, dtype: str | torch.dtype | None = None, device: str | None = None,
             progress: bool = True, model=None, tokenizer=None) -> dict:
    """Fine-tune `model_path` on `data` (JSONL) with LoRA or QLoRA; the adapter lands in `out`.

    Returns a summary: steps, final train loss, eval loss/ppl, losses per step, paths. `model`/`tokenizer` may be
    passed pre-loaded (tests, demo); a passed model must not have LoRA applied yet."""
    from .loader import load_model  # noqa: PLC0415
    from .tokenizer import load_tokenizer  # noqa: PLC0415
    if method not in ("lora", "qlora"):
        raise ValueError(f"method must be 'lora' or 'qlora', got {method!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    targets = tuple(targets.split(",")) if isinstance(targets, str) else tuple(targets)

    tok = tokenizer or load_tokenizer(model_path)
    if model is None:
        if dtype is None:  # bf16 base: on CUDA under autocast; on CPU (AVX512-BF16/AMX) bf16 GEMMs run ~3x fp32
            dtype = torch.bfloat16
        model = load_model(model_path, dtype=dtype, device=device, quant="nf4" if method == "qlora" else None)
    names = apply_lora(model, rank, alpha, dropout, targets, use_rslora)
    model.gradient_checkpointing = gradient_checkpointing
    model.train()
    params = dict(trainable_parameters(model))

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    samples, stats = load_dataset(data, tok, seq_len, skip_bad)
    loader = Loader(samples, batch_size, seq_len, pad_id, seed, packed=pack)
    eval_loader = None
    if eval_data is not None:
        ev_samples, _ = load_dataset(eval_data, tok, seq_len, skip_bad)
        eval_loader = Loader(ev_samples, batch_size, seq_len, pad_id, seed, packed=pack, shuffle=False)
    total = max_steps if max_steps is not None else epochs * -(-len(loader) // grad_accum)
    if total <= 0:
        raise ValueError(f"nothing to do: {total} optimizer steps")
    warmup = warmup_steps if warmup_steps is not None else math.ceil(warmup_ratio * total)

    config = dict(model=str(model_path), method=method, data=str(data), lr=lr, rank=rank, alpha=alpha,
                  dropout=dropout, targets=list(targets), seq_len=seq_len, batch_size=batch_size,
                  grad_accum=grad_accum, seed=seed, pack=pack, schedule=schedule, warmup_steps=warmup,
                  total_steps=total, use_rslora=use_rslora, max_grad_norm=max_grad_norm, weight_decay=weight_decay,
                  epochs=epochs, eval_data=None if eval_data is None else str(eval_data))
    opt = torch.optim.AdamW(list(params.values()), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    metrics = out / "metrics.jsonl"
    step = 0
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise FileNotFoundError(f"{out}: --resume given but there is no checkpoint-* directory to resume from")
        step = load_checkpoint(ckpt, model, opt, params, config)["step"]
        _rewrite_metrics(metrics, step)
    elif metrics.exists():
        metrics.unlink()
    (out / "training_args.json").write_text(json.dumps(config, indent=2) + "\n")

    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext
    n_params = sum(p.numel() for p in params.values())
    print(f"finetune: {method}, {len(names)} LoRA sites, {n_params:,} trainable parameters; {stats.rows} rows "
          f"({stats.skipped_bad} bad skipped, {stats.truncated} truncated to {seq_len}, "
          f"{stats.dropped_unlabelled} dropped with no labels left), {len(loader)} batches/epoch, {total} steps")
    bar = None
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415
        bar = tqdm(total=total, initial=step, desc="finetune", unit="step")
    losses: list[float] = []
    last_eval = None
    with open(metrics, "a") as mf:
        def record(rec: dict) -> None:
            mf.write(json.dumps(rec) + "\n")
            mf.flush()

        while step < total:
            t0 = time.perf_counter()
            batches, n_labels = step_batches(loader, step, grad_accum)
            lr_now = lr_at(step, lr, total, warmup, schedule)
            for g in opt.param_groups:
                g["lr"] = lr_now
            loss_sum = 0.0
            for b in batches:
                b = b.to(device)
                with autocast():
                    s = lm_loss_sum(model, b.input_ids, b.targets, b.position_ids, b.segment_ids)
                (s / n_labels).backward()
                loss_sum += float(s.detach())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm))
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            loss = loss_sum / n_labels
            n_tok = sum(b.n_tokens for b in batches)
            losses.append(loss)
            record(dict(step=step, loss=loss, lr=lr_now, tokens_per_s=n_tok / dt,
                        labelled_tokens_per_s=n_labels / dt, grad_norm=grad_norm,
                        epoch=(step * grad_accum) / len(loader)))
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{n_tok / dt:.0f}", lr=f"{lr_now:.2e}")
                bar.update(1)
            if eval_loader is not None and ((eval_every and step % eval_every == 0) or step == total):
                nll, ppl = evaluate(model, eval_loader, device, autocast)
                last_eval = (nll, ppl)
                record(dict(step=step, eval_loss=nll, eval_ppl=ppl))
            if save_every and step % save_every == 0 and step < total:
                save_checkpoint(out, model, opt, params, step, step * grad_accum, config)
                plot_losses(metrics, out / "loss_curve.png")
    if bar is not None:
        bar.close()
    save_adapter(model, out, str(model_path))
    plot_losses(metrics, out / "loss_curve.png")
    summary = dict(steps=step, losses=losses, final_loss=losses[-1] if losses else None, out=str(out),
                   eval_loss=None if last_eval is None else last_eval[0],
                   eval_ppl=None if last_eval is None else last_eval[1], trainable_parameters=n_params,
                   truncated=stats.truncated, skipped_bad=stats.skipped_bad)
    print(f"finetune: done, {step} steps, adapter in {out}"
          + (f", eval loss {last_eval[0]:.4f} (ppl {last_eval[1]:.2f})" if last_eval else ""))
    summary["model"] = model
    return summary


# ---- CLI -----------------------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="base model directory (default: the bundled default model)")
    p.add_argument("--data", required=True, help="training JSONL ({messages} or {prompt, completion} rows)")
    p.add_argument("--eval", dest="eval_data", default=None, help="held-out JSONL for eval loss / perplexity")
    p.add_argument("--method", choices=["lora", "qlora"], default="lora")
    p.add_argument("--out", required=True, help="output directory (adapter, metrics, checkpoints)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--targets", default=",".join(LINEAR_NAMES), help="comma-separated: " + ",".join(LINEAR_NAMES))
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N optimizer steps")
    p.add_argument("--resume", action="store_true", help="continue from the newest OUT/checkpoint-*")
    p.add_argument("--pack", action="store_true", help="pack samples into seq-len rows (block-causal mask)")
    p.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed JSONL lines")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="base weight / compute dtype (default bfloat16; LoRA weights are always fp32)")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is much faster on an oversubscribed machine)")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = args.model
    if model_path is None:
        from .fetch import default_model_path  # noqa: PLC0415
        model_path = default_model_path()
    finetune(model_path, args.data, args.out, method=args.method, eval_data=args.eval_data,
             max_steps=args.max_steps, epochs=args.epochs, lr=args.lr, rank=args.rank, alpha=args.alpha,
             dropout=args.dropout, targets=args.targets, seq_len=args.seq_len, batch_size=args.batch_size,
             grad_accum=args.grad_accum, seed=args.seed, save_every=args.save_every, resume=args.resume,
             pack=args.pack, warmup_steps=args.warmup_steps, warmup_ratio=args.warmup_ratio,
             schedule=args.schedule, max_grad_norm=args.max_grad_norm, weight_decay=args.weight_decay,
             eval_every=args.eval_every, skip_bad=args.skip_bad, use_rslora=args.rslora,
             gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype)
    return 0
