"""Fine-tuning rows from a Q/A set: RAFT rows (questions asked with retrieved context) and closed-book rows.

RAFT (Zhang et al., arXiv 2403.10131) trains a model to read the sources it will be given at answer time. For each
answerable question:

1. **Retrieve** the question's top chunks with the index the model will later be asked with (phiforge's own
   retriever), so the distractors are the hard ones: chunks that look relevant and are not.
2. **Gold chunk:** among the chunks of the question's `sources` documents, the one holding most of the answer's
   key tokens (numbers count double); ties go to the chunk the retriever ranks higher, then to document order.
3. **Context:** with probability `p` the gold chunk at a random position among k-1 distractors; otherwise k
   distractors and no gold (the model must then answer from what it has learnt, as RAFT's (1-p) rows do).
   Sources go in until the prompt budget (seq_len less the target) is spent; when the gold's position falls
   past what fits, it moves to a random position among the sources that fit (up to 3 tries), so a short
   seq_len means fewer distractors, not fewer golds. A gold that never fits, or whose quoted sentence is cut
   away, counts as left out.
   Distractors are retrieved chunks other than the gold, in rank order, so the gold never appears twice.
4. **Prompt:** `rag.build_prompt`, the prompt `phiforge ask` and `evaluate` use, numbered [1]..[k].
5. **Target:** the gold's sentence that holds the answer, quoted verbatim, then the answer citing it:

       [2] says: "A burst on a trunk main ... within 1 hour, day or night."
       Answer: within 1 hour [2]

   Without the gold in the prompt: `Answer: <answer>` (nothing to quote or cite). An unanswerable question gets
   the top-k retrieved chunks and `Answer: <qa.ABSTAIN_ANSWER>`.

Each question draws from its own generator seeded by (seed, row number), so a row does not depend on the others
and the rows are the same in every process.

Closed-book rows (the plain fine-tuned adapter): `qa.closed_book_messages(question)` and the answer as it stands.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .qa import ABSTAIN_ANSWER, QARow, closed_book_messages
from .rag import build_prompt

_TOKEN = re.compile(r"\d[\d,.:/]*\d|\d|[a-z]+")
_STOP = frozenset("a an and are as at be by for from in is it its of on or the to with per than more less any "
                  "every each after before must within into".split())
# a sentence ends at a blank line, before a list item or table row, or at . ! ? followed by space and a capital,
# digit or opening quote/bracket; a single line break inside a paragraph (hard-wrapped text) does not end one
_SENTENCE_END = re.compile(r"\n[ \t]*\n\s*|\n(?=[ \t]*(?:[-*+]|\d+[.)]|\|)[ \t])|(?<=[.!?])\s+(?=[\"'(£A-Z0-9])")


class RaftError(ValueError):
    """Options that cannot make RAFT rows (the message names the flag or the question's file:line)."""


@dataclass
class RaftExample:
    question: str
    messages: list[dict]  # the prompt (system + user), from rag.build_prompt
    target: str  # the assistant's reply to learn
    hits: list  # store.Hit, in prompt order ([1] first)
    gold: object | None  # store.Hit of the gold chunk, None for an unanswerable question
    gold_number: int | None  # the gold's [n] in the prompt, None when it was left out
    quote: str | None  # the verbatim sentence of the gold chunk quoted in the target

    def row(self) -> dict:
        """A `{messages}` training row (engine/train/data.py)."""
        return {"messages": self.messages + [{"role": "assistant", "content": self.target}]}


def key_tokens(text: str) -> tuple[set[str], set[str]]:
    """(numbers, content words) of a text, lowercased: what locates an answer in a chunk."""
    toks = _TOKEN.findall(text.lower().replace("\u00a0", " "))
    numbers = {t.rstrip(".,:") for t in toks if t[0].isdigit()}
    words = {t for t in toks if not t[0].isdigit() and len(t) > 2 and t not in _STOP}
    return numbers, words


def overlap(answer: str, text: str) -> int:
    """How much of the answer's key tokens `text` holds: 2 per number, 1 per content word."""
    an, aw = key_tokens(answer)
    tn, tw = key_tokens(text)
    return 2 * len(an & tn) + len(aw & tw)


def sentences(text: str) -> list[str]:
    """The sentences (and list items, table rows) of a chunk, each a verbatim substring of it."""
    out, pos = [], 0
    for m in _SENTENCE_END.finditer(text):
        out.append(text[pos:m.start()])
        pos = m.end()
    out.append(text[pos:])
    return [s.strip() for s in out if s.strip()]


def _squash(text: str) -> str:
    return " ".join(text.lower().split())


def answer_sentence(answer: str, chunk_text: str, question: str = "") -> str:
    """The chunk's sentence that holds most of the answer; ties go to one holding the answer word for word, then
    to the one sharing most with the question, then to the first."""
    return max(sentences(chunk_text), key=lambda s: (overlap(answer, s), _squash(answer) in _squash(s),
                                                     overlap(question, s)))


def gold_chunk(row: QARow, index, ranked: list) -> object | None:
    """The chunk of the row's source documents that best holds its answer (see the module docstring)."""
    rank = {h.chunk_id: i for i, h in enumerate(ranked)}
    pool = [c for name in row.sources for c in index.chunks_of(name)]
    if not pool:  # no sources given (or none indexed): the best retrieved chunk that holds some of the answer
        pool = [h for h in ranked if overlap(row.answer, h.text) > 0]
    if not pool:
        return None
    return min(pool, key=lambda c: (-overlap(row.answer, c.text), rank.get(c.chunk_id, len(ranked))))


def _rng(seed: int, i: int) -> random.Random:
    return random.Random(f"raft:{seed}:{i}")  # str seeds hash with SHA-512: the same draw in every process


def raft_example(row: QARow, i: int, index, tokenizer, seq_len: int, k: int = 4, p: float = 0.8,
                 seed: int = 0) -> RaftExample:
    """The RAFT example of row number `i` (see the module docstring); the prompt plus target fit `seq_len`."""
    rng = _rng(seed, i)
    keep = rng.random() < p  # drawn for every row, so one row's draws never shift another's
    ranked = index.search(row.question, k=k + 1)
    if not row.answerable:
        hits, gold, number = ranked[:k], None, None
    else:
        gold = gold_chunk(row, index, ranked)
        distractors = [h for h in ranked if gold is None or h.chunk_id != gold.chunk_id]
        if gold is not None and keep:
            hits = distractors[:k - 1]
            number = rng.randint(1, len(hits) + 1)
            hits.insert(number - 1, gold)
        else:
            hits, number = distractors[:k], None
    quote = answer_sentence(row.answer, gold.text, row.question) if number is not None else None

    def room(target: str) -> int:  # the prompt's token budget beside the target; 8: end-of-turn tokens
        return seq_len - len(tokenizer.encode(target, add_special_tokens=False)) - 8

    for _ in range(3):
        target = _target(row, number, quote)
        try:
            messages, sources, _ = build_prompt(row.question, hits, tokenizer, room(target))
        except ValueError as e:  # the bare question and the target do not fit
            raise RaftError(f"--seq-len {seq_len}: too short for question {i + 1} ({row.question[:60]!r}): "
                            f"{e}") from None
        if number is None or (number <= len(sources) and quote in sources[number - 1].text):
            break
        # the budget cut the gold (or its answer sentence): move it to a random place among the sources that fit
        fits = max(1, min(len(sources), number - 1))
        hits.insert(rng.randint(1, fits) - 1, hits.pop(number - 1))
        number = hits.index(gold) + 1
    else:  # still no room for the gold: nothing left to quote
        hits = [h for h in hits if h.chunk_id != gold.chunk_id]
        number = quote = None
        target = _target(row, None, None)
        messages, sources, _ = build_prompt(row.question, hits, tokenizer, room(target))
    return RaftExample(row.question, messages, target, [s.hit for s in sources], gold, number, quote)


def _target(row: QARow, number: int | None, quote: str | None) -> str:
    if not row.answerable:
        return f"Answer: {ABSTAIN_ANSWER}"
    if number is None:
        return f"Answer: {row.answer}"
    return f'[{number}] says: "{quote}"\nAnswer: {row.answer} [{number}]'


def raft_examples(rows: list[QARow], index, tokenizer, seq_len: int, k: int = 4, p: float = 0.8,
                  seed: int = 0) -> list[RaftExample]:
    """Every row's RAFT example, in order. Raises RaftError for k < 1 or p outside [0, 1]."""
    if k < 1:
        raise RaftError(f"--raft-k: must be >= 1, got {k}")
    if not 0.0 <= p <= 1.0:
        raise RaftError(f"--raft-p: must be in [0, 1], got {p}")
    return [raft_example(r, i, index, tokenizer, seq_len, k, p, seed) for i, r in enumerate(rows)]


def closed_book_rows(rows: list[QARow]) -> list[dict]:
    """`{messages}` rows asking each question without sources (the plain fine-tuned adapter's data)."""
    return [{"messages": closed_book_messages(r.question) + [{"role": "assistant", "content": r.answer}]}
            for r in rows]


def is_qa_file(path: str | Path) -> bool:
    """Whether a JSONL file holds Q/A rows (`question`/`answer`) rather than chat or prompt/completion rows:
    decided by its first non-blank line (an unreadable file is not Q/A; the training data reader reports it)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    obj = json.loads(line)
                    return isinstance(obj, dict) and "question" in obj and not {"messages", "prompt"} & set(obj)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return False
