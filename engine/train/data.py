"""Fine-tuning data: JSONL rows → token ids with loss masks → (optionally packed) batches.

Rows are either chat transcripts or prompt/completion pairs, one JSON object per line:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}

Only what the model should learn to *say* is labelled: every assistant turn (or the completion) including its
end-of-turn token, so the model learns to stop. Assistant spans are found by rendering prefixes with the model's
own chat template: the text up to turn i with the generation prompt appended ends exactly where the assistant's
words begin, whatever the template (ChatML, Phi-3, Llama-3); the span then runs to the end of the turn's
end-of-turn token. The whole transcript is tokenized once and tokens are labelled by character offset.

Targets are stored already shifted (`targets[t]` is the token at t+1, or IGNORE), so a packed row needs no
special case at sample boundaries: the last token of one sample never learns to predict the next sample.

Packing concatenates samples into rows of seq_len; `position_ids` restart at 0 for each sample and `segment_ids`
give the model a block-causal mask, so packed samples never attend to each other.

Legend: B batch rows, T row length.
"""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from phiforge.engine.model.tokenizer import END_OF_TURN_TOKENS

from .loss import IGNORE

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """Bad training data; the message names file:line (or the batch)."""


@dataclass
class Sample:
    ids: list[int]
    targets: list[int]  # targets[t] = ids[t+1] where labelled, else IGNORE; same length as ids

    @property
    def n_labels(self) -> int:
        return sum(t != IGNORE for t in self.targets)


@dataclass
class DataStats:
    rows: int = 0
    skipped_bad: int = 0
    truncated: int = 0
    dropped_unlabelled: int = 0  # all labels fell past seq_len (the prompt alone filled the window)
    errors: list[str] = field(default_factory=list)


def _validate(row: Any) -> str | None:
    """None if the row is usable, else what is wrong with it."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "field 'messages' must be a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f"messages[{i}] must be an object with string 'role' and 'content'"
            if m["role"] not in ROLES:
                return f"messages[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}"
        if not any(m["role"] == "assistant" for m in msgs):
            return "no assistant message: nothing to learn from this row"
        return None
    if "prompt" in row or "completion" in row:
        for k in ("prompt", "completion"):
            if not isinstance(row.get(k), str):
                return f"field {k!r} must be a string"
        if not row["completion"]:
            return "field 'completion' is empty: nothing to learn from this row"
        return None
    return "expected a 'messages' list or 'prompt' and 'completion' strings"


def read_jsonl(path: str | Path, skip_bad: bool = False, stats: DataStats | None = None) -> list[dict]:
    """Parse and validate every row; a bad line raises DataError('file:line: why') unless skip_bad."""
    path = Path(path)
    stats = stats if stats is not None else DataStats()
    if not path.exists():
        raise DataError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))  # a truncated last field reports its own column
                why = _validate(row)
            except json.JSONDecodeError as e:
                why = f"not valid JSON at column {e.colno} ({e.msg})"
            if why is not None:
                msg = f"{path}:{lineno}: {why}"
                if not skip_bad:
                    raise DataError(msg + " (--skip-bad skips and counts such lines)")
                stats.skipped_bad += 1
                stats.errors.append(msg)
                continue
            rows.append(row)
    stats.rows += len(rows)
    if not rows:
        raise DataError(f"{path}: no usable rows" + (f" ({stats.skipped_bad} bad lines skipped)" if stats.skipped_bad
                                                     else " (the file is empty)"))
    return rows


def _end_of_turn_texts(tok) -> list[str]:
    texts = [t for t in END_OF_TURN_TOKENS if t in tok.chat_template]
    eos = tok.special_tokens.get("eos_token")
    return texts + ([eos] if eos else [])


def chat_spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered transcript and the character spans [start, end) of each assistant turn, end-of-turn included."""
    text = tok.render_chat(messages, add_generation_prompt=False)
    eots = _end_of_turn_texts(tok)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tok.render_chat(messages[:i], add_generation_prompt=True)
        if not text.startswith(prefix):
            raise DataError("the chat template does not render a conversation's prefix as a prefix of the whole "
                            "conversation, so assistant turns cannot be located")
        start = len(prefix)
        content_at = text.find(m["content"], start)
        if content_at < 0:
            raise DataError(f"assistant message {i} does not appear verbatim in the rendered template")
        after = content_at + len(m["content"])
        hits = [(text.find(e, after), e) for e in eots if text.find(e, after) >= 0]
        end = min(hits)[0] + len(min(hits)[1]) if hits else after
        spans.append((start, end))
    return text, spans


def encode_row(tok, row: dict) -> tuple[list[int], list[bool]]:
    """ids and a per-token 'labelled' flag (True on tokens the model should learn to produce)."""
    if "messages" in row:
        text, spans = chat_spans(tok, row["messages"])
        ids, offs = tok.encode_with_offsets(text)
        labelled = [any(a <= s < b for a, b in spans) for s, _ in offs]
        return ids, labelled
    prompt = tok.encode(row["prompt"], add_special_tokens=True)
    completion = tok.encode(row["completion"], add_special_tokens=False)
    eos = tok.eos_token_id
    completion = completion + ([eos] if eos is not None else [])
    return prompt + completion, [False] * len(prompt) + [True] * len(completion)


def make_sample(ids: list[int], labelled: list[bool], seq_len: int, stats: DataStats) -> Sample | None:
    if len(ids) > seq_len:
        stats.truncated += 1
        ids, labelled = ids[:seq_len], labelled[:seq_len]
    # targets[t] is what position t predicts: token t+1, when that token is labelled
    targets = [ids[t + 1] if labelled[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    if all(t == IGNORE for t in targets):
        stats.dropped_unlabelled += 1
        return None
    return Sample(ids, targets)


def load_dataset(path: str | Path, tok, seq_len: int, skip_bad: bool = False,
                 stats: DataStats | None = None) -> tuple[list[Sample], DataStats]:
    stats = stats if stats is not None else DataStats()
    samples = []
    for row in read_jsonl(path, skip_bad, stats):
        s = make_sample(*encode_row(tok, row), seq_len, stats)
        if s is not None:
            samples.append(s)
    if not samples:
        raise DataError(f"{path}: every sample lost all its labelled tokens to truncation at seq_len={seq_len}")
    return samples, stats


def pack(samples: list[Sample], seq_len: int) -> list[list[Sample]]:
    """Greedy first-fit-in-order: each row is a list of samples whose lengths sum to at most seq_len."""
    rows: list[list[Sample]] = []
    cur, used = [], 0
    for s in samples:
        if used + len(s.ids) > seq_len and cur:
            rows.append(cur)
            cur, used = [], 0
        cur.append(s)
        used += len(s.ids)
    if cur:
        rows.append(cur)
    return rows


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T) next-token targets, IGNORE where unlabelled or padding
    position_ids: torch.Tensor  # (B, T)
    segment_ids: torch.Tensor | None  # (B, T) sample index within the row (packed only); -1 on padding
    n_tokens: int  # real (non-pad) tokens
    n_labels: int  # labelled tokens

    def to(self, device) -> "Batch":
        seg = None if self.segment_ids is None else self.segment_ids.to(device)
        return Batch(self.input_ids.to(device), self.targets.to(device), self.position_ids.to(device), seg,
                     self.n_tokens, self.n_labels)


def collate(rows: list[list[Sample]], pad_id: int, packed: bool) -> Batch:
    """Right-pad rows to the longest; pads are never attended to by real tokens (they come later, causally)."""
    T = max(sum(len(s.ids) for s in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    tgt = torch.full((B, T), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    n_tok = 0
    for b, row in enumerate(rows):
        t = 0
        for k, s in enumerate(row):
            n = len(s.ids)
            ids[b, t:t + n] = torch.tensor(s.ids)
            tgt[b, t:t + n] = torch.tensor(s.targets)
            pos[b, t:t + n] = torch.arange(n)
            seg[b, t:t + n] = k
            t += n
        pos[b, t:] = torch.arange(T - t) + t  # pads: any positions; nothing real looks at them
        n_tok += t
    n_lab = int((tgt != IGNORE).sum())
    return Batch(ids, tgt, pos, seg if packed else None, n_tok, n_lab)


class Batches:
    """Deterministic, resumable batches: epoch e is a seeded permutation of the rows; position = micro-batch index.

    Micro-batch m of the whole run is batch m % per_epoch of epoch m // per_epoch, so resuming at m needs only m.

    Data-parallel (world_size N > 1): micro-batch m is the global batch of N·batch_size rows that one process at
    micro-batch N·batch_size takes (same order, packing included), and rank r gets rows [r·n/N, (r+1)·n/N) of its
    n rows. A rank left without rows (the short last batch of an epoch) gets one pad token with no labels: it still
    runs forward and backward, which DDP needs from every rank, and adds nothing to the loss or the gradient."""

    def __init__(self, samples: list[Sample], batch_size: int, seq_len: int, pad_id: int, seed: int,
                 packed: bool = False, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        self.rows = pack(samples, seq_len) if packed else [[s] for s in samples]
        self.batch_size, self.pad_id, self.seed, self.packed, self.shuffle = batch_size, pad_id, seed, packed, shuffle
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.per_epoch = -(-len(self.rows) // self.global_batch)
        self._order_epoch, self._order = -1, []

    def __len__(self) -> int:
        return self.per_epoch

    def batch(self, m: int) -> Batch:
        epoch, j = divmod(m, self.per_epoch)
        if epoch != self._order_epoch:
            order = list(range(len(self.rows)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)  # independent of torch's RNG
            self._order_epoch, self._order = epoch, order
        picked = self._order[j * self.global_batch:(j + 1) * self.global_batch]
        n = len(picked)
        picked = picked[self.rank * n // self.world_size:(self.rank + 1) * n // self.world_size]
        if not picked:
            return dataclasses.replace(collate([[Sample([self.pad_id], [IGNORE])]], self.pad_id, self.packed),
                                       n_tokens=0)
        return collate([self.rows[i] for i in picked], self.pad_id, self.packed)
