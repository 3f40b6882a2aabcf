"""The RAG part of `make demo`: index the bundled water-utility documents, then answer questions with sources.

The index lives in $PHIFORGE_HOME/demo-index (default ~/.cache/phiforge): the first run embeds the documents,
later runs find every file unchanged and embed nothing, which the printed report shows. Each answer is printed
beside the expected one and judged: right when it contains every number of the expected answer (or, with no
number, its text), so a wrong answer never reads as a success.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from phiforge.engine.paths import phiforge_home
from phiforge.engine.pretrained import compute_dtype, load_generator

from .rag import answer_question, format_sources
from .store import Index

DATA = Path(__file__).resolve().parents[1] / "data"


def data_dir() -> Path:
    """data/ beside the package (editable install) or the working directory's data/."""
    for d in (DATA, Path.cwd() / "data"):
        if (d / "docs").is_dir():
            return d
    raise FileNotFoundError(f"bundled documents not found in {DATA / 'docs'} or ./data/docs")


def answered(expected: str, text: str) -> bool:
    """Whether `text` carries the expected answer's facts: all its numbers, or (none) its whole text."""
    numbers = re.findall(r"\d+(?:[.,]\d+)*", expected)
    if numbers:
        return all(re.search(rf"(?<![\d.,]){re.escape(n)}(?![\d]|[.,]\d)", text) for n in numbers)
    return " ".join(expected.lower().split()) in " ".join(text.lower().split())


def demo_index_dir() -> Path:
    return phiforge_home() / "demo-index"


def refresh_demo_index(ix: Index) -> None:
    """Bring the demo index up to date with this checkout's bundled documents, printing what changed."""
    data = data_dir()
    print(f"Indexing {data / 'docs'} into {ix.folder}")
    t0 = time.perf_counter()
    # The demo index lives in $PHIFORGE_HOME, shared by every checkout: drop sources that are not this
    # checkout's bundled files (another clone's copies would come back as duplicate, near-tie hits).
    docs = (data / "docs").resolve()
    stale = [s for s in ix.sources() if not Path(s).is_relative_to(docs) or not Path(s).exists()]
    for s in stale:
        ix.remove(s)
    if stale:
        print(f"  removed {len(stale)} sources from elsewhere (another checkout's copies, or deleted files)")
    r = ix.add([data / "docs"])
    print(f"  {r.files_added} added, {r.files_replaced} replaced, {r.files_unchanged} unchanged; "
          f"{r.chunks_embedded} chunks embedded; {len(ix)} chunks in the index "
          f"({time.perf_counter() - t0:.1f} s)")


def run_demo(n_questions: int = 3, index_dir: str | Path | None = None, generator=None) -> None:
    data = data_dir()
    index_dir = Path(index_dir) if index_dir else demo_index_dir()
    with Index.open(index_dir) as ix:
        refresh_demo_index(ix)
        questions = [json.loads(line) for line in (data / "docs_questions.jsonl").read_text().splitlines()
                     if line.strip()][:n_questions]
        gen = generator or load_generator(dtype=compute_dtype())
        right = 0
        for q in questions:
            print(f"\nquestion> {q['question']}\nanswer>   ", end="", flush=True)
            t0 = time.perf_counter()
            # a 135M model rambles: short answers, stop at the first blank line. No repetition penalty: it
            # penalises exactly the source words a grounded answer must repeat (measured: it derailed answers).
            ans = answer_question(q["question"], ix, gen, k=3, max_new_tokens=80, stop=["\n\n"],
                                  on_piece=lambda s: print(s, end="", flush=True))
            print(f"\n[{time.perf_counter() - t0:.1f} s, prompt {ans.prompt_tokens} tokens]")
            print(format_sources(ans))
            top = Path(ans.sources[0].hit.source).name if ans.sources else "-"
            ok = answered(q["answer"], ans.text)
            right += ok
            print(f"  expected answer: {q['answer']}  -> the model's answer is {'RIGHT' if ok else 'WRONG'}")
            print(f"  expected source: {q['source']} (top retrieved: {top})")
        print(f"\n{right} of {len(questions)} answers right (a 135M model; a real Phi-3 does better: see the README)")


if __name__ == "__main__":
    run_demo()
