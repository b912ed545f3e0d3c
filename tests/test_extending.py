"""The two extension routes of docs/extending.md, run from YAML through the real CLI."""

import json

import pytest
import torch

from callbacks import LeastSquaresReconstruction, StructuredPruning
from hywia_lightning import Granularity, Magnitude
from hywia_lightning.reconstruction.modes import Sequential

from .pipeline import prune_job, run_fit


class LastUnitsFirst(Granularity):
    """A user scheme that needs nothing: later units score higher."""

    def __call__(self, group):
        return torch.arange(group.num_units, dtype=torch.float64)


class RankProductPruning(StructuredPruning):
    """docs/extending.md's callback: the granularity's ranks times the magnitude's ranks."""

    def score(self, groups, context):
        self.scored = [g.name for g in groups]
        rank = lambda s: s.argsort().argsort().double()
        return {g.key: rank(self.granularity(g)) * rank(Magnitude()(g)) for g in groups}


def plan(tmp_path):
    return json.loads((tmp_path / "export" / "pruning_plan.json").read_text())


def test_a_user_granularity_by_class_path(tiny_model_dir, tmp_path):
    run_fit(prune_job(tiny_model_dir, tmp_path, granularity={"class_path": "tests.test_extending.LastUnitsFirst"}), tmp_path)
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    assert report["pruning"]["granularity"] == "lastunitsfirst"
    for layer in plan(tmp_path)["layers"].values():
        channels = layer["channels"]
        assert channels == list(range(96 - len(channels), 96))  # the last channels are kept


def test_a_pruning_callback_that_overrides_score(tiny_model_dir, tmp_path):
    job = prune_job(tiny_model_dir, tmp_path)
    job["pruning"]["class_path"] = "tests.test_extending.RankProductPruning"
    cli = run_fit(job, tmp_path)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, RankProductPruning))
    assert callback.scored == ["layers.1.mlp", "layers.1.self_attn", "layers.2.mlp", "layers.2.self_attn"]
    assert plan(tmp_path) == callback.plan.to_dict()


class BiasOnlySequential(Sequential):
    """A user reconstruction mode: the sequential refit, keeping only its intercept (the weights stay sliced)."""

    def solve(self, dense, sliced, stats, key):
        result = super().solve(dense, sliced, stats, key)
        result.weight = sliced.detach().clone()
        return result


def test_a_user_reconstruction_mode_by_import_path(tiny_model_dir, tmp_path):
    job = prune_job(tiny_model_dir, tmp_path)
    job["reconstruction"] = {"mode": "tests.test_extending.BiasOnlySequential", "damping": 0.1, "intercept": True,
                             "prior": "original"}
    cli = run_fit(job, tmp_path)
    refit = next(c for c in cli.trainer.callbacks if isinstance(c, LeastSquaresReconstruction))
    assert type(refit.strategy) is BiasOnlySequential
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    assert report["reconstruction"]["mode"] == "tests.test_extending.BiasOnlySequential"
    with pytest.raises(ValueError, match="mode='tests.test_extending.LastUnitsFirst' is not a ReconstructionMode"):
        LeastSquaresReconstruction(mode="tests.test_extending.LastUnitsFirst")
