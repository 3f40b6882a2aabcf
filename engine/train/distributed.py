"""Data-parallel LoRA / QLoRA on torch.distributed: the process group, each rank's share of a batch, the reductions
the training loop needs, and the launcher behind `phiforge finetune --nproc N`.

Every rank holds the whole frozen base (dense or NF4) and the same LoRA weights; DistributedDataParallel reduces the
LoRA gradients only. One optimizer step over N ranks, each at micro-batch b, with k = grad_accum:

    global micro-batch j (N·b rows, exactly what one process at micro-batch N·b takes) → rank r gets rows
        [r·n/N, (r+1)·n/N) of its n rows
    N = all_reduce_sum(labelled tokens of the rank's k shares)                       the step's global divisor
    for each share: (Σ_{t in share} −log p(y_t)) · world / N  .backward()     all-reduce on the k-th only (no_sync)
    DDP averages over ranks (÷ world) → every rank holds ∇ of the global mean token loss; identical clip and AdamW

so N ranks follow the one-process run to float rounding (different padding widths and summation order), provided
dropout is 0 (each rank draws its own masks). Only rank 0 writes files; the others compute and reduce.

World info comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT). Backend: nccl on CUDA, gloo on CPU. Outside torchrun, or with a world of one, nothing here touches
torch.distributed and training is exactly the one-process loop.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.run as torchrun
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """The rank that writes files, metrics and the progress bar."""
        return self.rank == 0


SINGLE = World()


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init(device: str | None) -> tuple[World, torch.device]:
    """Join torchrun's process group (if there is one of more than one) and pick this rank's device."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return SINGLE, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]),
                  int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
    kind = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type
    if kind == "cuda":
        dev = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device(kind)
        dist.init_process_group("gloo")
    return world, dev


def finish(world: World) -> None:
    """After a run that ended well on every rank: each waits for the others before any tears its connections
    down (a rank that left early, while rank 0 still wrote the adapter, made gloo abort the other's process on its
    half-closed socket). Not on a failure path: a rank that raised must not wait for ranks that never arrive."""
    if world.size > 1 and dist.is_initialized():
        dist.barrier()


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device(device: torch.device) -> torch.device:
    # nccl reduces device tensors only; gloo takes CPU tensors
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """Element-wise sum over ranks, in float64 (label counts stay exact integers)."""
    if world.size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather(t: torch.Tensor, world: World, device: torch.device) -> list[torch.Tensor]:
    """Every rank's `t` (same shape and dtype on all ranks), on CPU, in rank order."""
    if world.size == 1:
        return [t.cpu()]
    src = t.to(_comm_device(device)).contiguous()
    out = [torch.empty_like(src) for _ in range(world.size)]
    dist.all_gather(out, src)
    return [x.cpu() for x in out]


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """DDP over the trainable (LoRA) parameters only. The frozen base is neither broadcast at start (every rank
    loaded the same weights) nor bucketed, and buffers (rotary tables, NF4 codes) are never synced."""
    if world.size == 1:
        return model
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def sync_grads(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP reduces on the micro-batch that steps; the others accumulate locally (no_sync)."""
    if isinstance(model, DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def launch(module_argv: list[str], nproc: int, threads: int | None) -> int:
    """Run `python -m <module_argv>` as `nproc` ranks on this machine through torch.distributed.run (standalone
    rendezvous on a free local port). A rank that fails ends the job: torchrun stops the others and reports which
    rank failed and why; the return value is then 1."""
    # torchrun would set OMP_NUM_THREADS=1 itself (and warn); set it from --threads, the per-rank thread count
    os.environ.setdefault("OMP_NUM_THREADS", str(threads or max(1, (os.cpu_count() or 1) // nproc)))
    args = torchrun.parse_args(["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "-m",
                                module_argv[0]])
    # set after parsing: torchrun's parser would take a script flag such as --nproc for an abbreviation of its own
    args.training_script_args = module_argv[1:]
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        failed = ", ".join(f"rank {rank} ({_why(f)})" for rank, f in sorted(e.failures.items()))
        print(f"finetune: {failed} failed, so the job stopped", file=sys.stderr)
        return 1
    return 0


def _why(failure) -> str:
    if failure.exitcode < 0:
        return f"killed by signal {failure.signal_name()}"
    return f"exit code {failure.exitcode}"
