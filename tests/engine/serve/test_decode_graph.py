"""CUDAGraphDecode's static-shape step (engine/serve/decode_graph.py) computes what model.forward and DecodeStep
compute, on every variant and padded batches, run eagerly on CPU. The graph capture itself needs CUDA:
bench/gpu_check.py compares the replay with the eager step there."""
from __future__ import annotations

import pytest
import torch
from tiny_phi3 import VARIANTS, left_padded, make_hf_checkpoint

from phiforge.engine import load_model
from phiforge.engine.serve.decode_graph import CUDAGraphDecode


@pytest.mark.parametrize("variant,lens", [("mini-4k-window", [7, 19, 1]), ("gqa", [7, 19, 1]),
                                          ("partial-tied", [11])])
@pytest.mark.parametrize("rope_long", [False, True])
def test_static_step_equals_model_forward(tmp_path, variant, lens, rope_long):
    make_hf_checkpoint(tmp_path, VARIANTS[variant][0])
    model = load_model(tmp_path, dtype=torch.float32)
    B, P, steps = len(lens), max(lens), 24                # 19 + 24 > the window (15) of mini-4k-window
    ids, pos = left_padded(lens, steps)
    # the static step attends over every slot: a cache longer than the sequence checks the unwritten ones are masked
    caches = [model.new_cache(B, P + steps + 5, rope_long=rope_long) for _ in range(2)]
    with torch.inference_mode():
        for c in caches:
            model(ids[:, :P], position_ids=pos, cache=c, num_logits=1)
        step = CUDAGraphDecode(model, caches[1])
        assert not step.graph_on
        next_pos = torch.tensor(lens)
        for t in range(steps):
            tok = ids[:, P + t]
            ref = model(tok[:, None], position_ids=next_pos[:, None], cache=caches[0])[:, -1]
            got = step(tok, next_pos)
            assert (got - ref).abs().max().item() <= 1e-4, f"step {t}"
            next_pos += 1
    assert caches[1].length == caches[0].length == P + steps
    assert torch.equal(caches[1].pos, caches[0].pos)
    assert torch.allclose(caches[1].k, caches[0].k, atol=1e-5) and torch.allclose(caches[1].v, caches[0].v, atol=1e-5)


def test_graph_needs_cuda_and_overflow_is_an_error(tmp_path):
    make_hf_checkpoint(tmp_path, {})
    model = load_model(tmp_path, dtype=torch.float32)
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="CUDA"):
        CUDAGraphDecode(model, cache, graph=True)
    with torch.inference_mode():
        model(torch.tensor([[5, 6, 7, 8]]), cache=cache)
        with pytest.raises(ValueError, match="overflow"):
            CUDAGraphDecode(model, cache)(torch.tensor([9]), torch.tensor([4]))
