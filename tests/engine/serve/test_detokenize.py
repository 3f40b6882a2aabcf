"""Incremental detokenization with the default model's byte-level BPE: whole characters, exact stop cuts."""
from __future__ import annotations

import pytest

from phiforge.engine import load_tokenizer
from phiforge.engine.serve.detokenize import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tok():
    from phiforge.engine.formats.default_model import default_model_path
    return load_tokenizer(default_model_path())


def _run(tok, text, stop=()):
    d = IncrementalDetokenizer(tok, stop)
    pieces = []
    for t in tok.encode(text, add_special_tokens=False):
        pieces.append(d.push(t))
        if d.stopped:
            break
    pieces.append(d.finish())
    return d, [p for p in pieces if p]


TEXTS = ["plain ascii, nothing special", "naïve café — 東京タワー 🙂👍🏽 ∑x²", "tabs\tand\nnewlines  double  spaces"]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_are_whole_characters_and_concatenate(tok, text):
    d, pieces = _run(tok, text)
    assert "".join(pieces) == d.text == text == tok.decode(tok.encode(text, add_special_tokens=False))
    assert not any("\ufffd" in p for p in pieces)


def test_the_split_character_case_is_exercised(tok):
    ids = tok.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1 and all("\ufffd" in tok.decode([i]) for i in ids)
    d = IncrementalDetokenizer(tok)
    assert [d.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🙂"]


@pytest.mark.parametrize("text,stop,want", [
    ("The answer is 42. END of story", ["END"], "The answer is 42. "),
    ("split <|stop|> here", ["<|stop|>"], "split "),                 # the stop arrives over several tokens
    ("a <|st b <|sto c", ["<|stop|>"], "a <|st b <|sto c"),          # prefixes that never complete are released
    ("first stop wins: B then A", ["A", "B"], "first stop wins: "),
    ("🙂 emoji stop 🙂 tail", ["🙂 t"], "🙂 emoji stop "),              # a stop that starts inside split bytes
    ("stop at the very start", ["stop"], ""),
])
def test_stop_strings_cut_exactly(tok, text, stop, want):
    d, pieces = _run(tok, text, stop)
    assert d.text == want and "".join(pieces) == want
    assert d.stopped == (want != text)
    for s in stop:  # nothing emitted ever contains the beginning of a stop string that completed after it
        if d.stopped:
            assert s not in "".join(pieces)


def test_held_back_prefix_is_not_emitted_early(tok):
    d = IncrementalDetokenizer(tok, ["<|stop|>"])
    out = ""
    for t in tok.encode("x <|sto", add_special_tokens=False):
        out += d.push(t)
    assert out == "x "              # "<|sto" may still become "<|stop|>": held back
    out += d.finish()
    assert out == "x <|sto"        # the stream ended without the stop: released
