"""The pipeline as one library call, global allocation, whole structures removed, the refit's intercept."""

import pytest
import torch

from hywia_lightning import GlobalAllocation, HyWIA, PruningScope, UniformAllocation, apply_plan, prune, target_layers
from hywia_lightning.core.plan import TOLERANCE, LayerPlan, PruningPlan, count_parameters
from hywia_lightning.core.structures import discover_structures
from hywia_lightning.core.unit_groups import GroupKey
from hywia_lightning.reconstruction.modes import Independent, Sequential

from .conftest import tiny_llama

WINDOWS = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(0))


def logits(model, ids=WINDOWS[:2]):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_model_prunes_through_the_library_alone():
    """No Trainer, no callback: estimate, fuse, allocate globally, slice; the target is met."""
    model = tiny_llama(num_key_value_heads=2, num_hidden_layers=4)
    total = count_parameters(model)
    scorer = HyWIA(["element1", "element2", "vector2", "fluctuation"], "heuristic", normalization="kind")
    result = prune(model, WINDOWS, scorer, PruningScope(0.25), GlobalAllocation(), target_layers(model, 1, -1))
    assert set(result.plan.layers) == {1, 2}
    assert set(result.record["weights"]) == {"layers.1.mlp", "layers.1.self_attn", "layers.2.mlp", "layers.2.self_attn"}
    apply_plan(model, result.plan)
    assert abs(1 - count_parameters(model) / total - 0.25) <= TOLERANCE
    assert torch.isfinite(logits(model)).all()


def test_the_same_inputs_give_the_same_plan():
    plans = []
    for _ in range(2):
        model = tiny_llama(num_key_value_heads=2, num_hidden_layers=4)
        plans.append(prune(model, WINDOWS, HyWIA(["element1", "vector"]), PruningScope(0.2), GlobalAllocation(),
                           target_layers(model, 1, -1)).plan)
    assert plans[0] == plans[1]


def flat_scores(layers, mlp_spread: dict[int, float]):
    """Scores whose within-layer spread differs per layer (log-uniform of the given width)."""
    g = torch.Generator().manual_seed(0)
    scores = {}
    for s in layers:
        scores[GroupKey(s.layer, "mlp")] = torch.exp(mlp_spread[s.layer] * torch.rand(s.mlp.num_channels, generator=g))
        scores[GroupKey(s.layer, "attention")] = torch.rand(s.attention.num_heads, generator=g) + 1
    return scores


def test_global_allocation_meets_the_target_and_differs_per_layer():
    model = tiny_llama(num_key_value_heads=2, num_hidden_layers=4, intermediate_size=256)
    layers = discover_structures(model)
    total = count_parameters(model)
    scores = flat_scores(layers, {0: 0.1, 1: 0.1, 2: 0.1, 3: 0.1})
    scores[GroupKey(2, "mlp")] = scores[GroupKey(2, "mlp")] * 1e-3  # layer 2's channels all matter little
    widths = GlobalAllocation(standardize="kind").widths(layers, total, PruningScope(0.3), scores)
    assert widths[2].num_channels < min(widths[i].num_channels for i in (0, 1, 3))
    uniform = UniformAllocation().widths(layers, total, PruningScope(0.3))
    assert len({w.num_channels for w in uniform.values()}) <= 2  # uniform: the same share everywhere


def test_a_floor_keeps_every_structure_and_no_floor_can_remove_one():
    model = tiny_llama(num_key_value_heads=2, num_hidden_layers=4, intermediate_size=256)
    layers = discover_structures(model)
    total = count_parameters(model)
    scores = flat_scores(layers, {i: 0.1 for i in range(4)})
    scores[GroupKey(2, "mlp")] *= 1e-6
    free = GlobalAllocation(standardize="kind").widths(layers, total, PruningScope(0.2), scores)
    assert free[2].num_channels == 0  # the whole MLP of layer 2 goes
    floored = GlobalAllocation(min_keep=0.25, standardize="kind").widths(layers, total, PruningScope(0.2), scores)
    assert floored[2].num_channels == 64
    with pytest.raises(ValueError, match=r"min_keep=0.5, max_keep=0.4"):
        GlobalAllocation(min_keep=0.5, max_keep=0.4)


def test_a_layer_without_attention_or_mlp_runs_exports_and_reloads(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from hywia_lightning.export.huggingface import export_pretrained

    model = tiny_llama(num_key_value_heads=2, num_hidden_layers=3)
    apply_plan(model, PruningPlan("query_heads", {1: LayerPlan(heads=[], kv_heads=[], channels=[])}))
    assert model.config.layer_num_attention_heads[1] == 0 and model.config.layer_intermediate_size[1] == 0
    before = logits(model)
    assert torch.isfinite(before).all()
    assert [s.attention.num_heads for s in discover_structures(model)] == [4, 0, 4]
    export_pretrained(model, tiny_tokenizer, tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", trust_remote_code=True).eval()
    torch.testing.assert_close(logits(loaded), before)
    with torch.no_grad():
        generated = loaded.generate(WINDOWS[:1, :4], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)


@pytest.mark.parametrize("mode", [Independent, Sequential])
def test_the_intercept_refit_lowers_the_error_and_travels_with_the_export(mode, tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from hywia_lightning.export.huggingface import export_pretrained

    errors = {}
    for intercept in (False, True):
        model = tiny_llama(num_key_value_heads=2, num_hidden_layers=3)
        plan = PruningPlan("query_heads", {
            1: LayerPlan(heads=[0, 2], kv_heads=[0, 1], channels=list(range(0, 96, 3))),
            2: LayerPlan(heads=[], kv_heads=[], channels=[]),  # only the intercept is left to fit here
        })
        strategy = mode(0.0, intercept)  # undamped: one more free parameter can only lower the residual
        strategy.before_slicing(model, plan, WINDOWS, lambda t: t)
        apply_plan(model, plan)
        results = strategy.after_slicing(model, plan, WINDOWS, lambda t: t)
        errors[intercept] = {str(k): r.error_after for k, r in results.items()}
        has_bias = model.model.layers[1].mlp.down_proj.bias is not None
        assert has_bias == intercept and model.config.layer_output_bias[2] == [intercept, intercept]
    for key in errors[True]:
        assert errors[True][key] <= errors[False][key] * (1 + 1e-6)
    assert errors[True]["layers.2.mlp"] < errors[False]["layers.2.mlp"] == 1.0
    export_pretrained(model, tiny_tokenizer, tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", trust_remote_code=True).eval()
    torch.testing.assert_close(logits(loaded), logits(model))
