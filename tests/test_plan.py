import pytest
import torch

from hywia_lightning.core.plan import (
    TOLERANCE, LayerPlan, PruningPlan, allocate_widths, count_parameters, select_heads, top_units,
)
from hywia_lightning.core.structures import discover_structures

from .conftest import tiny_llama


def removed_fraction(layers, widths, total):
    from hywia_lightning.core.plan import channel_params, head_params, kv_head_params

    removed = sum(
        (s.attention.num_heads - widths[s.layer].num_heads) * head_params(s.attention)
        + (s.attention.num_kv_heads - widths[s.layer].num_kv_heads) * kv_head_params(s.attention)
        + (s.mlp.num_channels - widths[s.layer].num_channels) * channel_params(s.mlp)
        for s in layers
    )
    return removed / total


@pytest.mark.parametrize("unit", ["query_heads", "kv_groups", "none"])
@pytest.mark.parametrize("ratio", [0.1, 0.25])
def test_widths_reach_the_target_within_tolerance(unit, ratio):
    model = tiny_llama(num_key_value_heads=2, num_hidden_layers=6, intermediate_size=256)
    layers = discover_structures(model)[1:5]
    total = count_parameters(model)
    widths = allocate_widths(layers, total, ratio, unit)
    assert abs(removed_fraction(layers, widths, total) - ratio) <= TOLERANCE
    for w in widths.values():
        assert w.num_heads % w.num_kv_heads == 0
        if unit == "query_heads":
            assert w.num_kv_heads == 2
        if unit == "none":
            assert (w.num_heads, w.num_kv_heads) == (4, 2)


def test_round_to_makes_kept_channels_multiples():
    model = tiny_llama(num_hidden_layers=6, intermediate_size=256)
    layers = discover_structures(model)
    widths = allocate_widths(layers, count_parameters(model), 0.2, "query_heads", round_to=16)
    assert all(w.num_channels % 16 == 0 for w in widths.values())


def test_equal_widths_give_every_layer_the_same_width_within_tolerance():
    model = tiny_llama(num_hidden_layers=6, intermediate_size=256)
    layers, total = discover_structures(model), count_parameters(model)
    assert len({w.num_channels for w in allocate_widths(layers, total, 0.2, "query_heads", 2, 8).values()}) > 1
    widths = allocate_widths(layers, total, 0.2, "query_heads", 2, 8, equal_widths=True)
    assert len({(w.num_heads, w.num_channels) for w in widths.values()}) == 1
    assert abs(removed_fraction(layers, widths, total) - 0.2) <= TOLERANCE


def test_a_head_target_gqa_cannot_meet_names_the_allowed_counts():
    model = tiny_llama(num_key_value_heads=2)
    layers = discover_structures(model)
    with pytest.raises(ValueError, match=r"heads_to_keep=3 cannot be met .* allowed: \[2, 4\]"):
        allocate_widths(layers, count_parameters(model), 0.2, "query_heads", heads_to_keep=3)


def test_an_unreachable_target_says_what_to_change():
    model = tiny_llama()
    layers = discover_structures(model)[1:2]
    with pytest.raises(ValueError, match="target_ratio=0.6 cannot be reached .*layer_start/layer_end"):
        allocate_widths(layers, count_parameters(model), 0.6, "query_heads")


def test_top_units_keeps_the_highest_scores_and_breaks_ties_by_index():
    assert top_units(torch.tensor([0.5, 2.0, 0.5, 1.0]), 2) == [1, 3]
    assert top_units(torch.tensor([1.0, 1.0, 1.0]), 2) == [0, 1]


def test_query_heads_are_kept_in_equal_numbers_per_kv_group():
    attn = discover_structures(tiny_llama(num_key_value_heads=2))[0].attention
    from hywia_lightning.core.plan import LayerWidths

    heads, kv = select_heads(torch.tensor([4.0, 3.0, 2.0, 1.0]), attn, LayerWidths(2, 2, 96), "query_heads")
    assert (heads, kv) == ([0, 2], [0, 1])  # the best head of each group, not the two best overall
    heads, kv = select_heads(torch.tensor([1.0, 5.0]), attn, LayerWidths(2, 1, 96), "kv_groups")
    assert (heads, kv) == ([2, 3], [1])


def test_plan_round_trips_through_a_dict():
    plan = PruningPlan("query_heads", {3: LayerPlan([0, 2], [0, 1], [1, 5, 7])})
    assert PruningPlan.from_dict(plan.to_dict()) == plan
