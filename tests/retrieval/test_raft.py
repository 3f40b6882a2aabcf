"""RAFT rows built from the bundled documents in a real index (a hashed bag-of-words encoder, so no model loads):
the gold chunk is kept at rate p, distractors are retrieved chunks and never the gold, the quote is verbatim and
its citation points at the gold, unanswerable questions abstain, and the same seed gives the same rows."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hash_encoder import HashEncoder
from word_tokenizer import WordTokenizer

from phiforge.engine.atomic import write_jsonl_atomic
from phiforge.retrieval.qa import ABSTAIN_ANSWER, QARow, abstained, closed_book_messages
from phiforge.retrieval.raft import (RaftError, answer_sentence, closed_book_rows, gold_chunk, is_qa_file,
                                     raft_example, raft_examples, sentences)
from phiforge.retrieval.rag import build_prompt, parse_citations
from phiforge.retrieval.store import Index

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "data" / "docs"


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    ix = Index.open(tmp_path_factory.mktemp("raft") / "index", encoder=HashEncoder(128))
    ix.add([DOCS])
    yield ix
    ix.close()


TOK = WordTokenizer()
BURST = QARow("How quickly must a crew reach a burst on a trunk main?", "within 1 hour", ("04_burst_mains.html",))
LEAD = QARow("What is the lead limit for drinking water?", "10 micrograms per litre",
             ("06_water_quality_sampling.txt",))
NONE = QARow("What is the chief executive's salary?", ABSTAIN_ANSWER, (), answerable=False)


def test_gold_chunk_holds_the_answer(index):
    for row, fact in ((BURST, "within 1 hour"), (LEAD, "lead 10 micrograms per litre")):
        gold = gold_chunk(row, index, index.search(row.question, k=5))
        assert Path(gold.source).name == row.sources[0] and fact in gold.text
    assert len(index.chunks_of("04_burst_mains.html")) >= 2  # the choice among several chunks is real


def test_gold_kept_at_rate_p(index):
    n, p = 400, 0.8
    kept = sum(raft_example(BURST, i, index, TOK, 4096, k=4, p=p).gold_number is not None for i in range(n))
    sd = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * p) < 4 * sd, kept  # a binomial(400, 0.8) count lies this close 99.99% of the time
    assert all(raft_example(BURST, i, index, TOK, 4096, p=0.0).gold_number is None for i in range(20))
    assert all(raft_example(BURST, i, index, TOK, 4096, p=1.0).gold_number is not None for i in range(20))


def test_distractors_are_retrieved_and_the_gold_never_twice(index):
    positions = set()
    for i in range(60):
        for row in (BURST, LEAD):
            ex = raft_example(row, i, index, TOK, 4096, k=4, p=0.5, seed=7)
            retrieved = {h.chunk_id for h in index.search(row.question, k=5)}
            ids = [h.chunk_id for h in ex.hits]
            assert len(ids) == 4 and len(set(ids)) == 4
            others = [h for j, h in enumerate(ex.hits, 1) if j != ex.gold_number]
            assert all(h.chunk_id in retrieved and h.chunk_id != ex.gold.chunk_id for h in others)
            assert ids.count(ex.gold.chunk_id) == (ex.gold_number is not None)
            if ex.gold_number is not None:
                positions.add(ex.gold_number)
    assert positions == {1, 2, 3, 4}  # the gold is placed anywhere, not always first


def test_quote_is_verbatim_and_the_citation_points_at_the_gold(index):
    ex = next(e for i in range(10) if (e := raft_example(BURST, i, index, TOK, 4096)).gold_number)
    n = ex.gold_number
    assert ex.hits[n - 1].chunk_id == ex.gold.chunk_id
    assert ex.quote in ex.gold.text and "within 1 hour" in ex.quote
    assert ex.target == f'[{n}] says: "{ex.quote}"\nAnswer: within 1 hour [{n}]'
    assert parse_citations(ex.target.rsplit("Answer:", 1)[1]) == [n]
    user = ex.messages[1]["content"]
    assert f"[{n}] 04_burst_mains.html" in user and ex.quote in user  # the model can see what it quotes
    dropped = next(e for i in range(40) if not (e := raft_example(BURST, i, index, TOK, 4096)).gold_number)
    assert dropped.target == "Answer: within 1 hour" and dropped.quote is None


def test_prompt_is_the_rag_prompt(index):
    ex = raft_example(LEAD, 3, index, TOK, 4096, seed=1)
    assert ex.messages == build_prompt(LEAD.question, ex.hits, TOK, 10**6)[0]
    assert ex.row()["messages"][-1] == {"role": "assistant", "content": ex.target}


def test_unanswerable_abstains_with_the_top_k(index):
    ex = raft_example(NONE, 0, index, TOK, 4096, k=3)
    assert ex.target == f"Answer: {ABSTAIN_ANSWER}" and abstained(ex.target)
    assert [h.chunk_id for h in ex.hits] == [h.chunk_id for h in index.search(NONE.question, k=3)]
    assert ex.gold is None and ex.gold_number is None


def test_a_budget_that_cuts_the_gold_drops_the_quote(index):
    ex = raft_example(BURST, 0, index, TOK, 4096, k=4, p=1.0)
    n = ex.gold_number
    assert n is not None
    short = [raft_example(BURST, 0, index, TOK, s, k=4, p=1.0) for s in range(140, 700, 20)]
    for e in short:  # whatever the budget keeps, a quote is only ever of what the prompt shows
        assert (e.gold_number is None) == (e.quote is None)
        if e.quote is not None:
            assert e.quote in e.messages[1]["content"]
        else:
            assert e.target == "Answer: within 1 hour"
    assert any(e.gold_number is None for e in short)
    # a budget that fits fewer than k sources drops distractors before it drops the gold
    assert any(e.gold_number is not None and len(e.hits) < 4 for e in short)
    assert all(e.gold_number is None or e.hits[e.gold_number - 1].chunk_id == e.gold.chunk_id for e in short)
    assert all(e.gold is None or e.gold_number is not None or e.gold.chunk_id not in [h.chunk_id for h in e.hits]
               for e in short)
    with pytest.raises(RaftError, match="--seq-len 40: too short for question 1"):
        raft_example(BURST, 0, index, TOK, 40)


def test_same_seed_same_rows(index):
    rows = [BURST, LEAD, NONE] * 4
    a = [e.row() for e in raft_examples(rows, index, TOK, 4096, seed=3)]
    b = [e.row() for e in raft_examples(rows, index, TOK, 4096, seed=3)]
    c = [e.row() for e in raft_examples(rows, index, TOK, 4096, seed=4)]
    assert a == b and a != c


def test_bad_options():
    with pytest.raises(RaftError, match="--raft-p"):
        raft_examples([BURST], None, TOK, 512, p=1.5)
    with pytest.raises(RaftError, match="--raft-k"):
        raft_examples([BURST], None, TOK, 512, k=0)


def test_sentences_are_verbatim():
    text = "E. coli 0 per 100 ml. Lead 10\nmicrograms.\n- Item one\n| a | b |\n\nNext paragraph\nwrapped"
    parts = sentences(text)
    assert parts == ["E. coli 0 per 100 ml.", "Lead 10\nmicrograms.", "- Item one", "| a | b |",
                     "Next paragraph\nwrapped"]
    assert all(s in text for s in parts)
    assert answer_sentence("10 micrograms per litre", text) == "Lead 10\nmicrograms."
    levels = "- Level 2: 250 to 5,000 properties affected.\n- Level 3: more than 5,000 properties affected."
    assert answer_sentence("more than 5,000 properties", levels) == "- Level 3: more than 5,000 properties affected."
    assert answer_sentence("5,000", levels, "What makes a level 3 incident?").startswith("- Level 3")
    assert answer_sentence("5,000", levels, "What makes a level 2 incident?").startswith("- Level 2")


def test_closed_book_rows_and_file_detection(tmp_path):
    rows = closed_book_rows([LEAD, NONE])
    assert rows[0]["messages"] == closed_book_messages(LEAD.question) + [
        {"role": "assistant", "content": "10 micrograms per litre"}]
    assert rows[1]["messages"][-1]["content"] == ABSTAIN_ANSWER
    write_jsonl_atomic(tmp_path / "rows.jsonl", rows)
    assert [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()] == rows
    assert not is_qa_file(tmp_path / "rows.jsonl")
    qa = tmp_path / "qa.jsonl"
    qa.write_text('\n{"question": "q", "answer": "a"}\n')
    assert is_qa_file(qa) and not is_qa_file(tmp_path / "missing.jsonl")
    (tmp_path / "pc.jsonl").write_text('{"prompt": "q", "completion": "a", "question": "x"}\n')
    assert not is_qa_file(tmp_path / "pc.jsonl")
