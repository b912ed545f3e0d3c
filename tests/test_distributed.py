"""Two CPU processes (DDP, gloo) give the same pruning plan as one."""

import json

import pytest
import torch
from safetensors.torch import load_file

from .pipeline import prune_job, run_fit, run_two_processes

LEARNED_HYWIA = {"class_path": "callbacks.HybridPruning", "init_args": {
    "target_ratio": 0.1, "layer_start": 1, "layer_end": -1,
    "fusion": {"mode": {"class_path": "hywia_lightning.Learned", "init_args": {"epochs": 2, "holdout": 2}}}}}
# every kind of statistic (per-window saliency rows included), a global allocation, an intercept refit
GLOBAL_HYWIA = {"class_path": "callbacks.HybridPruning", "init_args": {
    "target_ratio": 0.2, "layer_start": 1, "layer_end": -1, "allocation": "global",
    "fusion": {"mode": "heuristic", "schemes": ["element1", "element2", "vector2", "fluctuation"]}}}


def plan(root) -> dict:
    return json.loads((root / "export" / "pruning_plan.json").read_text())


@pytest.mark.parametrize("pruning, intercept", [(None, False), (LEARNED_HYWIA, False), (GLOBAL_HYWIA, True)],
                         ids=["element1", "hywia_learned", "hywia_global_intercept"])
def test_two_processes_prune_like_one(pruning, intercept, tiny_model_dir, tmp_path):
    """Estimation sharded over 2 ranks (statistics summed), the learned fusion trained on each rank
    on the same windows, reconstruction moments summed: the plan equals 1 process's."""
    def job(root):
        config = prune_job(tiny_model_dir, root, data={"num_windows": 6})
        if pruning is not None:
            config["pruning"] = pruning
        config["reconstruction"] = {"intercept": intercept}
        return config

    single = tmp_path / "single"
    run_fit(job(single), single)

    run_two_processes(job(tmp_path / "ddp"), tmp_path)
    assert plan(tmp_path / "ddp") == plan(single)
    report = json.loads((tmp_path / "ddp" / "export" / "report.json").read_text())
    assert report["pruning"]["params_after"] < report["pruning"]["params_before"]
    one_process = json.loads((single / "export" / "report.json").read_text())["pruning"]
    assert report["pruning"]["accumulator_shards"] == 2 and one_process["accumulator_shards"] == 1
    assert report["pruning"]["accumulator_bytes_per_rank"] * 2 == one_process["accumulator_bytes_per_rank"] > 0
    weights = lambda root: load_file(root / "export" / "model.safetensors")
    ddp, one = weights(tmp_path / "ddp"), weights(single)
    assert ddp.keys() == one.keys()
    for name in one:  # refit weights differ only by the order of floating-point sums
        torch.testing.assert_close(ddp[name], one[name], atol=1e-4, rtol=1e-4)


def test_two_processes_calibrate_on_the_same_generated_windows(tiny_model_dir, tmp_path, monkeypatch):
    """``source: generated`` under DDP: rank 0 samples the windows (into its own cache) and broadcasts
    them, so both ranks estimate on one set and the plan equals one process's."""
    monkeypatch.setenv("HYWIA_CACHE", str(tmp_path / "cache"))  # the dense baselines
    def job(root):
        return prune_job(tiny_model_dir, root, data={"source": "generated", "num_windows": 6,
                                                     "cache_dir": str(root / "generated")})

    single = tmp_path / "single"
    run_fit(job(single), single)
    run_two_processes(job(tmp_path / "ddp"), tmp_path)
    assert plan(tmp_path / "ddp") == plan(single)
    cached = lambda root: [torch.load(p, weights_only=True)["windows"] for p in (root / "generated").rglob("generated-*.pt")]
    (ddp_windows,), (single_windows,) = cached(tmp_path / "ddp"), cached(single)  # one file each: rank 0 wrote it
    assert torch.equal(ddp_windows, single_windows)


def test_two_processes_search_the_same_widths_as_one(tiny_model_dir, tmp_path):
    """The width search runs on rank 0 with every window; both ranks prune by its plan, the plan one
    process finds, and report the same KL to the dense model."""
    def job(root):
        config = prune_job(tiny_model_dir, root, data={"num_windows": 6}, target_ratio=0.2, granularity="wanda",
                           distillation={"windows": 3, "top_k": 8, "batch_size": 2},
                           width_search={"levels": 2, "rounds": 2, "search_windows": 2, "batch_size": 2})
        config["reconstruction"] = {"mode": "sequential", "damping": 0.1, "prior": "original", "intercept": True}
        return config

    single = tmp_path / "single"
    run_fit(job(single), single)
    run_two_processes(job(tmp_path / "ddp"), tmp_path)
    assert plan(tmp_path / "ddp") == plan(single)
    kl = lambda root: json.loads((root / "export" / "report.json").read_text())["distillation"]["kl"]
    assert kl(tmp_path / "ddp") == pytest.approx(kl(single), rel=1e-3)
