"""The refit's damping chosen by the KL to the dense model (``reconstruction.choose_by: kl``): each
candidate's KL is the model's with that refit in place and the layers not refit yet dense, the
choice is the least, the same on 1 or 2 ranks' shares, and a job without the windows to judge on is
refused before any work."""

import json
from dataclasses import replace

import pytest
import torch

from callbacks import LeastSquaresReconstruction
from hywia_lightning.core.distillation import DistillationSet, PartialKL
from hywia_lightning.core.unit_groups import GroupKey
from hywia_lightning.memory_plan.stages import DistillationSettings, ReconstructionSettings, plan_memory, teacher_bytes
from hywia_lightning.models.shapes import ModelShape
from hywia_lightning.reconstruction.least_squares import RefitStatistics, solve_refit
from hywia_lightning.reconstruction.modes import Sequential, dense_structures

from .conftest import tiny_config, tiny_llama
from .pipeline import prune_job, run_fit
from .test_memory_plan import estimation_job

JUDGE = {"mode": "sequential", "damping": [0.01, 1.0, 100.0], "prior": "original", "intercept": True,
         "choose_by": "kl", "kl_windows": 3}


def test_partial_kl_from_any_layer_is_the_whole_model_kl():
    torch.manual_seed(0)
    dense, model = tiny_llama(num_hidden_layers=4), tiny_llama(num_hidden_layers=4)
    windows = torch.randint(0, 300, (5, 12))
    distill = DistillationSet.of(dense, windows, top_k=16, batch_size=2)
    whole = float(distill.kl_per_window(model).double().mean())
    judge = PartialKL(model, distill, first=1, batch_size=2)
    assert judge.from_layer(1) / judge.positions == pytest.approx(whole, rel=1e-5)
    judge.reach(3)  # layers 1 and 2 final: their inputs are dropped, layer 3's cached
    assert set(judge.inputs) == {3}
    assert judge.from_layer(3) / judge.positions == pytest.approx(whole, rel=1e-5)
    halves = [PartialKL(model, distill[r::2], first=1, batch_size=2) for r in (0, 1)]
    assert sum(h.from_layer(1) for h in halves) / judge.positions == pytest.approx(whole, rel=1e-5)
    empty = PartialKL(model, distill[5:], first=1, batch_size=2)  # a rank with no judge window adds nothing
    empty.reach(3)
    assert empty.positions == 0 and empty.from_layer(3) == 0.0


def test_the_dense_copies_stand_in_for_a_while():
    model, other = tiny_llama(num_hidden_layers=3), tiny_llama(num_hidden_layers=3)
    pruned_mlp = model.model.layers[2].mlp
    with dense_structures(model, {GroupKey(2, "mlp"): other.model.layers[2].mlp}):
        assert model.model.layers[2].mlp is other.model.layers[2].mlp
    assert model.model.layers[2].mlp is pruned_mlp


def test_the_chosen_candidate_has_the_least_kl_and_the_projection_comes_back():
    """choose_by_kl's KLs are those of the model with each candidate's refit assigned."""
    torch.manual_seed(0)
    dense = tiny_llama(num_hidden_layers=3)
    model = tiny_llama(num_hidden_layers=3)
    model.load_state_dict(dense.state_dict())
    with torch.no_grad():  # the "pruned" model: layer 1's MLP perturbed, so the refits differ
        model.model.layers[1].mlp.down_proj.weight.mul_(0.5)
    distill = DistillationSet.of(dense, torch.randint(0, 300, (4, 12)), top_k=16, batch_size=2)
    mode = Sequential(damping=[0.01, 1.0, 100.0], intercept=True, batch_size=2, prior="original")
    mode._dense = {}  # no structure after this one waits for its refit
    linear = model.model.layers[1].mlp.down_proj
    linear.bias = torch.nn.Parameter(torch.zeros(linear.out_features))
    before = linear.weight.detach().clone()
    stats = RefitStatistics(linear.in_features, linear.in_features)
    features = torch.randn(64, linear.in_features)
    stats.add(features, features)
    dense_weight = dense.model.layers[1].mlp.down_proj.weight
    judge = PartialKL(model, distill, first=1, batch_size=2)
    result = mode.choose_by_kl(model, GroupKey(1, "mlp"), linear, dense_weight, linear.weight.detach(), stats,
                               judge, lambda t: t)
    assert torch.equal(linear.weight, before) and not linear.bias.any()
    for damping, kl in result.judged_kl.items():
        refit = solve_refit(dense_weight, before, stats, damping, intercept=True, prior="original")
        with torch.no_grad():
            linear.weight.copy_(refit.weight)
            linear.bias.copy_(refit.bias)
        assert distill.kl(model) == pytest.approx(kl, rel=1e-4)
        with torch.no_grad():
            linear.weight.copy_(before)
            linear.bias.zero_()
    assert result.damping == min(result.judged_kl, key=result.judged_kl.get)


def test_a_job_judges_by_the_kl_and_reports_it(tiny_model_dir, tmp_path):
    job = prune_job(tiny_model_dir, tmp_path, data={"num_windows": 6}, target_ratio=0.2, granularity="wanda",
                    distillation={"windows": 4, "top_k": 8, "batch_size": 2})
    job["reconstruction"] = dict(JUDGE)
    run_fit(job, tmp_path)
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    recon = report["reconstruction"]
    assert recon["choose_by"] == "kl" and recon["kl_windows"] == 3 and "folds" not in recon
    for layer in recon["layers"].values():
        kl = {float(d): v for d, v in layer["kl"].items()}
        assert set(kl) == {0.01, 1.0, 100.0} and layer["damping"] == min(kl, key=kl.get)
    assert report["distillation"]["unseen_windows"] == 1  # windows 0..2 were judged on
    assert "by the KL to the dense model on 3 held-out windows" in (tmp_path / "export" / "report.md").read_text()


def test_judging_by_the_kl_without_its_windows_is_refused_before_any_work(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="choose_by=kl chooses among candidate dampings: give damping a list"):
        LeastSquaresReconstruction(mode="sequential", damping=0.1, choose_by="kl")
    with pytest.raises(ValueError, match="mode='independent' does not judge its refit by the KL"):
        LeastSquaresReconstruction(mode="independent", damping=[0.1, 1.0], choose_by="kl")
    job = prune_job(tiny_model_dir, tmp_path, data={"num_windows": 6}, target_ratio=0.2, granularity="wanda")
    job["reconstruction"] = dict(JUDGE)
    with pytest.raises(ValueError, match="set pruning.init_args.distillation"):
        run_fit(job, tmp_path)
    job = prune_job(tiny_model_dir, tmp_path, data={"num_windows": 6}, target_ratio=0.2, granularity="wanda",
                    distillation={"windows": 2})
    job["reconstruction"] = dict(JUDGE)
    with pytest.raises(ValueError, match="kl_windows=3 is more than the pruning stage's distillation.windows=2"):
        run_fit(job, tmp_path)
    assert not (tmp_path / "export").exists()


def test_the_memory_plan_counts_the_judge():
    """Judging by the KL holds the teacher's targets, the judge windows' hidden states and one
    batch's logits beside the refit, and no folds' moments."""
    shape = ModelShape.from_config(tiny_config().to_dict())
    job = replace(estimation_job(shape), target_ratio=0.2, distillation=DistillationSettings(windows=4, batch_size=2))
    plain, judged = ({s.stage: s for s in plan_memory(shape, replace(job, reconstruction=ReconstructionSettings(
        "sequential", kl_windows=kl))).stages}["reconstruction"] for kl in (0, 3))
    d = job.distillation
    expected = teacher_bytes(d) + 2 * 3 * d.seq_len * shape.hidden_size * 4 + 2 * d.seq_len * shape.vocab_size * 12
    assert judged.bytes - plain.bytes == expected
