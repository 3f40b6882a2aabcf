"""RAG: numbered sources within the prompt budget, citations resolved (never trusted), plus the CLI end to end.

Unit tests drive rag.py with a fake generator (a word-level "tokenizer" and a scripted answer); the end-to-end
tests index the bundled documents with the real MiniLM encoder and answer with the real default model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest
from word_tokenizer import WordTokenizer

from phiforge.retrieval.rag import (Answer, Source, answer_question, build_prompt, format_sources,
                                    parse_citations, with_citations)
from phiforge.cli import main
from phiforge.retrieval import demo
from phiforge.retrieval.demo import run_demo
from phiforge.retrieval.rerank import Reranker
from phiforge.retrieval.store import Hit, Index

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "data" / "docs"


class FakeGenerator:
    def __init__(self, script: list[str], context: int = 4096):
        self.tokenizer, self.script, self.calls = WordTokenizer(), script, []
        self.config = SimpleNamespace(max_position_embeddings=context)

    def stream(self, messages, max_new_tokens=256, temperature=0.7, stop=None, **kw):
        self.calls.append((messages, max_new_tokens))
        yield from self.script


class FakeIndex:
    def __init__(self, n: int = 5, words: int = 60):
        self.hits = [Hit(i + 10, f"/docs/file{i}.md", " ".join(f"w{i}_{j}" for j in range(words)), 0.9 - i / 10,
                         f"Heading {i}", 0, words * 5) for i in range(n)]

    def search(self, query, k=5):
        return self.hits[:k]


def test_parse_citations():
    assert parse_citations("a [2] b [1, 3] c [2][4] [x] [ 5 ]") == [2, 1, 3, 4]


def test_citations_resolve_and_invalid_ones_are_flagged():
    gen = FakeGenerator(["Crews arrive within ", "1 hour [1]. ", "Valves close slowly [2, 9]. ", "See [7]."])
    pieces = []
    ans = answer_question("How fast?", FakeIndex(3), gen, k=3, on_piece=pieces.append)
    assert "".join(pieces) == ans.text  # streamed as generated
    assert [s.number for s in ans.sources] == [1, 2, 3]
    assert [s.number for s in ans.cited] == [1, 2] and ans.invalid == [9, 7]
    assert all(s.hit in FakeIndex(3).hits or s.hit.chunk_id in (10, 11, 12) for s in ans.cited)
    assert ans.clean_text == "Crews arrive within 1 hour [1]. Valves close slowly [2]. See ."
    listing = format_sources(ans)
    assert "[1] file0.md — Heading 0" in listing and "[2] file1.md" in listing and "[3]" not in listing
    assert "Ignored citations (no such source): [9], [7]" in listing
    prompt = gen.calls[0][0][1]["content"]
    for s in ans.sources:  # the numbers the model saw are the numbers we resolve
        assert f"[{s.number}] {Path(s.hit.source).name}, {s.hit.heading}\n{s.text}" in prompt


class ReverseReranker(Reranker):
    """retrieval/rerank.Reranker's search with its rerank replaced: records what it was given, returns the worst
    first."""
    cfg = SimpleNamespace(depth=5)

    def __init__(self):
        self.seen = []

    def rerank(self, question, hits, k):
        self.seen.append((question, [h.chunk_id for h in hits], k))
        return list(reversed(hits))[:k]


def test_reranker_reorders_the_sources_in_the_prompt():
    rr, gen = ReverseReranker(), FakeGenerator(["ok [1]"])
    ans = answer_question("How fast?", FakeIndex(6), gen, k=2, reranker=rr)
    assert rr.seen == [("How fast?", [10, 11, 12, 13, 14], 2)]  # the encoder's top depth, not just k
    assert [s.hit.chunk_id for s in ans.sources] == [14, 13]
    prompt = gen.calls[0][0][1]["content"]
    assert prompt.index("w4_0") < prompt.index("w3_0") and "w0_0" not in prompt


def test_uncited_answer_lists_the_sources_given():
    ans = answer_question("q?", FakeIndex(2), FakeGenerator(["I do not know."]), k=2)
    assert not ans.cited and not ans.invalid
    assert format_sources(ans).startswith("Sources (given to the model, none cited):")


@pytest.mark.parametrize("context,max_new", [(4096, 200), (400, 100), (260, 60), (180, 20)])
def test_prompt_stays_within_budget(context, max_new):
    gen = FakeGenerator(["ok"], context=context)
    ans = answer_question("What is the rule?", FakeIndex(6, words=70), gen, k=6, max_new_tokens=max_new)
    messages, _ = gen.calls[0]
    used = len(gen.tokenizer.apply_chat_template(messages))
    assert used == ans.prompt_tokens and used + max_new <= context
    assert [s.number for s in ans.sources] == list(range(1, len(ans.sources) + 1))
    if context == 4096:
        assert len(ans.sources) == 6 and all(s.text == s.hit.text for s in ans.sources)
    else:
        assert 1 <= len(ans.sources) < 6
        assert all(s.text == s.hit.text for s in ans.sources[:-1])  # only the last may be cut
        assert set(ans.sources[-1].text.replace(" …", "").split()) <= set(ans.sources[-1].hit.text.split())


def test_question_over_budget_and_empty_question():
    with pytest.raises(ValueError, match="question alone"):
        build_prompt("word " * 500, FakeIndex(1).hits, WordTokenizer(), budget=100)
    with pytest.raises(ValueError, match="empty question"):
        answer_question("  ", FakeIndex(1), FakeGenerator([]))


def test_clean_text_keeps_valid_groups():
    hits = FakeIndex(2).hits
    a = Answer("q", "x [1, 5] y [5] z [2]", [Source(1, hits[0], ""), Source(2, hits[1], "")])
    assert a.clean_text == "x [1] y  z [2]"


def test_demo_runs_with_a_fake_generator(tmp_path, capsys):
    run_demo(n_questions=2, index_dir=tmp_path, generator=FakeGenerator(["Within 1 hour [1]."]))
    out = capsys.readouterr().out
    assert "10 added" in out and out.count("Sources cited:") == 2 and "expected source: 04_burst_mains.html" in out
    run_demo(n_questions=1, index_dir=tmp_path, generator=FakeGenerator(["ok"]))
    assert "10 unchanged; 0 chunks embedded" in capsys.readouterr().out


def test_demo_index_keeps_only_this_checkouts_documents(tmp_path, monkeypatch, capsys):
    """The demo index is shared by every checkout ($PHIFORGE_HOME): another clone's copies of the documents must
    not stay in it as duplicate hits."""
    clones = []
    for name in ("clone_a", "clone_b"):
        (tmp_path / name / "docs").mkdir(parents=True)
        shutil.copy(DOCS / "04_burst_mains.html", tmp_path / name / "docs")
        clones.append(tmp_path / name)
    for clone in clones:
        monkeypatch.setattr(demo, "data_dir", lambda c=clone: c)
        (clone / "docs_questions.jsonl").write_text("")
        demo.run_demo(n_questions=0, index_dir=tmp_path / "ix", generator=FakeGenerator(["ok"]))
    assert "removed 1 sources from elsewhere" in capsys.readouterr().out
    with Index.open(tmp_path / "ix") as ix:
        assert ix.sources() == [str((clones[1] / "docs" / "04_burst_mains.html").resolve())]


# ------------------------------------------------------------------------------------------ end to end (real)
@pytest.fixture(scope="module")
def docs_index(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rag_index")
    assert main(["index", "add", str(DOCS), "--index", str(folder)]) == 0
    return folder


def test_cli_index_search_stats_rm(docs_index, capsys, tmp_path):
    capsys.readouterr()
    assert main(["index", "add", str(DOCS), "--index", str(docs_index)]) == 0
    assert "0 added, 0 replaced, 10 unchanged" in capsys.readouterr().out  # nothing embedded again
    assert main(["search", "--index", str(docs_index), "hosepipe ban storage trigger", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.lstrip().startswith("1.") and "09_drought_plan.md" in out.splitlines()[0]
    assert main(["index", "stats", "--index", str(docs_index), "--json"]) == 0
    assert '"files": 10' in capsys.readouterr().out
    empty = tmp_path / "empty"
    assert main(["search", "--index", str(empty), "anything"]) == 1
    assert "no index there" in capsys.readouterr().err and not empty.exists()  # readers never create one
    Index.open(empty).close()
    assert main(["search", "--index", str(empty), "anything"]) == 1
    assert "is empty" in capsys.readouterr().err
    assert main(["index", "rm", str(DOCS / "nope.md"), "--index", str(docs_index)]) == 1
    assert "no such source" in capsys.readouterr().err


def test_shipped_questions_retrieve_their_source(docs_index):

    qs = [json.loads(line) for line in (REPO / "data" / "docs_questions.jsonl").read_text().splitlines()]
    with Index.open(docs_index) as ix:
        top3 = [[Path(h.source).name for h in ix.search(q["question"], 3)] for q in qs]
    assert all((DOCS / q["source"]).is_file() for q in qs)
    assert sum(q["source"] in t for q, t in zip(qs, top3)) == len(qs)  # recall@3 = 1 on the shipped set


def test_ask_end_to_end_with_default_model(docs_index, capsys):
    """The real default model (SmolLM2-135M) answers through `phiforge ask`; we check structure, not quality:
    something streams, then a source list whose every number is one of the k sources retrieved."""
    capsys.readouterr()
    rc = main(["ask", "--index", str(docs_index), "--max-new-tokens", "16", "-k", "2",
               "How quickly must a crew reach a burst on a trunk main?"])
    out = capsys.readouterr().out
    assert rc == 0
    answer, sep, listing = out.rpartition("\n\nSources")
    assert sep and answer.strip()
    listed = {int(line.split("]")[0].strip(" [")): line for line in listing.splitlines()
              if line.strip().startswith("[")}
    assert listed and set(listed) <= {1, 2}
    assert "04_burst_mains.html" in listed.get(1, "") or "04_burst_mains.html" in listed.get(2, "")
    cited = {n for n in parse_citations(answer) if n in (1, 2)}
    assert listing.startswith(" cited:") == bool(cited)
    if cited:
        assert set(listed) == cited


def test_ask_rerank_gives_the_model_the_reranked_sources(docs_index, capsys, monkeypatch):
    """`ask --rerank`: the sources in the prompt are the zero-shot reranker's top k, in its order."""
    from phiforge.retrieval.rerank import load_reranker

    q = "When is a boil water notice issued?"
    seen = []
    real = answer_question

    def spy(*a, **kw):
        ans = real(*a, **kw)
        seen.append([s.hit.chunk_id for s in ans.sources])
        return ans

    monkeypatch.setattr("phiforge.retrieval.cli.answer_question", spy)
    assert main(["ask", "--index", str(docs_index), "--max-new-tokens", "4", "-k", "3", "--rerank", q]) == 0
    rr = load_reranker(None)
    with Index.open(docs_index, create=False) as ix:
        want = [h.chunk_id for h in rr.rerank(q, ix.search(q, k=rr.cfg.depth), 3)]
    assert seen == [want[:len(seen[0])]] and seen[0]


# ------------------------------------------------------------------------------------------ structured answers
TARIFF = REPO / "data" / "schemas" / "tariff.json"


def test_with_citations_adds_a_field_of_only_the_shown_sources():
    obj = json.loads(TARIFF.read_text())
    s = with_citations(obj, 3)
    jsonschema.validate({"standing_charge_gbp": 1, "rate_per_cubic_metre_gbp": 2, "service": "water",
                         "citations": [1, 3]}, s)
    for bad in ([], [4], [0]):   # none, or a number that names no source
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"standing_charge_gbp": 1, "rate_per_cubic_metre_gbp": 2, "service": "water",
                                 "citations": bad}, s)
    wrapped = with_citations({"type": "string"}, 2)
    jsonschema.validate({"answer": "x", "citations": [2]}, wrapped)
    with pytest.raises(ValueError, match="'citations' property of its own"):
        with_citations({"type": "object", "properties": {"citations": {}}}, 2)


def test_ask_json_schema_end_to_end_with_default_model(docs_index, capsys, tmp_path):
    """`phiforge ask --json-schema`: the printed answer is JSON valid against the schema plus its citations field,
    and the source list is exactly the sources it cites."""
    capsys.readouterr()
    rc = main(["ask", "--index", str(docs_index), "--json-schema", str(TARIFF), "--max-new-tokens", "80", "-k", "3",
               "What are the metered water standing charge and volumetric rate for 2026/27?"])
    out = capsys.readouterr().out
    assert rc == 0
    answer, sep, listing = out.rpartition("\n\nSources cited:")
    assert sep, out
    data = json.loads(answer)
    jsonschema.validate(data, with_citations(json.loads(TARIFF.read_text()), 3))
    listed = [int(line.split("]")[0].strip(" [")) for line in listing.splitlines() if line.strip().startswith("[")]
    assert listed == list(dict.fromkeys(data["citations"]))
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main(["ask", "--index", str(docs_index), "--json-schema", str(tmp_path / "bad.json"), "q"]) == 1
    assert "--json-schema" in capsys.readouterr().err
