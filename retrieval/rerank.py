"""A second retrieval stage: the language model reranks the encoder's top candidates.

The score. For a question q and a candidate passage p (its first `passage_tokens` tokens, p_1..p_n), the language
model gives the pointwise mutual information

    pmi(q, p) = log P(p | "Question: q\\nAnswer:") - log P(p | "Answer:")
              = sum_t log P(p_t | question prompt, p_<t) - sum_t log P(p_t | "Answer:", p_<t)

in nats. By Bayes, log P(p | q) - log P(p) = log P(q | p) - log P(q), and log P(q) is the same for every candidate
of one question: ranking by pmi is ranking by how well the passage predicts the question (UPR, Sachan et al. 2022,
"Improving Passage Retrieval with Zero-Shot Question Generation"). The prior term is what keeps short, generic
passages ("Yes.") from winning on likelihood alone; it depends only on the passage and is cached. Every passage is
cut to the same token budget so that the sums stay comparable between passages of different lengths.

The fused score of a candidate is cos(q, p) + weight * pmi(q, p): the encoder's cosine is kept, the language model
moves candidates whose likelihood disagrees with it. Only the encoder's top `depth` candidates are rescored, then
the best k are returned with their fused scores.

Tuned to the domain. `phiforge index tune --rerank` also fine-tunes a LoRA adapter of the language model on the
same (question, gold passage) pairs the encoder learns from (`training_rows`: prompt "Question: q\\nAnswer:",
completion " " + passage), saved as `reranker/` in the tuned encoder's folder; an index built with that encoder
reranks with it, and without one the base model reranks zero-shot. Depth 20 and weight 0.02 were chosen by 3-fold
cross-validation inside chatterbot-corpus' tuning half; the 32 passage tokens and the adapter's training settings
were the one setting tried (README, "The second stage"; bench/bench_tune.py --rerank measures the held-out half).

Legend: R candidate rows in a forward, L the longest prompt + passage of the batch, C hidden size, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from phiforge.engine.atomic import write_jsonl_atomic
from phiforge.engine.formats.default_model import model_path
from phiforge.engine.formats.loader import load_model
from phiforge.engine.formats.peft import check_adapter_dir
from phiforge.engine.model.tokenizer import load_tokenizer
from phiforge.engine.pretrained import compute_dtype
from phiforge.engine.train.loop import finetune

PROMPT = "Question: {question}\nAnswer:"
PRIOR = "Answer:"
RERANKER_DIR = "reranker"  # the adapter's folder inside a tuned encoder's folder
# the adapter's training (engine TrainConfig fields)
TRAINING = dict(epochs=2, batch_size=8, seq_len=96, rank=16, alpha=32.0, lr=2e-4)


@dataclass(frozen=True)
class RerankConfig:
    depth: int = 20            # encoder candidates rescored by the language model
    weight: float = 0.02       # fused = cos + weight * pmi (nats)
    passage_tokens: int = 32   # each passage cut to its first tokens
    rows: int = 40             # candidates per forward

    def check(self) -> None:
        for name in ("depth", "passage_tokens", "rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"rerank {name}: must be >= 1, got {getattr(self, name)}")
        if not self.weight > 0:
            raise ValueError(f"rerank weight: must be > 0, got {self.weight}")


def passage_text(hit) -> str:
    """The text the encoder embedded for a hit: its heading, then its text."""
    return f"{hit.heading}\n{hit.text}" if hit.heading else hit.text


def training_rows(pairs: list[tuple[str, str]]) -> list[dict]:
    """`phiforge finetune` rows teaching the model P(passage | question) for (question, gold passage) pairs."""
    return [{"prompt": PROMPT.format(question=q), "completion": " " + p} for q, p in pairs]


class Reranker:
    def __init__(self, model: torch.nn.Module, tokenizer, cfg: RerankConfig = RerankConfig()) -> None:
        cfg.check()
        self.model, self.tokenizer, self.cfg = model.eval(), tokenizer, cfg
        self._prior: dict[str, float] = {}   # passage -> log P(passage | PRIOR)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    @torch.inference_mode()
    def loglik(self, context: str, passages: list[str]) -> np.ndarray:
        """log P(first passage_tokens of " " + passage | context) for each passage, float64 (len(passages),)."""
        ctx = self._ids(context)
        conts = [self._ids(" " + p)[: self.cfg.passage_tokens] for p in passages]
        out = np.zeros(len(passages))
        for s in range(0, len(conts), self.cfg.rows):
            group = conts[s:s + self.cfg.rows]
            L = len(ctx) + max(map(len, group))
            ids = torch.zeros(len(group), L, dtype=torch.long)  # right-padded: causal, pads follow what is scored
            for r, c in enumerate(group):
                ids[r, :len(ctx) + len(c)] = torch.tensor(ctx + c)
            hidden = self.model(ids, return_hidden=True)                   # (R, L, C)
            for r, c in enumerate(group):
                if not c:
                    continue
                pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(c))    # the positions predicting c
                logits = self.model.lm_head(hidden[r, pos]).float()       # (n, V)
                out[s + r] = float(torch.log_softmax(logits, -1)[torch.arange(len(c)), torch.tensor(c)].sum())
        return out

    def pmi(self, question: str, passages: list[str]) -> np.ndarray:
        """pmi(question, p) in nats for each passage (the module docstring's formula)."""
        new = [p for p in dict.fromkeys(passages) if p not in self._prior]
        if new:
            self._prior.update(zip(new, self.loglik(PRIOR, new).tolist()))
        cond = self.loglik(PROMPT.format(question=question), passages)
        return cond - np.array([self._prior[p] for p in passages])

    def rerank(self, question: str, hits: list, k: int) -> list:
        """The best k of `hits` (the encoder's, best first, score = cosine) after rescoring the top `depth`:
        copies with score = cos + weight * pmi, best first."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        top = hits[: self.cfg.depth]
        if not top:
            return []
        fused, order = self.fuse(np.array([h.score for h in top]), self.pmi(question, [passage_text(h) for h in top]))
        return [replace(top[i], score=float(fused[i])) for i in order[:k]]

    def fuse(self, cos: np.ndarray, pmi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The fused scores cos + weight * pmi of candidates (n,), and their order best first (n,); stable, so ties
        keep the encoder's order."""
        fused = cos + self.cfg.weight * pmi
        return fused, np.argsort(-fused, kind="stable")

    def search(self, index, question: str, k: int, vector: np.ndarray | None = None) -> list:
        """`index`'s best k for `question` after reranking its encoder's top max(k, depth); `vector`: the question's
        embedding when already encoded."""
        n = max(k, self.cfg.depth)
        hits = index.search(question, k=n) if vector is None else index.search_vector(vector, k=n)
        return self.rerank(question, hits, k)


def train_reranker(pairs: list[tuple[str, str]], out: str | Path, *, seed: int = 0, threads: int | None = None,
                   progress: bool = False, **overrides) -> dict:
    """LoRA-tune the default model on (question, gold passage) pairs into `out` (a PEFT adapter folder that also
    keeps its rows as train_data.jsonl); TRAINING's settings unless overridden. Returns finetune's summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = out / "train_data.jsonl"
    write_jsonl_atomic(rows, training_rows(pairs))
    return finetune(data=str(rows), out=str(out), seed=seed, threads=threads, progress=progress,
                    **{**TRAINING, **overrides})


def reranker_dir(encoder_path: str | Path | None) -> Path | None:
    """The tuned reranker beside a tuned encoder, or None (then the base model reranks zero-shot)."""
    if encoder_path is None:
        return None
    d = Path(encoder_path) / RERANKER_DIR
    return d if (d / "adapter_config.json").is_file() else None


def reranker_for(index, cfg: RerankConfig = RerankConfig()) -> Reranker:
    """The reranker an index uses: the one `index tune --rerank` saved beside its encoder, else the default model
    zero-shot."""
    return load_reranker(reranker_dir(getattr(index.encoder, "path", None)), cfg)


def load_reranker(adapter: str | Path | None = None, cfg: RerankConfig = RerankConfig(),
                  model_dir: str | Path | None = None, dtype: torch.dtype | None = None) -> Reranker:
    """The default model (or model_dir), with a reranker adapter from `index tune --rerank` when given."""
    if adapter is not None:
        check_adapter_dir(adapter)
    path = model_path(model_dir)
    model = load_model(path, dtype=dtype or compute_dtype(), adapter=adapter)
    return Reranker(model, load_tokenizer(path), cfg)
