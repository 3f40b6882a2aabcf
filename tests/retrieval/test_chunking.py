"""Ingest and chunking: the 256-piece limit is a hard property, offsets and headings are exact, bad files skip."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from phiforge.retrieval.chunking import (LIMIT_TOKENS, Skipped, chunk_document, chunk_file, collect_files,
                                         counting_tokenizer, read_document)
from phiforge.retrieval.encoder import MAX_TOKENS, load_wordpiece

DOCS = Path(__file__).resolve().parents[2] / "data" / "docs"


@pytest.fixture(scope="module")
def full_tok():
    return load_wordpiece(max_tokens=None)  # with [CLS]/[SEP], no truncation: the real length


def prose(n: int) -> str:
    return " ".join(f"Sentence {i} says the pump at site {i % 17} delivered {i * 3} litres per second."
                    for i in range(n))


def check_chunks(doc, chunks, full_tok):
    assert chunks
    for c in chunks:
        assert doc.text[c.start:c.end] == c.text  # offsets index the document text
        assert c.text == c.text.strip() and c.text
        n = len(full_tok.encode(c.embed_text).ids)
        assert n <= MAX_TOKENS, (n, c.heading, c.text[:80])  # the encoder would silently drop the rest
        assert n - 2 == c.n_tokens
    # every non-blank character of the document lands in some chunk (nothing lost between chunks)
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    missing = [i for i in range(len(doc.text)) if not doc.text[i].isspace() and i not in covered]
    in_section = [i for i in missing if any(s.start <= i < s.end for s in doc.sections)]
    assert not in_section  # (heading lines sit outside sections: they travel in Chunk.heading)


def test_shipped_docs_respect_limit(full_tok):
    files, skipped = collect_files([DOCS])
    assert len(files) >= 8 and not skipped
    for f in files:
        doc, chunks = chunk_file(f)
        check_chunks(doc, chunks, full_tok)
        assert all(c.source == str(f.resolve()) for c in chunks)


def test_long_section_target_overlap_and_sentence_ends(tmp_path, full_tok):
    p = tmp_path / "long.md"
    p.write_text("# Pumps\n\n" + prose(120) + "\n\n## Valves\n\n" + prose(30))
    doc, chunks = chunk_file(p)
    check_chunks(doc, chunks, full_tok)
    pumps = [c for c in chunks if c.heading == "Pumps"]
    assert len(pumps) >= 5
    assert all(150 <= c.n_tokens <= 205 for c in pumps[:-1])  # about 200 pieces each
    for a, b in zip(pumps, pumps[1:]):
        assert b.start < a.end  # overlap with the previous chunk
        assert b.start > a.start  # and progress
        assert a.text.endswith(".") and b.text.startswith("Sentence")  # cut at sentence boundaries
    assert {c.heading for c in chunks} == {"Pumps", "Pumps > Valves"}
    assert all(not c.text.startswith("#") for c in chunks)  # the heading line rides in .heading


def test_unbreakable_text_is_cut_under_limit(tmp_path, full_tok):
    p = tmp_path / "wall.txt"
    p.write_text(" ".join(["word"] * 1500) + "\n\n" + "x" * 5000 + "\n\n" + "Ünïcode café " * 300)
    doc, chunks = chunk_file(p)
    check_chunks(doc, chunks, full_tok)
    assert max(c.n_tokens for c in chunks) <= LIMIT_TOKENS


def test_long_heading_is_cut(tmp_path, full_tok):
    p = tmp_path / "h.md"
    p.write_text("# " + "very long heading " * 60 + "\n\n" + prose(40))
    doc, chunks = chunk_file(p)
    check_chunks(doc, chunks, full_tok)


def test_html_extraction(tmp_path):
    p = tmp_path / "page.html"
    p.write_text("<html><head><title>T</title><style>.a{}</style><script>var secret=1;</script></head><body>"
                 "<h1>Tariffs &amp; charges</h1><p>Water costs &pound;1.87 per m3.</p>"
                 "<h2>Business</h2><table><tr><td>rate</td><td>1.61</td></tr></table></body></html>")
    doc = read_document(p)
    assert "secret" not in doc.text and ".a{}" not in doc.text
    assert "Water costs £1.87 per m3." in doc.text
    assert [s.heading for s in doc.sections] == ["Tariffs & charges", "Tariffs & charges > Business"]
    chunks = chunk_document(doc)
    assert chunks[0].text == "Water costs £1.87 per m3." and "1.61" in chunks[1].text


def test_jsonl_records(tmp_path):
    p = tmp_path / "kb.jsonl"
    lines = [json.dumps({"title": "Meters", "text": "Meters are replaced after 15 years."}), "{not json",
             json.dumps({"id": 7, "content": "Hydrants are inspected every 2 years."}), json.dumps({"x": 1})]
    p.write_text("\n".join(lines))
    doc, chunks = chunk_file(p)
    assert [c.heading for c in chunks] == ["Meters", "7"]
    assert chunks[1].text == "Hydrants are inspected every 2 years."
    assert any(":2: not JSON" in w for w in doc.warnings) and any(":4: no text field" in w for w in doc.warnings)


@pytest.mark.parametrize("name,data,reason", [
    ("blob.txt", b"abc\x00\x01\x02" * 10, "binary"),
    ("latin.txt", "café".encode("latin-1"), "not UTF-8"),
    ("empty.md", b"   \n\n", "no text"),
    ("image.png", b"\x89PNG", "unsupported type"),
])
def test_bad_files_are_skipped_with_reason(tmp_path, name, data, reason):
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(Skipped, match=reason):
        read_document(p)


def test_collect_files(tmp_path):
    (tmp_path / "a.md").write_text("# A\n\nx.")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("b.")
    (tmp_path / "sub" / "c.bin").write_bytes(b"\x00")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "d.md").write_text("d")
    files, skipped = collect_files([tmp_path, tmp_path / "nope.md"])
    assert [f.name for f in files] == ["a.md", "b.txt"]
    assert dict((Path(p).name, r) for p, r in skipped) == {"c.bin": "unsupported type .bin",
                                                           "nope.md": "no such file or folder"}


def test_hash_follows_text(tmp_path):
    p = tmp_path / "a.md"
    p.write_text("# A\n\nOne. Two.")
    (c1,) = chunk_file(p)[1]
    p.write_text("# A\n\nOne. Three.")
    (c2,) = chunk_file(p)[1]
    assert c1.hash != c2.hash and len(c1.hash) == 64
    p.write_text("# A\n\nOne. Two.")
    assert chunk_file(p)[1][0].hash == c1.hash
    assert counting_tokenizer() is counting_tokenizer()
