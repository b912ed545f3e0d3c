import json

import pytest
import torch

from callbacks import StructuredPruning

from hywia_lightning.estimation import ACCUMULATE_DTYPES, ImportanceEstimation, accumulate_dtype_named
from hywia_lightning.structures import discover_structures
from hywia_lightning.unit_groups import mlp_group, prunable_linears

from .conftest import tiny_llama
from .pipeline import prune_job, run_fit

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


def per_window_reference(model, params):
    """Mean g and g² from one plain backward per window (every weight trainable)."""
    grads = {p: [] for p in params}
    for window in WINDOWS:
        model.zero_grad()
        model(input_ids=window[None], labels=window[None]).loss.backward()
        for p in params:
            grads[p].append(p.grad.clone())
    model.zero_grad()
    return {p: (torch.stack(g).mean(0), torch.stack(g).pow(2).mean(0)) for p, g in grads.items()}


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_batched_statistics_equal_one_backward_per_window(batch_size):
    """Per-window gradients come exactly out of a batched pass (the last batch may be short)."""
    model = tiny_llama(attention_bias=True)  # biases too: their per-window gradient is Σ_t δ
    layers = discover_structures(model)[1:3]
    linears = prunable_linears(layers, "query_heads")
    estimator = ImportanceEstimation(model, linears, batch_size=batch_size)
    estimator.accumulate(WINDOWS)
    stats = estimator.statistics()
    assert estimator.windows_seen == len(WINDOWS)
    reference = per_window_reference(model, list(stats))
    assert any(m.bias is not None for m in linears)
    for p, (g, g2) in reference.items():
        torch.testing.assert_close(stats[p][0], g, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(stats[p][1], g2, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("name", ["bfloat16", "float64"])
def test_accumulators_use_the_configured_dtype(name):
    model = tiny_llama()
    layers = discover_structures(model)[1:2]
    linears = prunable_linears(layers, "query_heads")
    estimator = ImportanceEstimation(model, linears, accumulate_dtype_named(name))
    estimator.accumulate(WINDOWS)
    assert {t.dtype for t in estimator.grad_sum.values()} == {ACCUMULATE_DTYPES[name]}
    stats = estimator.statistics()
    weight = layers[0].mlp.up_proj.weight
    assert all(t.dtype == ACCUMULATE_DTYPES[name] for t in stats[weight])
    same = tiny_llama()  # the same seed: the same weights, estimated with float32 accumulators
    same_layers = discover_structures(same)[1:2]
    reference = estimate(same, same_layers)[same_layers[0].mlp.up_proj.weight]
    for got, want in zip(stats[weight][:2], reference[:2]):  # bfloat16 keeps ~3 digits of the sums' scale
        torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-2 * float(want.abs().max()))


def test_frozen_weights_and_no_gradient_buffers_remain():
    model = tiny_llama()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    estimate(model, discover_structures(model)[1:2])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_statistics_are_taken_once_and_bad_dtypes_are_refused():
    model = tiny_llama()
    estimator = ImportanceEstimation(model, prunable_linears(discover_structures(model)[1:2], "query_heads"))
    estimator.accumulate(WINDOWS[:1])
    estimator.statistics()
    with pytest.raises(RuntimeError, match="already"):
        estimator.statistics()
    with pytest.raises(ValueError, match="accumulate_dtype='float16'.*allowed: float32, float64, bfloat16"):
        accumulate_dtype_named("float16")
    with pytest.raises(ValueError, match="batch_size=0"):
        ImportanceEstimation(model, [], batch_size=0)


def test_pruning_callback_passes_its_estimation_keys(tiny_model_dir, tmp_path):
    """The plan is the same whatever the estimation batch size; a dtype that cannot hold g² is refused."""
    def plan(root, **keys):
        run_fit(prune_job(tiny_model_dir, root, data={"num_windows": 5}, granularity="element2", **keys), root)
        return json.loads((root / "export" / "pruning_plan.json").read_text())

    assert plan(tmp_path / "b3", estimation_batch_size=3, accumulate_dtype="float64") == plan(tmp_path / "b1")
    with pytest.raises(ValueError, match="accumulate_dtype='float16'"):
        StructuredPruning(target_ratio=0.2, accumulate_dtype="float16")
    with pytest.raises(ValueError, match="estimation_batch_size=0"):
        StructuredPruning(target_ratio=0.2, estimation_batch_size=0)
