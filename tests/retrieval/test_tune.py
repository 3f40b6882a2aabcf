"""Encoder tuning: the multiple-negatives loss against a hand-written reference, hard-negative mining, the loss
falling on a tiny model, and the saved folder reloading to the same vectors (all weights and LoRA)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from phiforge.retrieval.encoder import (ENCODER_NAME, TUNED_CONFIG, BertConfig, Encoder, MiniLM, Packing,
                                        load_encoder, load_wordpiece)
from phiforge.retrieval.tune import (LORA_TARGETS, Pair, TuneConfig, _remine, embed, lora_adapter, mine_hard_negatives,
                                     mnrl_loss, save_tuned, trainable_copy, tune)

PASSAGES = ["Burst mains are repaired within four hours.", "The tariff is 1.87 pounds per cubic metre.",
            "Boil water notices follow low chlorine.", "Sampling happens at every service reservoir.",
            "Leaks are reported on the emergency line.", "Drought triggers a hosepipe ban."]
QUESTIONS = ["How fast is a burst main repaired?", "What does water cost per cubic metre?",
             "When is a boil water notice issued?", "Where are samples taken?",
             "How do I report a leak?", "What happens in a drought?"]


def tiny_encoder(seed: int = 0) -> Encoder:
    """A randomly initialised 2-layer MiniLM (hidden 32) with the real WordPiece tokenizer."""
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model = MiniLM(cfg)
    for layer in model.encoder.layer:
        layer.fuse_qkv()
    return Encoder(model, load_wordpiece())


class TableEncoder:
    """Fixed vectors per text: mining sees exactly the scores the test chose."""
    def __init__(self, table: dict[str, list[float]]):
        self.table, self.dim = table, len(next(iter(table.values())))

    def encode(self, texts):
        v = np.array([self.table[t] for t in texts], np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_mnrl_loss_matches_reference_and_masks_relevant():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    d = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    cand = [10, 11, 12, 13, 11]  # candidate 4 is passage 11 again (question 1's gold, as another's negative)
    relevant = [frozenset({10}), frozenset({11}), frozenset({12, 13})]
    got = mnrl_loss(q, d, cand, relevant, scale=20.0)
    # by hand: row i's softmax over the columns not relevant to question i, except its own gold column i
    ref = 0.0
    for i in range(3):
        cols = [j for j, c in enumerate(cand) if j == i or c not in relevant[i]]
        s = [20.0 * float(q[i] @ d[j]) for j in cols]
        ref += -(s[cols.index(i)] - np.log(np.sum(np.exp(s))))
    assert got.item() == pytest.approx(ref / 3, rel=1e-5)
    # question 2's other relevant passage (13) is out of its row: moving it cannot change the loss of row 2
    d2 = d.clone()
    d2[3] = q[2]
    assert mnrl_loss(q[2:], torch.cat([d2[2:3], d2[[0, 1, 3, 4]]]), [12, 10, 11, 13, 11], relevant[2:]).item() == \
        pytest.approx(mnrl_loss(q[2:], torch.cat([d[2:3], d[[0, 1, 3, 4]]]), [12, 10, 11, 13, 11],
                                relevant[2:]).item(), rel=1e-6)


def test_grouped_embed_equals_one_forward(one_thread):
    """embed() splits a step's texts into length-sorted forwards: same vectors, in the caller's order, and the same
    gradients as the single padded forward it replaced."""
    enc = tiny_encoder()
    model = trainable_copy(enc, 0)
    ids = enc.token_ids(PASSAGES + QUESTIONS + [" ".join(PASSAGES * 3)])  # one long text among short ones
    pk = Packing([len(x) for x in ids])
    ref = model(torch.tensor([t for x in ids for t in x]), pk)  # (N, H)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    (ref * w).sum().backward()
    ref_grad = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = embed(model, ids, grid_budget=64)  # small budget: several groups
    (got * w).sum().backward()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grad[n], rtol=1e-4, atol=1e-5, msg=n)


def test_mining_skips_relevant_and_near_gold_passages():
    corpus = ["gold", "also-relevant", "near-tie", "hard", "easy"]
    enc = TableEncoder({"q": [1, 0, 0], "gold": [0.8, 0.6, 0], "also-relevant": [0.99, 0.1, 0],
                        "near-tie": [0.79, 0.62, 0], "hard": [0.6, 0.8, 0], "easy": [0, 0, 1]})
    pair = Pair("q", 0, frozenset({0, 1}))
    # cos(q, gold)=0.8: near-tie (0.786) is within 5% of it, so the hardest usable negative is "hard" (0.6)
    assert mine_hard_negatives(enc, corpus, [pair], k=2, depth=5) == [[3, 4]]
    assert mine_hard_negatives(enc, corpus, [pair], k=0) == [[]]


def test_mining_from_golds_only():
    """pool "golds": negatives come only from the pairs' gold passages, however well another passage scores."""
    corpus = ["gold-a", "gold-b", "unlabelled", "gold-c"]
    enc = TableEncoder({"qa": [1, 0, 0], "qb": [0, 1, 0], "qc": [0, 0, 1], "gold-a": [1, 0.1, 0],
                        "gold-b": [0.1, 1, 0.3], "unlabelled": [0.9, 0.4, 0], "gold-c": [0.5, 0, 1]})
    pairs = [Pair("qa", 0, frozenset({0})), Pair("qb", 1, frozenset({1})), Pair("qc", 3, frozenset({3}))]
    # from the corpus, qa's hardest negative is the unlabelled passage; from the golds it is gold-c, then gold-b
    assert mine_hard_negatives(enc, corpus, pairs, k=1, depth=4)[0] == [2]
    assert mine_hard_negatives(enc, corpus, pairs, k=3, depth=4, pool="golds") == [[3, 1], [0, 3], [1, 0]]
    with pytest.raises(ValueError, match="--negatives-from"):
        mine_hard_negatives(enc, corpus, pairs, k=1, pool="everything")


def test_remine_uses_the_model_being_tuned(one_thread):
    """ANCE re-mining ranks with the training copy, not the encoder tuning started from, and tokenizes the passages
    it adds."""
    enc, other = tiny_encoder(0), tiny_encoder(1)
    pairs = [Pair(q, i, frozenset({i})) for i, q in enumerate(QUESTIONS)]
    cfg = TuneConfig(hard_negatives=2, negatives_from="corpus")
    p_ids: dict[int, list[int]] = {}
    got = _remine(trainable_copy(other, 0), enc, PASSAGES, pairs, cfg, p_ids)
    assert got == mine_hard_negatives(other, PASSAGES, pairs, 2, cfg.mine_depth)
    assert got != mine_hard_negatives(enc, PASSAGES, pairs, 2, cfg.mine_depth)
    mined = {j for n in got for j in n}
    assert mined and mined <= p_ids.keys()
    assert all(p_ids[j] == enc.token_ids([PASSAGES[j]])[0] for j in mined)


def test_loss_falls_on_tiny_model(one_thread):
    enc = tiny_encoder()
    pairs = [Pair(q, i, frozenset({i})) for i, q in enumerate(QUESTIONS)]
    before = enc.encode(PASSAGES).copy()
    res = tune(enc, PASSAGES, pairs, TuneConfig(epochs=12, lr=3e-3, batch=6, hard_negatives=1, warmup=0.0, seed=1))
    assert res.steps == 12 and not res.interrupted
    assert np.mean(res.losses[-3:]) < 0.5 * np.mean(res.losses[:3])
    np.testing.assert_array_equal(enc.encode(PASSAGES), before)  # the original encoder is left alone
    # the tuned encoder now ranks each question's gold first
    sims = res.encoder.encode(QUESTIONS) @ res.encoder.encode(PASSAGES).T
    assert (sims.argmax(1) == np.arange(len(QUESTIONS))).mean() >= 5 / 6


def test_seeded_runs_repeat(one_thread):
    pairs = [Pair(q, i, frozenset({i})) for i, q in enumerate(QUESTIONS)]
    cfg = TuneConfig(epochs=2, lr=1e-3, batch=3, seed=7)
    a = tune(tiny_encoder(), PASSAGES, pairs, cfg)
    b = tune(tiny_encoder(), PASSAGES, pairs, cfg)
    assert a.losses == b.losses
    np.testing.assert_array_equal(a.encoder.encode(QUESTIONS), b.encoder.encode(QUESTIONS))


def test_lora_trains_only_the_adapter(one_thread):
    enc = tiny_encoder()
    model = trainable_copy(enc, lora_rank=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(lora_adapter(model)) == 2 * len(LORA_TARGETS) * enc.model.cfg.num_hidden_layers
    pairs = [Pair(q, i, frozenset({i})) for i, q in enumerate(QUESTIONS)]
    res = tune(enc, PASSAGES, pairs, TuneConfig(epochs=3, lr=1e-2, batch=6, lora_rank=2))
    base, tuned = enc.model.state_dict(), res.encoder.model.state_dict()
    assert torch.equal(base["embeddings.word_embeddings.weight"], tuned["embeddings.word_embeddings.weight"])
    assert torch.equal(base["encoder.layer.0.attention.self.query.bias"],
                       tuned["encoder.layer.0.attention.self.query.bias"])  # LoRA leaves biases alone
    assert not torch.equal(base["encoder.layer.0.attention.self.query.weight"],
                           tuned["encoder.layer.0.attention.self.query.weight"])  # the merged update
    assert res.losses[-1] < res.losses[0]


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_interpolation_is_the_weight_space_mix(one_thread, lora_rank):
    """WiSE-FT: a run with interpolate=a returns a * (the same run's tuned weights) + (1 - a) * untuned, tensor by
    tensor, for all weights and for a merged LoRA update alike; a = 1 is the tuned run itself."""
    enc = tiny_encoder()
    pairs = [Pair(q, i, frozenset({i})) for i, q in enumerate(QUESTIONS)]
    cfg = dict(epochs=3, lr=1e-2, batch=6, lora_rank=lora_rank, seed=3)
    full = tune(enc, PASSAGES, pairs, TuneConfig(**cfg)).encoder.model.state_dict()
    half = tune(enc, PASSAGES, pairs, TuneConfig(**cfg, interpolate=0.25)).encoder.model.state_dict()
    base = enc.model.state_dict()
    moved = 0
    for k, b in base.items():
        torch.testing.assert_close(half[k], 0.25 * full[k] + 0.75 * b, rtol=1e-5, atol=1e-6)
        moved += not torch.equal(full[k], b)
    assert moved  # the tuned run changed something, so the check above is not base == base
    again = tune(enc, PASSAGES, pairs, TuneConfig(**cfg, interpolate=1.0)).encoder
    assert all(torch.equal(again.model.state_dict()[k], full[k]) for k in base)


def test_bad_settings_are_one_line_errors():
    for cfg, flag in ((TuneConfig(epochs=0), "--epochs"), (TuneConfig(lr=0.0), "--lr"),
                      (TuneConfig(batch=1), "--batch"), (TuneConfig(lora_rank=-1), "--lora-rank"),
                      (TuneConfig(interpolate=0.0), "--interpolate"), (TuneConfig(interpolate=1.5), "--interpolate")):
        with pytest.raises(ValueError, match=flag):
            cfg.check()
    with pytest.raises(ValueError, match="at least 2"):
        tune(tiny_encoder(), PASSAGES, [Pair("q", 0, frozenset({0}))], TuneConfig())


# ------------------------------------------------------------------------ real MiniLM: save and reload
@pytest.fixture(scope="module")
def minilm(one_thread):
    return load_encoder()


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_round_trip_through_safetensors(minilm, tmp_path, lora_rank):
    pairs = [Pair(q, i, frozenset({i})) for i, q in enumerate(QUESTIONS[:4])]
    res = tune(minilm, PASSAGES, pairs, TuneConfig(epochs=1, batch=4, lr=1e-3 if lora_rank else 1e-4,
                                                   hard_negatives=0, lora_rank=lora_rank))
    name = save_tuned(res.encoder, tmp_path / "enc", TuneConfig(lora_rank=lora_rank))
    meta = json.loads((tmp_path / "enc" / TUNED_CONFIG).read_text())
    assert meta["mode"] == ("lora" if lora_rank else "full") and name == meta["name"] == res.encoder.name
    assert name.startswith(ENCODER_NAME + "+tuned-") and name != ENCODER_NAME
    files = {p.name for p in (tmp_path / "enc").iterdir()}
    assert files == {TUNED_CONFIG, "adapter.safetensors" if lora_rank else "model.safetensors"}
    back = load_encoder(tmp_path / "enc")
    assert back.name == name and back.path == str((tmp_path / "enc").resolve())
    texts = PASSAGES + QUESTIONS
    np.testing.assert_allclose(back.encode(texts), res.encoder.encode(texts), atol=1e-6)
    # training moved the vectors away from the base model's
    assert np.abs(back.encode(texts) - minilm.encode(texts)).max() > 1e-4
    # a changed weights file is refused, not silently used under the old name
    w = tmp_path / "enc" / meta["weights"]
    w.write_bytes(w.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="sha256"):
        load_encoder(tmp_path / "enc")
