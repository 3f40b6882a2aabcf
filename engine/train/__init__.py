"""phiforge.engine.train: the LoRA / QLoRA training loop and what it stands on.

    loop.py         finetune(): the loop (grad accumulation, clipping, cosine schedule, eval, checkpoints, resume)
    config.py       TrainConfig: every option with its default and check; which may change on resume
    data.py         chat or prompt/completion JSONL -> token ids with loss masks -> (packed) batches
    metrics.py      metrics.jsonl on resume, and the loss curve drawn from it
    loss.py         the causal-LM loss without the (T, V) logits in memory, its gradient computed in forward
    state.py        resumable state (checkpoint-<step>/), the --out guards, Ctrl-C / SIGTERM handling
    memory.py       the memory model of a run on one GPU: what the bytes are, how many sequences fit
    distributed.py  data-parallel LoRA on torch.distributed: each rank's share, the reductions, --nproc N
"""
