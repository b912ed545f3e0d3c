"""Least-squares reconstruction: exact where exactness is possible, bounded memory, clear failures."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from lightning import Trainer

from callbacks import LeastSquaresReconstruction
from hywia_lightning.core.plan import LayerPlan, PruningPlan
from hywia_lightning.core.slicing import apply_plan
from hywia_lightning.data.calibration import CalibrationData
from hywia_lightning.reconstruction.layer_stream import LayerStream
from hywia_lightning.reconstruction.least_squares import RefitStatistics, dense_grams, solve_refit
from hywia_lightning.report.run_report import RunReport

from .conftest import REPO, tiny_llama
from .pipeline import prune_job, run_fit

INPUT = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def model_with_redundant_units():
    """Layers 1 and 2: query heads 1 and 3 copy heads 0 and 2 (same KV group), MLP channels 48..95
    copy channels 0..47, so every unit a plan below removes is an exact copy of a kept one."""
    model = tiny_llama(num_key_value_heads=2)
    with torch.no_grad():
        for i in (1, 2):
            attn, mlp = model.model.layers[i].self_attn, model.model.layers[i].mlp
            attn.q_proj.weight[16:32] = attn.q_proj.weight[0:16]
            attn.q_proj.weight[48:64] = attn.q_proj.weight[32:48]
            mlp.gate_proj.weight[48:] = mlp.gate_proj.weight[:48]
            mlp.up_proj.weight[48:] = mlp.up_proj.weight[:48]
    return model


PLAN = PruningPlan("query_heads", {i: LayerPlan([0, 2], [0, 1], list(range(48))) for i in (1, 2)})


def run_reconstruction(model, mode, tokenizer, damping=1e-9, windows=6):
    callback = LeastSquaresReconstruction(mode=mode, damping=damping,
                                          calibration=CalibrationData("builtin:python-docs/train", windows, 24))
    callback.calibration.attach(tokenizer, model)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    module = SimpleNamespace(model=model, report=RunReport(), tokenizer=tokenizer)
    callback.on_before_slicing(trainer, module, PLAN)
    apply_plan(model, PLAN)
    callback.on_after_slicing(trainer, module, PLAN)
    return module.report.sections["reconstruction"]


@pytest.mark.parametrize("mode", ["independent", "sequential"])
def test_refit_recovers_the_dense_output_when_removed_units_are_copies(mode, tiny_tokenizer):
    model = model_with_redundant_units()
    with torch.no_grad():
        dense = model(INPUT).logits
    sliced_only = model_with_redundant_units()
    apply_plan(sliced_only, PLAN)
    with torch.no_grad():
        naive_error = (sliced_only(INPUT).logits - dense).abs().max()
    report = run_reconstruction(model, mode, tiny_tokenizer)
    with torch.no_grad():
        refit = model(INPUT).logits
    assert naive_error > 1e-2  # slicing alone does change the outputs
    torch.testing.assert_close(refit, dense, atol=1e-5, rtol=1e-5)
    assert set(report["layers"]) == {"layers.1.self_attn", "layers.1.mlp", "layers.2.self_attn", "layers.2.mlp"}
    for layer in report["layers"].values():
        assert layer["error_before"] > 1e-3 and layer["error_after"] < 1e-8


def test_a_singular_system_falls_back_and_says_so(caplog):
    x = torch.randn(50, 3, dtype=torch.float64)
    features = torch.cat([x, x[:, :1]], dim=1)  # a repeated feature: X Xᵀ is singular
    stats = RefitStatistics(4, 4)
    stats.add(features, features)
    stats.gram[3, 3] -= 1e-3  # and slightly indefinite, as rounding can make it
    weight = torch.randn(5, 4, dtype=torch.float64)
    result = solve_refit(weight, weight, stats, damping=0.0, name="layers.0.mlp")
    assert result.fallback is not None and result.damping > 0
    assert "not positive definite" in caplog.text
    assert torch.isfinite(result.weight).all() and result.error_after < 1e-3


def test_the_original_prior_moves_from_the_plain_refit_to_bias_compensation_as_damping_grows():
    """Anchored on the sliced weights, a vanishing damping is the plain least squares and a huge one
    keeps the weights and fits only FLAP's bias: the removed features' mean contribution."""
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(400, 6, dtype=torch.float64, generator=generator) + torch.arange(6.0, dtype=torch.float64)
    keep = [0, 2, 3, 5]
    stats = RefitStatistics(6, 4)
    stats.add(target, target[:, keep])
    weight = torch.randn(3, 6, dtype=torch.float64, generator=generator)
    sliced = weight[:, keep]
    plain = solve_refit(weight, sliced, stats, 1e-9, intercept=True, prior="zero")
    small = solve_refit(weight, sliced, stats, 1e-9, intercept=True, prior="original")
    huge = solve_refit(weight, sliced, stats, 1e9, intercept=True, prior="original")
    torch.testing.assert_close(small.weight, plain.weight)
    torch.testing.assert_close(huge.weight, sliced, atol=1e-6, rtol=0)
    removed = [1, 4]
    torch.testing.assert_close(huge.bias, weight[:, removed] @ target[:, removed].mean(0), atol=1e-6, rtol=0)
    assert small.error_after < huge.error_after < huge.error_before
    with pytest.raises(ValueError, match="prior='one' is unknown; allowed: zero, original"):
        LeastSquaresReconstruction(prior="one")


def test_nan_activations_and_negative_damping_are_refused():
    stats = RefitStatistics(2, 2)
    stats.add(torch.tensor([[1.0, float("nan")]]), torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="activations of layers.3.mlp contain NaN"):
        solve_refit(torch.eye(2), torch.eye(2), stats, 0.01, "layers.3.mlp")
    with pytest.raises(ValueError, match="damping=-1 must be >= 0"):
        LeastSquaresReconstruction(damping=-1)
    with pytest.raises(ValueError, match="mode='greedy' is unknown; allowed: independent, sequential"):
        LeastSquaresReconstruction(mode="greedy")
    with pytest.raises(ValueError, match="saw no calibration token"):
        solve_refit(torch.eye(2), torch.eye(2), RefitStatistics(2, 2), 0.01)


def test_missing_calibration_data_fails_before_any_work(tiny_model_dir, tmp_path):
    job = prune_job(tiny_model_dir, tmp_path, granularity="magnitude")  # needs no calibration itself
    job.pop("data")
    job["reconstruction"] = {}
    with pytest.raises(ValueError, match="LeastSquaresReconstruction needs calibration windows"):
        run_fit(job, tmp_path)


@pytest.mark.parametrize("mode", ["independent", "sequential"])
def test_reconstruction_in_a_job_lowers_every_layers_error(mode, tiny_model_dir, tmp_path):
    job = prune_job(tiny_model_dir, tmp_path)
    job["reconstruction"] = {"mode": mode, "damping": 0.01}
    run_fit(job, tmp_path)
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    layers = report["reconstruction"]["layers"]
    assert layers and all(r["error_after"] < r["error_before"] for r in layers.values())
    assert report["seconds"]["reconstruction"] > 0


MEMORY_PROBE = r"""
import resource, sys, torch
sys.path.insert(0, sys.argv[2])
from tests.conftest import tiny_llama
from hywia_lightning.reconstruction.layer_stream import LayerStream
from hywia_lightning.reconstruction.least_squares import dense_grams
model = tiny_llama(intermediate_size=1536, num_hidden_layers=2)
windows = torch.randint(0, 300, (int(sys.argv[1]), 128), generator=torch.Generator().manual_seed(0))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stream = LayerStream(model, windows, 0, 1)
for layer in model.model.layers:
    dense_grams({0: layer.mlp.down_proj}, stream.advance)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_peak_memory_does_not_grow_with_the_number_of_windows():
    def growth_mib(windows):
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(windows), str(REPO)],
                             capture_output=True, text=True, check=True).stdout
        return float(out.strip().splitlines()[-1])

    few, many = growth_mib(4), growth_mib(48)
    # keeping the inputs of 48 windows would cost 48 × 128 × 1536 × 4 B = 36 MiB per layer, 72 MiB in all;
    # the stream caches each window's hidden state instead (48 × 128 × 64 × 4 B = 1.5 MiB)
    assert many < few + 16, (few, many)


@pytest.mark.parametrize("batch_size", [1, 2])  # 2: batches of 2, 2 and 1 window (two probes)
def test_the_layer_stream_carries_the_models_own_hidden_states(batch_size):
    model = tiny_llama(num_hidden_layers=3)
    windows = torch.randint(0, 300, (5, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(input_ids=windows, output_hidden_states=True).hidden_states
    stream = LayerStream(model, windows, 1, 2, batch_size)
    assert [len(h) for h in stream.hidden] == ([1] * 5 if batch_size == 1 else [2, 2, 1])
    stream.run()
    assert stream.next == 1  # run() does not move on
    torch.testing.assert_close(torch.cat(stream.hidden), hidden[1])
    assert stream.advance() == 1 and stream.next == 2
    torch.testing.assert_close(torch.cat(stream.hidden), hidden[2])


def test_layers_streamed_one_at_a_time_give_the_whole_forward_passs_grams():
    """Independent reconstruction's Gram matrices, one layer at a time over cached hidden states,
    equal those of the inputs the projections see in the model's own forward pass."""
    model = tiny_llama(num_key_value_heads=2)
    projections = {(i, name): getattr(layer.self_attn if name == "o_proj" else layer.mlp, name)
                   for i, layer in enumerate(model.model.layers) if i in (1, 2) for name in ("o_proj", "down_proj")}
    reference = {key: torch.zeros(p.in_features, p.in_features, dtype=torch.float64) for key, p in projections.items()}

    def fold(key):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            reference[key] += (x.T @ x).double()
        return hook

    hooks = [p.register_forward_pre_hook(fold(key)) for key, p in projections.items()]
    with torch.no_grad():
        for window in INPUT:
            model(input_ids=window[None])
    for hook in hooks:
        hook.remove()
    stream = LayerStream(model, INPUT, 1, 2)
    for layer in (1, 2):
        grams, sums = dense_grams({key: p for key, p in projections.items() if key[0] == layer}, stream.advance)
        for key, gram in grams.items():
            torch.testing.assert_close(gram, reference[key], rtol=1e-6, atol=0)
    assert stream.next == 3
