"""Fine-tuning data: assistant-only labels (with the end-of-turn token), bad-line errors, truncation, packing."""
from __future__ import annotations

import json

import pytest
import torch

from phiforge.engine.train.data import (IGNORE, DataError, DataStats, Batches, Sample, collate, encode_row,
                                        load_dataset, make_sample, read_jsonl)
from phiforge.engine.formats.default_model import default_model_path
from phiforge.engine.formats.loader import load_model
from phiforge.engine.model.tokenizer import load_tokenizer
from phiforge.engine.train.loop import step_batches
from phiforge.engine.train.loss import lm_loss_sum
from tiny_phi3 import save_tiny


pytestmark = pytest.mark.usefixtures("one_thread")

CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Emergency number?"},
                     {"role": "assistant", "content": "0800 555 0192."},
                     {"role": "user", "content": "Open at night?"},
                     {"role": "assistant", "content": "Yes, 24 hours a day."}]}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_model_path())


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def labelled_text(tok, ids, targets):
    return tok.decode([ids[t + 1] for t in range(len(ids) - 1) if targets[t] != IGNORE])


def test_chat_labels_are_the_assistant_turns_with_end_of_turn(tok):
    ids, labelled = encode_row(tok, CHAT)
    assert ids == tok.apply_chat_template(CHAT["messages"], add_generation_prompt=False)  # one tokenization
    s = make_sample(ids, labelled, 512, DataStats())
    eot = "<|im_end|>"
    assert labelled_text(tok, s.ids, s.targets) == f"0800 555 0192.{eot}Yes, 24 hours a day.{eot}"
    # the prompt the model sees at inference is exactly the unlabelled prefix before the first assistant turn
    prompt = tok.apply_chat_template(CHAT["messages"][:2], add_generation_prompt=True)
    assert ids[:len(prompt)] == prompt and not any(labelled[:len(prompt)])
    assert labelled[len(prompt)]


def test_prompt_completion_labels(tok):
    ids, labelled = encode_row(tok, {"prompt": "Q: hotline?\nA:", "completion": " 0800 555 0192"})
    s = make_sample(ids, labelled, 512, DataStats())
    assert labelled_text(tok, s.ids, s.targets) == " 0800 555 0192" + tok.special_tokens["eos_token"]


def test_bad_lines_name_file_and_line(tok, tmp_path):
    p = write(tmp_path / "d.jsonl", [CHAT, "{not json", {"messages": [{"role": "user", "content": "hi"}]},
                                     {"prompt": "a"}, {"messages": [{"role": "robot", "content": "x"}]}, CHAT])
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        read_jsonl(p)
    stats = DataStats()
    rows = read_jsonl(p, skip_bad=True, stats=stats)
    assert len(rows) == 2 and stats.skipped_bad == 4
    assert [e.split(": ", 1)[0].rsplit(":", 1)[1] for e in stats.errors] == ["2", "3", "4", "5"]
    assert "no assistant message" in stats.errors[1] and "'completion'" in stats.errors[2]


def test_empty_dataset_is_a_clear_error(tok, tmp_path):
    with pytest.raises(DataError, match="empty"):
        read_jsonl(write(tmp_path / "e.jsonl", []))
    with pytest.raises(DataError, match="no usable rows"):
        read_jsonl(write(tmp_path / "b.jsonl", ["[1, 2]"]), skip_bad=True)
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_truncation_is_counted_and_unlabelled_samples_dropped(tok, tmp_path):
    long = {"prompt": "word " * 50, "completion": " answer"}
    p = write(tmp_path / "t.jsonl", [CHAT, long])
    samples, stats = load_dataset(p, tok, seq_len=40)
    assert stats.truncated == 2 and stats.dropped_unlabelled == 1  # the long prompt leaves no completion
    assert len(samples) == 1 and len(samples[0].ids) == 40
    with pytest.raises(DataError, match="lost all its labelled tokens"):
        load_dataset(write(tmp_path / "only.jsonl", [long]), tok, seq_len=40)


def test_fully_masked_batch_is_a_clear_error():
    masked = Sample([5, 6, 7], [IGNORE] * 3)
    loader = Batches([masked, masked], batch_size=2, seq_len=16, pad_id=0, seed=0)
    with pytest.raises(DataError, match="every token .* is masked"):
        step_batches(loader, 0, grad_accum=1)


def test_packing_restarts_positions_and_isolates_samples(tok, tmp_path):
    path, _ = save_tiny(tmp_path / "m", with_tokenizer=True)
    model = load_model(path, dtype=torch.float32)
    rows = [CHAT, {"prompt": "Hello there", "completion": " general"}, {"prompt": "x", "completion": " y z"}]
    samples, _ = load_dataset(write(tmp_path / "p.jsonl", rows), tok, seq_len=128)
    loader = Batches(samples, batch_size=1, seq_len=128, pad_id=0, seed=0, packed=True, shuffle=False)
    assert len(loader) == 1
    b = loader.batch(0)
    lens = [len(s.ids) for s in samples]
    assert b.input_ids.shape == (1, sum(lens))
    assert b.position_ids[0].tolist() == [i for n in lens for i in range(n)]
    assert b.segment_ids[0].tolist() == [k for k, n in enumerate(lens) for _ in range(n)]
    assert b.n_labels == sum(s.n_labels for s in samples)
    with torch.no_grad():  # packed loss == the sum of the samples' own losses: nothing leaks across samples
        packed = lm_loss_sum(model, b.input_ids, b.targets, b.position_ids, b.segment_ids)
        alone = sum(lm_loss_sum(model, torch.tensor([s.ids]), torch.tensor([s.targets])) for s in samples)
        naive = lm_loss_sum(model, b.input_ids, b.targets)  # what cross-sample attention would give
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-4)
    assert abs(float(naive) - float(alone)) > 1e-3


def test_padding_does_not_change_the_loss(tok, tmp_path):
    path, _ = save_tiny(tmp_path / "m", with_tokenizer=True)
    model = load_model(path, dtype=torch.float32)
    samples = [make_sample(*encode_row(tok, r), 128, DataStats())
               for r in (CHAT, {"prompt": "Hi", "completion": " there"})]
    b = collate([[s] for s in samples], pad_id=0, packed=False)
    assert b.input_ids.shape[1] == max(len(s.ids) for s in samples)
    with torch.no_grad():
        batched = lm_loss_sum(model, b.input_ids, b.targets, b.position_ids)
        alone = sum(lm_loss_sum(model, torch.tensor([s.ids]), torch.tensor([s.targets])) for s in samples)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-4)


def test_loader_is_deterministic_and_covers_each_epoch():
    samples = [Sample([i, i + 1], [i + 1, IGNORE]) for i in range(10)]
    a = Batches(samples, 3, 16, 0, seed=7)
    b = Batches(samples, 3, 16, 0, seed=7)
    seen = [a.batch(m).input_ids[:, 0].tolist() for m in range(len(a))]
    assert sorted(sum(seen, [])) == list(range(10))
    assert [b.batch(m).input_ids[:, 0].tolist() for m in range(len(b))] == seen
    assert [a.batch(len(a) + m).input_ids[:, 0].tolist() for m in range(len(a))] != seen  # new epoch, new order


def test_phi3_template_spans_end_at_end_token(tok):
    """Phi-3's template ends a transcript with eos after the last <|end|>: the label stops at <|end|>."""
    import copy

    from phiforge.engine.train.data import chat_spans
    from phiforge.engine.model.tokenizer import PHI3_CHAT_TEMPLATE, _compile

    phi3 = copy.copy(tok)
    phi3.chat_template, phi3._template = PHI3_CHAT_TEMPLATE, _compile(PHI3_CHAT_TEMPLATE)
    phi3.special_tokens = {**tok.special_tokens, "eos_token": "<|endoftext|>"}
    text, spans = chat_spans(phi3, CHAT["messages"])
    assert text.endswith("<|end|>\n<|endoftext|>")
    assert [text[a:b] for a, b in spans] == ["0800 555 0192.<|end|>", "Yes, 24 hours a day.<|end|>"]
