import json

import pytest
import torch

from callbacks import StructuredPruning
from hywia_lightning.core.estimation import ACCUMULATE_DTYPES, Estimator, accumulate_dtype_named
from hywia_lightning.core.statistics import NEEDS
from hywia_lightning.core.structures import discover_structures
from hywia_lightning.core.unit_groups import GroupKey, prunable_linears, unit_groups

from .conftest import tiny_llama
from .pipeline import prune_job, run_fit

WINDOWS = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))


def estimator_for(model, layers, needs=NEEDS, **kwargs):
    return Estimator(model, prunable_linears(layers, "query_heads"), frozenset(needs), len(WINDOWS), **kwargs)


def estimate(model, layers, needs=NEEDS):
    estimator = estimator_for(model, layers, needs)
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
    torch.testing.assert_close(stats.parameters[weight].grad, g.mean(0))
    torch.testing.assert_close(stats.parameters[weight].sq_grad, g.pow(2).mean(0))
    taylor = weight.detach() * g  # windows × out × in
    torch.testing.assert_close(stats.parameters[weight].row_saliency, taylor.sum(2), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(stats.parameters[weight].col_saliency, taylor.sum(1), rtol=1e-4, atol=1e-7)


def test_activation_statistics_alone_need_no_backward():
    model = tiny_llama()
    layers = discover_structures(model)[1:2]
    stats = estimate(model, layers, {"input_moments"})
    entry = stats.parameters[layers[0].mlp.up_proj.weight]
    assert entry.grad is None and entry.sq_grad is None and entry.row_saliency is None
    inputs = []
    handle = layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for window in WINDOWS:
            model(input_ids=window[None])
    handle.remove()
    x = torch.cat(inputs)
    moments = stats.inputs[layers[0].mlp.down_proj]
    torch.testing.assert_close(moments.mean, x.mean(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(moments.variance, x.var(0), rtol=1e-3, atol=1e-6)


def test_output_gram_is_the_covariance_of_each_output_projections_inputs():
    model = tiny_llama()
    layers = discover_structures(model)[1:2]
    down, o_proj = layers[0].mlp.down_proj, layers[0].attention.o_proj
    estimator = Estimator(model, prunable_linears(layers, "query_heads"), frozenset({"input_moments", "output_gram"}),
                          len(WINDOWS), batch_size=2, output_projections=[o_proj, down])
    inputs = {down: [], o_proj: []}
    handles = [m.register_forward_pre_hook(lambda m, a: inputs[m].append(a[0].reshape(-1, a[0].shape[-1]).detach()))
               for m in inputs]
    estimator.accumulate(WINDOWS)
    for handle in handles:
        handle.remove()
    stats = estimator.statistics()
    for module, seen in inputs.items():
        torch.testing.assert_close(stats.inputs[module].covariance, torch.cov(torch.cat(seen).T), rtol=1e-3, atol=1e-6)
    assert stats.inputs[layers[0].mlp.up_proj].gram is None  # only output projections get an O(width²) sum
    with pytest.raises(ValueError, match="output_gram also needs input_moments"):
        Estimator(model, [down], frozenset({"output_gram"}), len(WINDOWS))


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
    group = unit_groups(layers, "query_heads", 4, estimate(model, layers))[0]
    assert group.key == GroupKey(1, "mlp")
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
    return {p: (torch.stack(g).mean(0), torch.stack(g).pow(2).mean(0), (p.detach() * torch.stack(g)).reshape(len(WINDOWS), p.shape[0], -1).sum(2))
            for p, g in grads.items()}


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_batched_statistics_equal_one_backward_per_window(batch_size):
    """Per-window gradients come exactly out of a batched pass (the last batch may be short)."""
    model = tiny_llama(attention_bias=True)  # biases too: their per-window gradient is Σ_t δ
    layers = discover_structures(model)[1:3]
    linears = prunable_linears(layers, "query_heads")
    estimator = Estimator(model, linears, frozenset(NEEDS), len(WINDOWS), batch_size=batch_size)
    estimator.accumulate(WINDOWS)
    stats = estimator.statistics()
    assert estimator.windows_seen == len(WINDOWS)
    reference = per_window_reference(model, list(stats.parameters))
    assert any(m.bias is not None for m in linears)
    for p, (g, g2, rows) in reference.items():
        torch.testing.assert_close(stats.parameters[p].grad, g, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(stats.parameters[p].sq_grad, g2, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(stats.parameters[p].row_saliency, rows, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["bfloat16", "float64"])
def test_accumulators_use_the_configured_dtype(name):
    model = tiny_llama()
    layers = discover_structures(model)[1:2]
    linears = prunable_linears(layers, "query_heads")
    estimator = Estimator(model, linears, frozenset(NEEDS), len(WINDOWS), accumulate_dtype_named(name))
    estimator.accumulate(WINDOWS)
    assert {t.dtype for t in estimator.grad_sum.held.values()} == {ACCUMULATE_DTYPES[name]}
    stats = estimator.statistics()
    weight = layers[0].mlp.up_proj.weight
    entry = stats.parameters[weight]
    assert {entry.grad.dtype, entry.sq_grad.dtype, stats.inputs[layers[0].mlp.up_proj].mean.dtype} == {ACCUMULATE_DTYPES[name]}
    same = tiny_llama()  # the same seed: the same weights, estimated with float32 accumulators
    same_layers = discover_structures(same)[1:2]
    reference = estimate(same, same_layers).parameters[same_layers[0].mlp.up_proj.weight]
    for got, want in ((entry.grad, reference.grad), (entry.sq_grad, reference.sq_grad)):  # bfloat16 keeps ~3 digits
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
    estimator = estimator_for(model, discover_structures(model)[1:2])
    estimator.accumulate(WINDOWS[:1])
    estimator.statistics()
    with pytest.raises(RuntimeError, match="already"):
        estimator.statistics()
    with pytest.raises(ValueError, match="accumulate_dtype='float16'.*allowed: float32, float64, bfloat16"):
        accumulate_dtype_named("float16")
    with pytest.raises(ValueError, match="batch_size=0"):
        Estimator(model, [], frozenset(), 1, batch_size=0)


def test_pruning_callback_passes_its_estimation_keys(tiny_model_dir, tmp_path):
    """The plan is the same whatever the estimation batch size; a dtype that cannot hold g² is refused."""
    def plan(root, **keys):
        run_fit(prune_job(tiny_model_dir, root, data={"num_windows": 5}, granularity="element2", **keys), root)
        return json.loads((root / "export" / "pruning_plan.json").read_text())

    assert plan(tmp_path / "b3", estimation_batch_size=3, accumulate_dtype="float64") == plan(tmp_path / "b1")
    with pytest.raises(ValueError, match="accumulate_dtype='float16'"):
        StructuredPruning(target_ratio=0.2, accumulate_dtype="float16")


def test_only_the_statistics_asked_for_are_collected():
    model = tiny_llama()
    layers = discover_structures(model)[1:2]
    stats = estimate(model, layers, {"gradients"})
    entry = stats.parameters[layers[0].mlp.up_proj.weight]
    assert entry.grad is not None and entry.sq_grad is None and entry.row_saliency is None
    assert stats.inputs == {}  # no input moments: no activation-aware scheme asked for them
