"""A hand-written LoRA / QLoRA training loop: set-up, one optimizer step, eval and checkpoint, and `finetune`.

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
(engine/train/loss.py), and on CUDA the forward runs under bf16 autocast. Schedule: linear warmup to lr, then cosine or
linear decay towards 0. See engine/train/state.py for checkpoints that resume bit-for-bit.

Data-parallel (torchrun, `--nproc`): the same loop on every rank, each on its share of every micro-batch, N
all-reduced over ranks and the gradients reduced by DDP; rank 0 alone writes. See engine/train/distributed.py.

Stopping: SIGINT (Ctrl-C) or SIGTERM during the loop lets the current step finish, then writes a checkpoint and
the adapter so far and raises TrainingInterrupted (a KeyboardInterrupt: the CLI exits 130) saying how to resume; a
second signal stops at once. Ranks of a data-parallel run all-reduce their stop flag every step, so all stop after
the same step (under torchrun the agent escalates to SIGKILL after its grace period: a step plus a checkpoint must
fit in it). Besides --save-every, a checkpoint is written every --save-minutes of training (rank 0's clock, agreed
the same way), so a killed run loses at most that much. A run refuses an --out that holds an earlier run unless
--resume or --overwrite is given, and a run that fails before its first checkpoint removes the --out it created.

Options: engine/train/config.py (TrainConfig); the CLI layer: phiforge/commands/finetune.py.
Outputs in OUT/: the final adapter (PEFT format), training_args.json, metrics.jsonl (one record per optimizer step,
plus eval records), loss_curve.png, checkpoint-<step>/ directories.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from phiforge.engine.atomic import write_json_atomic
from phiforge.engine.formats.default_model import model_path
from phiforge.engine.formats.loader import load_model
from phiforge.engine.formats.peft import quant_of_method, save_adapter
from phiforge.engine.model.lora import apply_lora, trainable_parameters
from phiforge.engine.model.tokenizer import load_tokenizer

from . import distributed
from .config import TrainConfig, TrainConfigError, resume_changes
from .data import DataError, DataStats, Batches, load_dataset
from .distributed import SINGLE, World
from .loss import lm_loss_sum
from .metrics import plot_losses, rewrite_metrics
from .state import (STATE_JSON, StopSignals, TrainingInterrupted, check_out, clear_run, holds_run,
                          latest_checkpoint, load_checkpoint, rank_rng_state, read_state, save_checkpoint)

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


def step_batches(loader: Batches, step: int, grad_accum: int, world: World = SINGLE,
                 device: torch.device | None = None) -> tuple[list, int]:
    """The micro-batches of optimizer step `step` (this rank's shares) and the total labelled-token count N of
    the whole step over all ranks (the loss divisor)."""
    batches = [loader.batch(step * grad_accum + j) for j in range(grad_accum)]
    n_labels = sum(b.n_labels for b in batches)
    if world.size > 1:
        n_labels = int(distributed.all_reduce_sum([n_labels], world, device)[0])
    if n_labels == 0:
        raise DataError(f"step {step}: every token of its {grad_accum} micro-batch(es) is masked "
                        "(no assistant/completion tokens): nothing to learn")
    return batches, n_labels


@torch.no_grad()
def evaluate(model, loader: Batches, device, autocast, world: World = SINGLE) -> tuple[float, float]:
    """Mean token NLL over the whole loader and its perplexity exp(NLL); ranks take every world.size-th batch
    and the sums are reduced."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for m in range(world.rank, len(loader), world.size):
        b = loader.batch(m).to(device)
        with autocast():
            total += float(lm_loss_sum(model, b.input_ids, b.targets, b.position_ids, b.segment_ids))
        count += b.n_labels
    model.train(was)
    total, count = distributed.all_reduce_sum([total, count], world, device)
    nll = total / max(count, 1)
    return nll, math.exp(min(nll, 50.0))


# ---- set-up ----------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """A training run as set-up leaves it and each step advances it."""
    config: TrainConfig
    model: nn.Module
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    loader: Batches
    eval_loader: Batches | None
    total: int
    warmup: int
    device: torch.device
    stats: DataStats
    n_sites: int
    world: World = SINGLE
    ddp: nn.Module | None = None  # the model as the step runs it: DistributedDataParallel-wrapped when world > 1
    step: int = 0
    resume_changes: list[str] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def setup(config: TrainConfig, base_model: nn.Module | None = None, tokenizer: Any = None, world: World = SINGLE,
          device: torch.device | None = None) -> Run:
    """Load (or take) the base and tokenizer, apply LoRA, build the loaders and AdamW, resume if asked, and write
    training_args.json. `config.model` must be resolved (finetune does it). A data-parallel rank passes its
    `world` and `device` (distributed.init)."""
    c = config
    check_out(c)  # before any loading: a refusal is immediate
    ckpt, changes = _check_resume(c, world) if c.resume else (None, [])
    device = device or torch.device(c.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(c.seed)
    tok = tokenizer or load_tokenizer(c.model)
    if base_model is None:
        # bf16 base by default: half the bytes of fp32, and bf16 GEMMs are native on GPUs and on AVX512-BF16/AMX
        base_model = load_model(c.model, dtype=c.dtype or torch.bfloat16, device=device,
                                quant=quant_of_method(c.method))
    names = apply_lora(base_model, c.rank, c.alpha, c.dropout, c.targets, c.use_rslora)
    if world.size > 1:  # the same LoRA init on every rank, then each rank its own dropout masks
        torch.manual_seed(c.seed + 1_000_003 * world.rank)
    base_model.gradient_checkpointing = c.gradient_checkpointing
    base_model.train()
    params = dict(trainable_parameters(base_model))

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    samples, stats = load_dataset(c.data, tok, c.seq_len, c.skip_bad)
    loader = Batches(samples, c.batch_size, c.seq_len, pad_id, c.seed, packed=c.pack, rank=world.rank,
                    world_size=world.size)
    if len(loader.rows) < world.size:
        raise TrainConfigError(f"--nproc: {world.size} processes but the data gives only {len(loader.rows)} rows"
                               f"{' after packing' if c.pack else ''}: every process needs at least one", ("nproc",))
    eval_loader = None
    if c.eval_data is not None:
        ev_samples, _ = load_dataset(c.eval_data, tok, c.seq_len, c.skip_bad)
        eval_loader = Batches(ev_samples, c.batch_size, c.seq_len, pad_id, c.seed, packed=c.pack, shuffle=False)
    total = c.total_steps(len(loader))
    opt = torch.optim.AdamW(list(params.values()), lr=c.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=c.weight_decay)
    run = Run(c, base_model, params, opt, loader, eval_loader, total, c.warmup(total), device, stats, len(names),
              world)
    if world.main:  # only now, with the model and data loaded: a bad input leaves no folder behind
        if c.overwrite:
            clear_run(run.out)
        run.out.mkdir(parents=True, exist_ok=True)
    if ckpt is not None:
        _resume(run, ckpt, changes)
    elif world.main:
        (run.out / "metrics.jsonl").unlink(missing_ok=True)
    run.ddp = distributed.wrap(base_model, world, device)
    if world.main:
        write_json_atomic(run.out / "training_args.json", c.to_json())
    return run


def _check_resume(config: TrainConfig, world: World = SINGLE) -> tuple[Path, list[str]]:
    """The newest checkpoint and the options this run changes; raises on one that must match it
    (engine/train/config.py: RESUMABLE) and on a different number of ranks."""
    out = Path(config.out)
    ckpt = latest_checkpoint(out)
    assert ckpt is not None, "check_out refuses --resume without a checkpoint"
    state = read_state(ckpt)
    if state.get("world_size", 1) != world.size:
        raise TrainConfigError(f"{ckpt / STATE_JSON}: cannot resume: --nproc: the checkpoint's run had "
                               f"{state.get('world_size', 1)} process(es), this one has {world.size} (the data split "
                               "and every rank's RNG depend on it; use the same --nproc or torchrun world size)",
                               ("nproc",))
    return ckpt, resume_changes(state["config"], config, str(ckpt / STATE_JSON))


def _resume(run: Run, ckpt: Path, changes: list[str]) -> None:
    """Restore the checkpoint into the run and apply (and say) the changed resumable options."""
    run.resume_changes = changes
    rank = None if run.world.size == 1 else run.world.rank
    run.step = load_checkpoint(ckpt, run.model, run.optimizer, run.params, rank, run.device)["step"]
    # The restored param groups carry the checkpoint's weight decay; lr is set every step, decay must be set here.
    for g in run.optimizer.param_groups:
        g["weight_decay"] = run.config.weight_decay
    if not run.world.main:
        return
    for change in run.resume_changes:
        print(f"finetune: resume from {ckpt.name}: {change} (applied from step {run.step + 1})")
    rewrite_metrics(run.out / "metrics.jsonl", run.step)


# ---- one optimizer step; eval and checkpoint -------------------------------------------------------------------------

def train_step(run: Run) -> dict:
    """One optimizer step (see the module docstring); returns its metrics record."""
    c = run.config
    t0 = time.perf_counter()
    batches, n_labels = step_batches(run.loader, run.step, c.grad_accum, run.world, run.device)
    lr_now = lr_at(run.step, c.lr, run.total, run.warmup, c.schedule)
    for g in run.optimizer.param_groups:
        g["lr"] = lr_now
    loss_sum = 0.0
    for j, b in enumerate(batches):
        b = b.to(run.device)
        with distributed.sync_grads(run.ddp, last=j == len(batches) - 1):
            with run.autocast():
                s = lm_loss_sum(run.ddp, b.input_ids, b.targets, b.position_ids, b.segment_ids)
            # DDP averages the ranks' gradients; × world size turns that mean into their sum (exact at world 1)
            (s / n_labels * run.world.size).backward()
        loss_sum += float(s.detach())
    n_tok = sum(b.n_tokens for b in batches)
    loss_sum, n_tok = distributed.all_reduce_sum([loss_sum, n_tok], run.world, run.device)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(list(run.params.values()), c.max_grad_norm))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    dt = time.perf_counter() - t0
    return dict(step=run.step, loss=loss_sum / n_labels, lr=lr_now, tokens_per_s=n_tok / dt,
                labelled_tokens_per_s=n_labels / dt, grad_norm=grad_norm,
                epoch=(run.step * c.grad_accum) / len(run.loader))


def eval_and_checkpoint(run: Run, record: Callable[[dict], None], save_now: bool = False) -> tuple[float, float] | None:
    """After a step: evaluate on the cadence and at the end (returns (nll, ppl) when it did); checkpoint on the
    cadence or when `save_now` (every rank must pass the same), except at the end, where the final adapter is
    written instead."""
    c, result = run.config, None
    if run.eval_loader is not None and ((c.eval_every and run.step % c.eval_every == 0) or run.step == run.total):
        result = evaluate(run.model, run.eval_loader, run.device, run.autocast, run.world)
        record(dict(step=run.step, eval_loss=result[0], eval_ppl=result[1]))
    if (save_now or (c.save_every and run.step % c.save_every == 0)) and run.step < run.total:
        ranks_rng = None
        if run.world.size > 1:  # a collective: every rank hands its generators to rank 0, which writes them
            mine = rank_rng_state(run.device)
            ranks_rng = [dict(zip(mine, states)) for states in
                         zip(*(distributed.all_gather(t, run.world, run.device) for t in mine.values()))]
        if run.world.main:
            save_checkpoint(run.out, run.model, run.optimizer, run.params, run.step, run.step * c.grad_accum,
                            c.to_json(), ranks_rng=ranks_rng)
            plot_losses(run.out / "metrics.jsonl", run.out / "loss_curve.png")
    return result


# ---- the whole run ---------------------------------------------------------------------------------------------------

def finetune(config: TrainConfig | None = None, /, *, base_model: nn.Module | None = None, tokenizer: Any = None,
             **options: Any) -> dict:
    """Fine-tune with LoRA or QLoRA; the adapter lands in `config.out`.

        finetune(TrainConfig(data="train.jsonl", out="runs/x", method="qlora"))
        finetune(data="train.jsonl", out="runs/x", method="qlora")       # the same, fields as keywords
        finetune(config, max_steps=10)                                    # keywords override a config's fields

    `base_model`/`tokenizer` may be passed pre-loaded (tests, demo); the model must not have LoRA applied yet.
    Returns a summary: steps, losses per step, final train loss, eval loss/ppl, the trained model and optimizer,
    the resolved config and the options a resume changed.

    Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) this process is one rank of a data-parallel run; `nproc` > 1
    outside torchrun is the CLI's to launch (`phiforge finetune --nproc N`), not this function's."""
    if config is None:
        config = TrainConfig(**options)
    elif options:
        config = dataclasses.replace(config, **options)
    config = dataclasses.replace(config, model=str(model_path(config.model)))
    if config.nproc > 1 and not distributed.under_torchrun():
        raise TrainConfigError(f"--nproc {config.nproc}: finetune() trains in this one process; start the "
                               "processes with `phiforge finetune --nproc N` or torchrun", ("nproc",))
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    world, device = distributed.init(config.device)
    created = not Path(config.out).exists()
    try:
        if config.nproc > 1 and config.nproc != world.local_size:
            raise TrainConfigError(f"--nproc {config.nproc}: torchrun started {world.local_size} process(es) on this "
                                   "machine (under torchrun, leave --nproc out)", ("nproc",))
        summary = _train(setup(config, base_model, tokenizer, world, device))
        distributed.finish(world)
        return summary
    except BaseException as e:
        out = Path(config.out)
        # a run that failed before its first checkpoint leaves no folder it created (nothing in it to keep)
        if created and world.main and out.is_dir() and not isinstance(e, TrainingInterrupted) and not holds_run(out):
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
        distributed.shutdown(world)


def _stopped(run: Run, why: str) -> None:
    """After a stop request's checkpoint: write the adapter so far and raise TrainingInterrupted."""
    if run.world.main:
        save_adapter(run.model, run.out, run.config.model)
        plot_losses(run.out / "metrics.jsonl", run.out / "loss_curve.png")
    raise TrainingInterrupted(f"finetune stopped by {why} after step {run.step} of {run.total}: checkpoint "
                              f"{run.out / f'checkpoint-{run.step}'} and the adapter so far in {run.out}; the same "
                              "command with --resume continues")


def _train(run: Run) -> dict:
    c, stats, main = run.config, run.stats, run.world.main
    n_params = sum(p.numel() for p in run.params.values())
    ranks = f" x {run.world.size} processes" if run.world.size > 1 else ""
    if main:
        print(f"finetune: {c.method}, {run.n_sites} LoRA sites, {n_params:,} trainable parameters; {stats.rows} "
              f"rows ({stats.skipped_bad} bad skipped, {stats.truncated} truncated to {c.seq_len}, "
              f"{stats.dropped_unlabelled} dropped with no labels left), {len(run.loader)} batches/epoch, "
              f"{run.total} steps{ranks}")
    bar = tqdm(total=run.total, initial=run.step, desc="finetune", unit="step") if c.progress and main else None
    losses: list[float] = []
    last_eval = None
    with open(run.out / "metrics.jsonl", "a") if main else contextlib.nullcontext() as mf:
        def record(rec: dict) -> None:
            if mf is not None:
                mf.write(json.dumps(rec) + "\n")
                mf.flush()

        last_save = time.monotonic()
        with StopSignals(second_stops=not distributed.under_torchrun()) as stop:
            while run.step < run.total:
                rec = train_step(run)
                losses.append(rec["loss"])
                record(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                    lr=f"{rec['lr']:.2e}")
                    bar.update(1)
                due = main and c.save_minutes > 0 and time.monotonic() - last_save >= 60 * c.save_minutes
                # every rank must take the same branch (checkpointing is a collective): agree on both flags
                stopping, due = (v > 0 for v in distributed.all_reduce_sum(
                    [float(stop.requested is not None), float(due)], run.world, run.device))
                saves = stopping or due or bool(c.save_every and run.step % c.save_every == 0)
                last_eval = eval_and_checkpoint(run, record, save_now=stopping or due) or last_eval
                if saves:
                    last_save = time.monotonic()
                if stopping and run.step < run.total:
                    if bar is not None:
                        bar.close()
                    _stopped(run, stop.requested or "a signal on another rank")
    if bar is not None:
        bar.close()
    if main:
        save_adapter(run.model, run.out, c.model)
        plot_losses(run.out / "metrics.jsonl", run.out / "loss_curve.png")
        print(f"finetune: done, {run.step} steps, adapter in {run.out}"
              + (f", eval loss {last_eval[0]:.4f} (ppl {last_eval[1]:.2f})" if last_eval else ""))
    return dict(steps=run.step, losses=losses, final_loss=losses[-1] if losses else None, out=str(run.out),
                eval_loss=None if last_eval is None else last_eval[0],
                eval_ppl=None if last_eval is None else last_eval[1], trainable_parameters=n_params,
                truncated=stats.truncated, skipped_bad=stats.skipped_bad, model=run.model,
                optimizer=run.optimizer, config=c, resume_changes=run.resume_changes)
