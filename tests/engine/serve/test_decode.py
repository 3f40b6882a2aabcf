"""DecodeStep computes what model.forward computes for one token per row, on every variant, padded batches too."""
from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_phi3 import TINY, VARIANTS, left_padded, make_hf_checkpoint

from phiforge.engine import load_model
from phiforge.engine.serve.decode import DecodeStep
from phiforge.engine.serve.kv_memory import KVRow
from phiforge.kernels.cpu import decode as cpu_decode


@pytest.mark.parametrize("variant,lens", [("mini-4k-window", [7, 19, 1]), ("gqa", [7, 19, 1]),
                                          ("partial-tied", [7, 19, 1]), ("gqa", [11])])
@pytest.mark.parametrize("rope_long", [False, True])
@pytest.mark.parametrize("native", [True, False])  # kernels/cpu/decode.py's whole step, or the torch step
def test_decode_step_equals_model_forward(tmp_path, variant, lens, rope_long, native):
    with contextlib.nullcontext() if native else cpu_decode.LIB.disabled():
        make_hf_checkpoint(tmp_path, VARIANTS[variant][0])
        model = load_model(tmp_path, dtype=torch.float32)
        # lens [7, 19, 1]: left-padded to 19; pad tokens at position -1
        B, P, steps = len(lens), max(lens), 24                # 19 + 24 > the window (15) of mini-4k-window
        ids, pos = left_padded(lens, steps)
        caches = [model.new_cache(B, P + steps, rope_long=rope_long) for _ in range(2)]
        with torch.inference_mode():
            for c in caches:
                model(ids[:, :P], position_ids=pos, cache=c, num_logits=1)
            step = DecodeStep(model, caches[1])
            assert (step.native is not None) == (native and cpu_decode.LIB.get() is not None)
            next_pos = torch.tensor(lens)
            for t in range(steps):
                tok = ids[:, P + t]
                ref = model(tok[:, None], position_ids=next_pos[:, None], cache=caches[0])[:, -1]
                got = step(tok, next_pos)
                assert (got - ref).abs().max().item() <= 1e-4, f"step {t}"
                next_pos += 1
        assert caches[1].length == caches[0].length == P + steps
        assert torch.equal(caches[1].pos, caches[0].pos)


def test_decode_step_overflow_is_an_error(tmp_path):
    make_hf_checkpoint(tmp_path, {})
    model = load_model(tmp_path, dtype=torch.float32)
    cache = model.new_cache(1, 4)
    with torch.inference_mode():
        model(torch.tensor([[5, 6, 7, 8]]), cache=cache)
        with pytest.raises(ValueError, match="overflow"):
            DecodeStep(model, cache)(torch.tensor([9]), torch.tensor([4]))


def test_decode_step_bf16_close_to_model_forward(tmp_path):
    """bf16 takes another attention formulation (K·qᵀ, see decode.py): equal to bf16 rounding."""
    make_hf_checkpoint(tmp_path, VARIANTS["gqa"][0])
    model = load_model(tmp_path, dtype=torch.bfloat16)
    ids = torch.randint(0, TINY["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(3))
    caches = [model.new_cache(1, 20) for _ in range(2)]
    with torch.inference_mode():
        for c in caches:
            model(ids[:, :12], cache=c, num_logits=1)
        step = DecodeStep(model, caches[1])
        for t in range(12, 20):
            ref = model(ids[:, t:t + 1], cache=caches[0])[:, -1].float()
            got = step(ids[:, t], torch.tensor([t])).float()
            assert (got - ref).abs().max().item() <= 0.02 * ref.abs().max().item() + 0.02


@pytest.mark.parametrize("variant", ["mini-4k-window", "gqa"])
@pytest.mark.parametrize("native", [True, False])
def test_rows_at_their_own_lengths_equal_each_row_alone(tmp_path, variant, native):
    """The serving engine's step: rows of one cache at different lengths, a different subset (out of order) each
    step, slots past a row's own holding a stale earlier request's K/V; each row's logits equal model.forward on that
    row alone."""
    with contextlib.nullcontext() if native else cpu_decode.LIB.disabled():
        make_hf_checkpoint(tmp_path, VARIANTS[variant][0])
        model = load_model(tmp_path, dtype=torch.float32)
        g = torch.Generator().manual_seed(1)
        lens, S, steps = [7, 19, 1, 12], 48, 20
        ids = [torch.randint(0, TINY["vocab_size"], (1, n + steps), generator=g) for n in lens]
        cache = model.new_cache(len(lens), S)
        cache.k.normal_(generator=g), cache.v.normal_(generator=g)   # an earlier occupant's K/V ...
        cache.pos.copy_(torch.arange(S).expand(len(lens), S))          # ... at positions that look valid
        alone = [model.new_cache(1, S) for _ in lens]
        length = list(lens)
        with torch.inference_mode():
            for r, n in enumerate(lens):
                cache.pos[r, n:] = -1 if r % 2 else cache.pos[r, n:]    # odd rows cleared, even rows stale
                view = KVRow(cache, r, 0, False)
                model(ids[r][:, :n], cache=view, num_logits=1)
                model(ids[r][:, :n], cache=alone[r], num_logits=1)
            step = DecodeStep(model, cache)
            subsets = [[0, 1, 2, 3], [3, 1], [2, 0, 3], [1]]
            for t in range(steps):
                rows = subsets[t % len(subsets)]
                tok = torch.stack([ids[r][0, length[r]] for r in rows])
                slots = torch.tensor([length[r] for r in rows])
                got = step(tok, slots, torch.tensor(rows), slots)
                for b, r in enumerate(rows):
                    ref = model(tok[b:b + 1, None], cache=alone[r])[0, -1]
                    assert (got[b] - ref).abs().max().item() <= 1e-4, f"step {t} row {r}"
                    length[r] += 1
