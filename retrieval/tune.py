"""Fine-tuning the MiniLM encoder on (question, gold passage) pairs: a multiple-negatives ranking loss.

The loss (Henderson et al. 2017, sentence-transformers' MultipleNegativesRankingLoss): a batch of B questions q_i,
each with its gold passage p_i and h hard negatives, is embedded; every question is scored against every passage of
the batch, s_ij = scale * cos(q_i, d_j), and a cross-entropy picks p_i out of all C = B*(1+h) candidates, so the
other questions' golds serve as in-batch negatives. scale = 20 (sentence-transformers' default): cosines live in
[-1, 1], and without the scale the softmax is nearly flat. A candidate known to be relevant to q_i (another
question's gold that q_i shares, a passage of q_i's own source documents) is masked out of q_i's row: pushing a
true positive away is the classic way such training goes wrong.

Hard negatives are mined with the untuned encoder: the best-ranked passages of each question that are not
relevant to it and score below (1 - MARGIN) times its gold's score; those scoring nearly as well as the gold are
likely unlabelled positives (sentence-transformers' `relative_margin`). By default they are drawn only from the other
training questions' golds, the passages the in-batch negatives come from too. Mined from the whole corpus, every
negative is a passage no training question answers, so the loss also teaches "a passage outside the training golds
is a wrong answer" -- false for exactly the passages that answer the questions nobody labelled, which are the ones
a tuned retriever is for. `remine` mines again with the partly tuned model before each later epoch (ANCE): its own
mistakes rather than the untuned encoder's.

Training embeds with MiniLM.forward itself (packed tokens, attention-mask mean, L2 normalisation), the function
queries and passages go through at search time; only the fused QKV copy made for inference is dropped, so the
gradients reach query/key/value. Modes: all weights, or LoRA on every linear of the six layers (rank r, alpha 2r);
the adapter is merged into the weights of the returned encoder with the same function the loader uses.

WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): the returned weights are
interpolate * tuned + (1 - interpolate) * untuned. With a few hundred pairs a run long enough to learn the domain also
fits the pairs themselves; averaging with the untuned weights keeps what it learned that generalises and gives back
part of the fit. Interpolating between two fine-tunes of one model stays in a shared low-loss basin, so the mix is a
usable encoder, not a blend of two unrelated ones. In LoRA mode the merged update is linear in lora_B, so scaling
lora_B by the factor is the same interpolation.

Legend: B questions in a batch, C candidate passages (B golds then B*h hard negatives), H hidden 384, P packed tokens.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from phiforge.engine.atomic import atomic_dir
from phiforge.engine.model.lora import LoRALinear, lora_modules

from .encoder import (ENCODER_NAME, TUNED_CONFIG, TUNED_FORMAT, Encoder, MiniLM, Packing, base_sha256,
                      merge_lora_state, model_dir, tuned_name)
from .manifest import sha256_file

SCALE = 20.0
GRID_BUDGET = 2048  # padded tokens (texts x longest) per training forward
NEGATIVE_POOLS = ("golds", "corpus")  # TuneConfig.negatives_from: where hard negatives are mined
MARGIN = 0.05  # a candidate scoring above (1 - MARGIN) * gold is taken for an unlabelled positive, not a negative
LORA_TARGETS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense", "output.dense")


@dataclass
class TuneConfig:
    # defaults: the setting bench/bench_tune.py --select picked on chatterbot's tuning half
    epochs: int = 2
    lr: float = 1e-4
    batch: int = 32
    hard_negatives: int = 7  # per question; 0: in-batch negatives only
    mine_depth: int = 10  # hard negatives come from each question's top mine_depth passages
    lora_rank: int = 0  # 0: all weights
    weight_decay: float = 0.01
    warmup: float = 0.1  # share of the steps with a linear warm-up, then linear decay to 0
    seed: int = 0
    scale: float = SCALE
    interpolate: float = 1.0  # WiSE-FT: share of the tuned weights in the returned ones (1: the tuned weights)
    negatives_from: str = "golds"  # "golds": only other training questions' golds; "corpus": any passage
    remine: bool = False  # re-mine the hard negatives with the model being tuned before every epoch after the first

    def check(self) -> None:
        for flag, v, low in (("--epochs", self.epochs, 1), ("--batch", self.batch, 2),
                             ("--hard-negatives", self.hard_negatives, 0), ("--lora-rank", self.lora_rank, 0)):
            if v < low:
                raise ValueError(f"{flag}: must be >= {low}, got {v}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"--lr: must be a positive number, got {self.lr}")
        _check_pool(self.negatives_from)
        if not 0 < self.interpolate <= 1:
            raise ValueError(f"--interpolate: must be in (0, 1], got {self.interpolate}")


@dataclass(frozen=True)
class Pair:
    """A training question, the corpus id of its gold passage, and every corpus id that must never serve as its
    negative (relevant to it; the gold included)."""
    query: str
    gold: int
    relevant: frozenset[int]


@dataclass
class TuneResult:
    encoder: Encoder  # the tuned encoder, adapter merged
    losses: list[float] = field(default_factory=list)  # one per step
    seconds: float = 0.0
    steps: int = 0
    interrupted: bool = False


def _check_pool(pool: str) -> None:
    if pool not in NEGATIVE_POOLS:
        raise ValueError(f"--negatives-from: one of {', '.join(NEGATIVE_POOLS)}, got {pool!r}")


def mine_hard_negatives(enc: Encoder, corpus: list[str], pairs: list[Pair], k: int, depth: int = 10,
                        corpus_vecs: np.ndarray | None = None, pool: str = "corpus") -> list[list[int]]:
    """Up to k hard negatives per pair: its top-`depth` passages under `enc` that are not relevant to it and score
    below (1 - MARGIN) times its gold. pool "golds" draws them only from the pairs' gold passages."""
    if k == 0:
        return [[] for _ in pairs]
    _check_pool(pool)
    cv = enc.encode(corpus) if corpus_vecs is None else corpus_vecs  # (N, H)
    qv = enc.encode([p.query for p in pairs])  # (Q, H)
    scores = qv @ cv.T  # (Q, N)
    if pool == "golds":
        outside = np.ones(len(corpus), bool)
        outside[[p.gold for p in pairs]] = False
        scores[:, outside] = -np.inf
    out = []
    for p, row in zip(pairs, scores):
        top = np.argsort(-row, kind="stable")[:depth + len(p.relevant)]
        ceiling = (1 - MARGIN) * row[p.gold]
        out.append([int(j) for j in top if j not in p.relevant and -np.inf < row[j] < ceiling][:k])
    return out


def trainable_copy(enc: Encoder, lora_rank: int) -> MiniLM:
    """A training copy of the encoder's model: no fused QKV buffers, all weights or only LoRA A/B trainable."""
    model = MiniLM(enc.model.cfg)  # without the inference-only fused QKV copy, which would bypass query/key/value
    model.load_state_dict({k: v.detach().float().clone() for k, v in enc.model.state_dict().items()})
    model.train()
    if lora_rank:
        for p in model.parameters():
            p.requires_grad_(False)
        for i, layer in enumerate(model.encoder.layer):
            for t in LORA_TARGETS:
                lora = LoRALinear(layer.get_submodule(t), lora_rank, 2.0 * lora_rank)
                lora.use_fused = False  # BERT's linears carry a bias, which the fused kernel leaves out
                layer.set_submodule(t, lora)
    return model


def embed(model: MiniLM, ids: list[list[int]], grid_budget: int = GRID_BUDGET) -> torch.Tensor:
    """(N, H) unit vectors with autograd, in the order of `ids`. Texts are sorted by length and packed into
    forwards whose padded attention grid (count x longest) stays under `grid_budget` tokens: one forward over a
    step's mixed short questions and long passages would pad every one of them to the longest in the attention
    core. Each text's embedding depends only on its own tokens, so the grouping changes rounding, not the math."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    parts, start = [], 0
    while start < len(order):
        end = start + 1  # sorted order: the last text of a group is its longest
        while end < len(order) and (end + 1 - start) * len(ids[order[end]]) <= grid_budget:
            end += 1
        group = order[start:end]
        pk = Packing([len(ids[i]) for i in group])
        flat = torch.tensor([t for i in group for t in ids[i]], dtype=torch.long)  # (P,)
        parts.append(model(flat, pk))  # (len(group), H)
        start = end
    v = torch.cat(parts)  # (N, H) in sorted order
    return v[torch.argsort(torch.tensor(order))]  # (N, H) back in the order of ids


def mnrl_loss(q: torch.Tensor, d: torch.Tensor, cand: list[int], relevant: list[frozenset[int]],
              scale: float = SCALE) -> torch.Tensor:
    """Multiple-negatives ranking loss: q (B, H) questions, d (C, H) candidates whose first B are the golds in
    question order; cand[j] is candidate j's corpus id. Candidates relevant to q_i other than its own gold column
    are masked out of row i."""
    B = q.shape[0]
    logits = scale * q @ d.T  # (B, H)@(H, C) -> (B, C)
    mask = torch.tensor([[j != i and c in relevant[i] for j, c in enumerate(cand)] for i in range(B)])  # (B, C)
    logits = logits.masked_fill(mask, float("-inf"))
    return F.cross_entropy(logits, torch.arange(B))


def _lr_at(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def tune(enc: Encoder, corpus: list[str], pairs: list[Pair], cfg: TuneConfig,
         log: Callable[[str], None] | None = None, corpus_vecs: np.ndarray | None = None) -> TuneResult:
    """Fine-tune a copy of `enc` on `pairs` over `corpus`; `enc` itself is left as it was. Ctrl-C stops after the
    current step and returns what was trained so far (interrupted=True)."""
    cfg.check()
    if len(pairs) < 2:
        raise ValueError(f"need at least 2 training pairs for in-batch negatives, got {len(pairs)}")
    say = log or (lambda s: None)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    negs = mine_hard_negatives(enc, corpus, pairs, cfg.hard_negatives, cfg.mine_depth, corpus_vecs,
                               cfg.negatives_from)
    say(f"mined {sum(map(len, negs))} hard negatives for {len(pairs)} questions ({time.perf_counter() - t0:.1f} s)")
    q_ids = enc.token_ids([p.query for p in pairs])
    used = sorted({p.gold for p in pairs} | {j for n in negs for j in n})
    p_ids = dict(zip(used, enc.token_ids([corpus[j] for j in used])))
    model = trainable_copy(enc, cfg.lora_rank)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    per_epoch = math.ceil(len(pairs) / cfg.batch)
    total = per_epoch * cfg.epochs
    warm = int(cfg.warmup * total)
    res = TuneResult(enc)
    try:
        for epoch in range(cfg.epochs):
            if epoch and cfg.remine and cfg.hard_negatives:
                negs = _remine(model, enc, corpus, pairs, cfg, p_ids)
            order = list(range(len(pairs)))
            rng.shuffle(order)
            for s in range(0, len(order), cfg.batch):
                batch = order[s:s + cfg.batch]
                if len(batch) < 2:  # a lone question has no in-batch negative
                    continue
                cand = [pairs[i].gold for i in batch] + [j for i in batch for j in negs[i]]
                v = embed(model, [q_ids[i] for i in batch] + [p_ids[j] for j in cand])  # (B + C, H)
                loss = mnrl_loss(v[:len(batch)], v[len(batch):], cand, [pairs[i].relevant for i in batch], cfg.scale)
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * _lr_at(res.steps, total, warm)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                res.losses.append(float(loss.detach()))
                res.steps += 1
            say(f"epoch {epoch + 1}/{cfg.epochs}: mean loss {np.mean(res.losses[-per_epoch:]):.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    except KeyboardInterrupt:
        res.interrupted = True
        say(f"interrupted after {res.steps} steps")
    interpolate_(model, enc.model, cfg.interpolate, cfg.lora_rank)
    res.encoder = frozen_encoder(model, enc, cfg.lora_rank)
    res.seconds = time.perf_counter() - t0
    return res


def _remine(model: MiniLM, enc: Encoder, corpus: list[str], pairs: list[Pair], cfg: TuneConfig,
            p_ids: dict[int, list[int]]) -> list[list[int]]:
    """ANCE-style: hard negatives mined again with the partly tuned model (its own mistakes now, not the untuned
    encoder's); adds the new passages' token ids to p_ids."""
    live = Encoder(model, enc.tokenizer, enc.token_budget)  # MiniLM has no dropout: eval/train only flips a flag
    negs = mine_hard_negatives(live, corpus, pairs, cfg.hard_negatives, cfg.mine_depth, pool=cfg.negatives_from)
    model.train()
    new = sorted({j for n in negs for j in n} - p_ids.keys())
    p_ids.update(zip(new, enc.token_ids([corpus[j] for j in new])))
    return negs


@torch.no_grad()
def interpolate_(model: MiniLM, base: MiniLM, alpha: float, lora_rank: int) -> None:
    """In place: the training copy's weights become alpha * tuned + (1 - alpha) * base (WiSE-FT)."""
    if alpha == 1.0:
        return
    if lora_rank:
        for _, m in lora_modules(model):
            m.lora_B.weight.mul_(alpha)
        return
    ref = base.state_dict()
    for name, p in model.named_parameters():
        p.lerp_(ref[name].to(p.dtype), 1.0 - alpha)  # p + (1 - alpha) * (base - p)


def lora_adapter(model: MiniLM) -> dict[str, torch.Tensor]:
    """{`<module>.lora_A`: (r, in), `<module>.lora_B`: (out, r)} keyed by the base model's module names."""
    return {f"{name}.lora_{ab}": getattr(m, f"lora_{ab}").weight.detach().float().contiguous()
            for name, m in lora_modules(model) for ab in ("A", "B")}


def _unwrap(model: MiniLM) -> MiniLM:
    """The model with each LoRALinear replaced by its (untouched) base layer."""
    for name, m in list(lora_modules(model)):
        model.set_submodule(name, m.base_layer)
    return model


def frozen_encoder(model: MiniLM, like: Encoder, lora_rank: int) -> Encoder:
    """An inference Encoder from a training copy: adapter merged, fused QKV rebuilt, gradients off."""
    adapter = lora_adapter(model) if lora_rank else {}
    model = _unwrap(model)
    if adapter:
        state = merge_lora_state(model.state_dict(), adapter, 2.0)  # alpha / r = 2
        model.load_state_dict(state)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.encoder.layer:
        layer.fuse_qkv()
    out = Encoder(model.eval(), like.tokenizer, like.token_budget)
    out.adapter = adapter  # what save_tuned writes in LoRA mode
    return out


def save_tuned(enc: Encoder, out: str | Path, cfg: TuneConfig, info: dict | None = None) -> str:
    """Write a tuned encoder folder atomically: encoder.json beside model.safetensors (all weights) or
    adapter.safetensors (LoRA, over the installed base). Names the encoder by its weights' sha256 and returns it."""
    out = Path(out)
    lora = bool(cfg.lora_rank)
    base = model_dir()
    with atomic_dir(out) as tmp:
        wname = "adapter.safetensors" if lora else "model.safetensors"
        if lora and not getattr(enc, "adapter", None):
            raise ValueError("save_tuned: a LoRA config needs the encoder tune() returned (it carries the adapter)")
        tensors = enc.adapter if lora else {k: v.detach().contiguous() for k, v in enc.model.state_dict().items()}
        save_file(tensors, str(tmp / wname))
        sha = sha256_file(tmp / wname)
        meta = {"format": TUNED_FORMAT, "name": tuned_name(sha), "base": ENCODER_NAME, "mode": "lora" if lora else
                "full", "weights": wname, "sha256": sha, "training": {**asdict(cfg), **(info or {})}}
        if lora:
            meta["base_sha256"] = base_sha256(base / "model.safetensors")
            meta["lora"] = {"rank": cfg.lora_rank, "alpha": 2.0 * cfg.lora_rank, "targets": list(LORA_TARGETS)}
        (tmp / TUNED_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    enc.name, enc.path = meta["name"], str(out.resolve())
    return meta["name"]

