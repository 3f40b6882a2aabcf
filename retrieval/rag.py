"""Retrieval-augmented answers with citations that are checked, not trusted.

    answer = answer_question("How fast must a crew reach a trunk main burst?", index, generator,
                             on_piece=lambda s: print(s, end=""))
    print(format_sources(answer))

1. **Retrieve** the top-k chunks for the question (store.Index.search).
2. **Build** a grounded chat: a system message with the rules, then one user message holding the numbered
   sources `[1] file, heading` + text and the question. Sources go in rank order and are added only while the
   rendered prompt (chat template included) plus `max_new_tokens` fits the budget: the model's context
   (`config.max_position_embeddings`) capped by `max_prompt_tokens` (prefill time grows with it). A source
   that fits only in part is cut at a token boundary; one that leaves no room is dropped, never squeezed.
3. **Stream** the answer through the generator (`phiforge.engine.Generator.stream`: text pieces; made by
   `phiforge.engine.pretrained.load_generator`).
4. **Check citations.** Every `[n]` / `[n, m]` in the answer is parsed. Numbers that name a source in the
   prompt are *cited*; any other number (a hallucinated [9] when 4 sources were given) is listed as invalid,
   and `Answer.clean_text` has it removed. The printed source list shows only resolvable citations, so every
   number a user can follow leads to a retrieved chunk. If the model cites nothing, the sources it was given
   are listed as "not cited" so the reader can still check the answer.

5. **Structured answers** (`json_schema=`, `phiforge ask --json-schema FILE`): the answer is one JSON object held
   to the schema by the engine's grammar mask, with the citations as a field: `with_citations` adds a required
   `citations` array whose items may only be the numbers of the sources in the prompt, so every cited number
   resolves by construction. An object schema gets the field beside its own; any other schema is wrapped as
   {"answer": <it>, "citations": [...]}. `Answer.data` is the parsed object (None when max_new_tokens cut it).

The generator only needs `.stream(messages, max_new_tokens=, temperature=, stop=)` yielding str, and a
`.tokenizer` with `apply_chat_template(messages, add_generation_prompt=True) -> ids`, `encode`, `decode`;
tests drive this module with a fake one.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SYSTEM_PROMPT = (
    "You are a careful assistant for company documents. Answer the question using only the numbered sources. "
    "Cite the source of each fact with its number in square brackets, like [1]. "
    "If the sources do not contain the answer, say that you do not know.")
JSON_SYSTEM_PROMPT = (
    "You are a careful assistant for company documents. Fill in the JSON answer using only the numbered sources, "
    "and list the numbers of the sources you used in \"citations\".")
CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")  # [3] or [1, 2]


@dataclass
class Source:
    number: int  # as shown to the model: [number]
    hit: object  # store.Hit
    text: str  # the text placed in the prompt (may be cut to fit)

    @property
    def label(self) -> str:
        h = self.hit
        where = Path(h.source).name + (f" — {h.heading}" if h.heading else "")
        return f"{where} (chars {h.start}-{h.end}, chunk {h.chunk_id}, score {h.score:.3f})"


@dataclass
class Answer:
    question: str
    text: str
    sources: list[Source]  # what the model saw, numbered from 1
    cited: list[Source] = field(default_factory=list)  # resolvable citations, in first-cited order
    invalid: list[int] = field(default_factory=list)  # cited numbers that name no source
    prompt_tokens: int = 0
    data: dict | None = None  # a structured answer, parsed (json_schema given; None when it was cut)

    @property
    def clean_text(self) -> str:
        """The answer with unresolvable citation numbers removed (an emptied bracket disappears)."""
        valid = {s.number for s in self.sources}

        def keep(m: re.Match) -> str:
            nums = [n for n in re.split(r"\s*,\s*", m.group(1)) if int(n) in valid]
            return f"[{', '.join(nums)}]" if nums else ""

        return CITATION.sub(keep, self.text)


def parse_citations(text: str) -> list[int]:
    """Cited numbers in order of first appearance."""
    seen: list[int] = []
    for m in CITATION.finditer(text):
        for n in re.split(r"\s*,\s*", m.group(1)):
            if int(n) not in seen:
                seen.append(int(n))
    return seen


def resolve_citations(text: str, sources: list[Source]) -> tuple[list[Source], list[int]]:
    by_number = {s.number: s for s in sources}
    nums = parse_citations(text)
    return [by_number[n] for n in nums if n in by_number], [n for n in nums if n not in by_number]


def context_length(generator, default: int = 4096) -> int:
    cfg = getattr(generator, "config", None) or getattr(getattr(generator, "model", None), "config", None)
    return int(getattr(cfg, "max_position_embeddings", default) or default)


def with_citations(schema: dict, sources: int) -> dict:
    """The schema with a required `citations` field: a non-empty list of the numbers 1..sources."""
    cites = {"type": "array", "items": {"enum": list(range(1, sources + 1))}, "minItems": 1}
    if schema.get("type") == "object" and isinstance(schema.get("properties"), dict):
        if "citations" in schema["properties"]:
            raise ValueError("the JSON schema has a 'citations' property of its own; phiforge adds that field")
        return {**schema, "properties": {**schema["properties"], "citations": cites},
                "required": [*schema.get("required", []), "citations"]}
    return {"type": "object", "properties": {"answer": schema, "citations": cites},
            "required": ["answer", "citations"], "additionalProperties": False}


def _messages(question: str, blocks: list[str], schema: dict | None = None) -> list[dict]:
    body = "Sources:\n\n" + "\n\n".join(blocks) + f"\n\nQuestion: {question}\n"
    if schema is None:
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": body + "Answer (cite sources like [1]):"}]
    return [{"role": "system", "content": JSON_SYSTEM_PROMPT},
            {"role": "user", "content": body + "Answer as JSON with this schema: " + json.dumps(schema)}]


def _block(n: int, hit, text: str) -> str:
    head = Path(hit.source).name + (f", {hit.heading}" if hit.heading else "")
    return f"[{n}] {head}\n{text}"


def build_prompt(question: str, hits: list, tokenizer, budget: int,
                 schema: dict | None = None) -> tuple[list[dict], list[Source], int]:
    """Numbered sources in rank order while the rendered chat stays within `budget` tokens (with `schema`: the
    structured-answer prompt, its citations sized for every hit).

    Returns (messages, sources, prompt tokens). Raises ValueError if even the bare question does not fit.
    """
    shown = None if schema is None else with_citations(schema, max(1, len(hits)))

    def size(blocks: list[str]) -> int:
        return len(tokenizer.apply_chat_template(_messages(question, blocks, shown), add_generation_prompt=True))

    blocks: list[str] = []
    sources: list[Source] = []
    used = size(blocks)
    if used > budget:
        raise ValueError(f"the question alone takes {used} tokens, over the prompt budget of {budget}")
    for hit in hits:
        n = len(sources) + 1
        full = _block(n, hit, hit.text)
        need = size(blocks + [full])
        text = hit.text
        if need > budget:  # cut this source to the room left, if that leaves something worth reading
            room = budget - used - len(tokenizer.encode(_block(n, hit, ""), add_special_tokens=False)) - 8
            if room < 32:
                break
            ids = tokenizer.encode(hit.text, add_special_tokens=False)[:room]
            text = tokenizer.decode(ids).rstrip() + " …"
            while size(blocks + [_block(n, hit, text)]) > budget and len(ids) > 8:
                ids = ids[: len(ids) * 3 // 4]  # detokenize/retokenize can drift by a few tokens
                text = tokenizer.decode(ids).rstrip() + " …"
            full = _block(n, hit, text)
            need = size(blocks + [full])
            if need > budget:
                break
        blocks.append(full)
        sources.append(Source(n, hit, text))
        used = need
        if need >= budget - 32:
            break
    if schema is not None:  # the citations allow exactly the sources that made it in
        return _messages(question, blocks, with_citations(schema, max(1, len(sources)))), sources, used
    return _messages(question, blocks), sources, used


def answer_question(question: str, index, generator, k: int = 4, max_new_tokens: int = 200,
                    max_prompt_tokens: int = 3072, temperature: float = 0.0, stop: list[str] | None = None,
                    repetition_penalty: float = 1.0, on_piece: Callable[[str], None] | None = None,
                    reranker=None, json_schema: dict | None = None) -> Answer:
    """Retrieve (and rerank the encoder's top `reranker.cfg.depth` when given a retrieval/rerank.Reranker), prompt
    within budget, stream (pieces go to on_piece), then resolve citations (with json_schema: from its field)."""
    if not question or not question.strip():
        raise ValueError("empty question")
    hits = index.search(question, k=k) if reranker is None else reranker.search(index, question, k)
    budget = min(context_length(generator), max_prompt_tokens + max_new_tokens) - max_new_tokens
    messages, sources, used = build_prompt(question, hits, generator.tokenizer, budget, json_schema)
    pieces = []
    extra = {"repetition_penalty": repetition_penalty} if repetition_penalty != 1.0 else {}
    if json_schema is not None:
        extra["json_schema"] = with_citations(json_schema, max(1, len(sources)))
    for piece in generator.stream(messages, max_new_tokens=max_new_tokens, temperature=temperature, stop=stop,
                                  **extra):
        pieces.append(piece)
        if on_piece:
            on_piece(piece)
    text = "".join(pieces)
    if json_schema is None:
        cited, invalid = resolve_citations(text, sources)
        return Answer(question, text, sources, cited, invalid, used)
    try:
        data = json.loads(text)
    except ValueError:  # max_new_tokens cut the object: no citations to read
        return Answer(question, text, sources, [], [], used)
    by_number = {s.number: s for s in sources}
    cited = [by_number[n] for n in dict.fromkeys(data["citations"]) if n in by_number]
    return Answer(question, text, sources, cited, [], used, data)


answer = answer_question  # the short name exported by phiforge.retrieval


def format_sources(ans: Answer) -> str:
    """The source list printed after a streamed answer."""
    lines = []
    if ans.cited:
        lines.append("Sources cited:")
        lines += [f"  [{s.number}] {s.label}" for s in ans.cited]
    else:
        lines.append("Sources (given to the model, none cited):")
        lines += [f"  [{s.number}] {s.label}" for s in ans.sources]
    if ans.invalid:
        lines.append("Ignored citations (no such source): " + ", ".join(f"[{n}]" for n in ans.invalid))
    return "\n".join(lines)
