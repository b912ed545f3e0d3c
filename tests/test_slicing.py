"""Exactness: removing a unit whose contribution is already zero must not change the outputs."""

import pytest
import torch

from hywia_lightning.core.plan import LayerPlan, PruningPlan
from hywia_lightning.core.slicing import apply_plan
from hywia_lightning.core.structures import discover_structures

from .conftest import tiny_llama

INPUT = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def zero_and_prune(model, layer, heads, kv_heads, channels, unit):
    """Zero the o_proj/down_proj columns of everything the plan drops in ``layer``, then prune it."""
    attn, mlp = model.model.layers[layer].self_attn, model.model.layers[layer].mlp
    d = attn.head_dim
    with torch.no_grad():
        for h in set(range(attn.q_proj.out_features // d)) - set(heads):
            attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
        for c in set(range(mlp.down_proj.in_features)) - set(channels):
            mlp.down_proj.weight[:, c] = 0
        reference = model(INPUT).logits
    apply_plan(model, PruningPlan(unit, {layer: LayerPlan(heads, kv_heads, channels)}))
    with torch.no_grad():
        return reference, model(INPUT).logits


@pytest.mark.parametrize("kv_heads,unit,heads,kept_kv", [
    (4, "query_heads", [1, 3], [1, 3]),         # MHA: a query head goes with its KV head
    (4, "kv_groups", [0, 2], [0, 2]),          # MHA as groups of one
    (2, "query_heads", [1, 2], [0, 1]),         # GQA: one query head from each group
    (2, "kv_groups", [2, 3], [1]),              # GQA: a whole KV group
    (1, "query_heads", [0, 3], [0]),            # MQA
])
def test_pruning_a_zeroed_unit_leaves_outputs_unchanged(kv_heads, unit, heads, kept_kv):
    model = tiny_llama(num_key_value_heads=kv_heads)
    channels = list(range(0, 96, 3))
    reference, pruned = zero_and_prune(model, 1, heads, kept_kv, channels, unit)
    torch.testing.assert_close(pruned, reference, atol=1e-5, rtol=1e-5)
    attn = discover_structures(model)[1].attention
    assert (attn.num_heads, attn.num_kv_heads) == (len(heads), len(kept_kv))


def test_pruned_model_runs_generate_and_its_config_tells_the_truth():
    model = tiny_llama(num_key_value_heads=2)
    apply_plan(model, PruningPlan("query_heads", {2: LayerPlan([0, 3], [0, 1], [5, 6, 7])}))
    out = model.generate(INPUT[:1, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)
    config = model.config
    assert config.layer_num_attention_heads == [4, 4, 2, 4]
    assert config.layer_num_key_value_heads == [2, 2, 2, 2]
    assert config.layer_intermediate_size == [96, 96, 3, 96]
    assert config.head_dim == 16
    for s in discover_structures(model):
        assert s.attention.q_proj.out_features == config.layer_num_attention_heads[s.layer] * 16
        assert s.mlp.down_proj.in_features == config.layer_intermediate_size[s.layer]
