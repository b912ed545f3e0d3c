import torch

from hywia_lightning.estimation import ImportanceEstimation
from hywia_lightning.structures import discover_structures
from hywia_lightning.unit_groups import mlp_group, prunable_linears

from .conftest import tiny_llama

WINDOWS = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))


def estimate(model, layers):
    estimator = ImportanceEstimation(model, prunable_linears(layers, "query_heads"))
    estimator.accumulate(WINDOWS)
    return estimator.statistics()


def test_statistics_are_per_window_means_of_g_and_g_squared():
    model = tiny_llama()
    layers = discover_structures(model)[1:2]
    stats = estimate(model, layers)
    assert all(p.grad is None for p in model.parameters())  # folded into accumulators, then freed
    weight = layers[0].mlp.up_proj.weight
    grads = []
    for window in WINDOWS:
        model.zero_grad()
        model(input_ids=window[None], labels=window[None]).loss.backward()
        grads.append(weight.grad.clone())
    g = torch.stack(grads)
    torch.testing.assert_close(stats[weight][0], g.mean(0))
    torch.testing.assert_close(stats[weight][1], g.pow(2).mean(0))


def test_input_norms_follow_each_weight_elements_input_feature():
    model = tiny_llama()
    layers = discover_structures(model)[1:2]
    mlp = layers[0].mlp
    inputs = []
    handle = mlp.down_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for window in WINDOWS:
            model(input_ids=window[None])
    handle.remove()
    expected = torch.cat(inputs).pow(2).sum(0).sqrt()
    group = mlp_group(mlp, 4, estimate(model, layers))
    down = group.input_norms[2]  # down_proj columns, unit-major: row u is channel u's column
    torch.testing.assert_close(down, expected[:, None].expand_as(down), rtol=1e-4, atol=1e-5)
