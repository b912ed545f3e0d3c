"""The FLOP count of hywia_lightning.evaluation.flops equals what torch counts, dense and pruned."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hywia_lightning.core.plan import LayerPlan, PruningPlan
from hywia_lightning.core.slicing import apply_plan
from hywia_lightning.evaluation import flops

from .conftest import tiny_llama


def pruned_tiny():
    model = tiny_llama(num_key_value_heads=2, attn_implementation="eager")
    apply_plan(model, PruningPlan("query_heads", {
        1: LayerPlan(heads=[0, 2], kv_heads=[0, 1], channels=list(range(40))),
        2: LayerPlan(channels=[3, 5, 7]),
    }))
    return model


def counted(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("make", [lambda: tiny_llama(attn_implementation="eager"), pruned_tiny], ids=["dense", "pruned"])
def test_forward_flops_equal_torch_count(make):
    model = make()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    # eager attention multiplies the full 16 × 16 score matrix before masking: causal=False
    assert flops.forward_flops(model.config, 2, 16, causal=False) == counted(lambda: model(input_ids=ids))


def test_generate_flops_equal_torch_count():
    model = pruned_tiny()
    ids = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    run = lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                 min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert flops.generate_flops(model.config, 2, 8, 5, causal=False) == counted(run)


def test_per_layer_widths_are_read_from_the_config():
    model = pruned_tiny()
    assert flops.layer_widths(model.config)[1] == (2, 2, 40)
    assert flops.layer_widths(model.config)[2] == (4, 2, 3)
    dense = flops.projection_flops_per_token(tiny_llama().config)
    pruned = flops.projection_flops_per_token(model.config)
    assert pruned["lm_head"] == dense["lm_head"] == 2 * 64 * 300
    assert dense["mlp"] - pruned["mlp"] == 2 * 64 * 3 * ((96 - 40) + (96 - 3))
