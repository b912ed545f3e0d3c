"""The fusion attention: normalization, the rule blends, and that it learns which grain to trust."""

import pytest
import torch

from callbacks.hybrid_pruning import HybridPruning
from hywia_lightning.fusion.attention import FusionAttention, GroupScores, standardized_log
from hywia_lightning.fusion.hywia import HyWIA
from hywia_lightning.fusion.modes import Compensated, Fixed, Heuristic, Learned
from hywia_lightning.fusion.training import FusionTraining, MaskTarget, hard_mask, soft_mask

from .conftest import tiny_llama


def test_standardized_log_is_comparable_and_keeps_the_order():
    scores = torch.tensor([1e-9, 1.0, 5.0, 1e4])
    z = standardized_log(scores)
    assert torch.equal(z.argsort(), scores.argsort())
    assert abs(z.mean().item()) < 1e-9 and abs(z.std(unbiased=False).item() - 1) < 1e-9
    torch.testing.assert_close(standardized_log(scores * 1e6), z)  # scale-free


def test_fusion_starts_as_the_uniform_blend_and_needs_two_schemes():
    fusion = FusionAttention(3)
    group = GroupScores.build("layers.0.mlp", "mlp", 0, 4, [torch.rand(10) for _ in range(3)])
    w = fusion.weights(group.shared_features()[None], group.scheme_features()[None])
    torch.testing.assert_close(w, torch.full((1, 3), 1 / 3))
    with pytest.raises(ValueError, match="at least two granularities"):
        FusionAttention(1)


def test_masks_keep_the_planned_count_per_block():
    fused = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2])
    target = MaskTarget(torch.nn.Linear(6, 2), 1, keep=1, blocks=2)
    assert hard_mask(fused, target).tolist() == [0, 1, 0, 0, 1, 0]
    soft = soft_mask(fused, target, temperature=0.01)
    torch.testing.assert_close(soft, hard_mask(fused, target), atol=1e-3, rtol=0)


def test_heuristic_blend_moves_from_fine_to_coarse_with_depth():
    scorer = HyWIA(["element1", "element2", "vector"], mode="heuristic")
    groups = {i: GroupScores.build(f"layers.{i}.mlp", "mlp", i, 8, [torch.rand(6) for _ in range(3)]) for i in (0, 7)}
    w, _ = Heuristic().blend(scorer.schemes, [], groups, None, 0)  # element1 (fine), element2 (fine), vector (coarse)
    assert w[0, 0] > w[0, 2] and w[1, 2] > w[1, 0]
    torch.testing.assert_close(w.sum(1), torch.ones(2, dtype=torch.float64))


def test_bad_fusion_keys_are_refused():
    with pytest.raises(ValueError, match="mode='average' is unknown; allowed: fixed, heuristic, learned"):
        HyWIA(mode="average")
    with pytest.raises(ValueError, match="mode='fixed' needs its weights: mode: {class_path: hywia_lightning.fusion.modes.Fixed"):
        HyWIA(mode="fixed")
    with pytest.raises(ValueError, match=r"schemes=\['vector'\] fuses fewer than two"):
        HyWIA(schemes=["vector"])
    with pytest.raises(ValueError, match=r"schemes=\[\] fuses fewer than two"):
        HyWIA(schemes=[])
    with pytest.raises(ValueError, match="mode fixed needs weights: one non-negative weight for each of"):
        HyWIA(mode=Fixed({"element1": 1.0}))
    assert HybridPruning(0.2).granularity.name == "hywia-heuristic(element1+element2+vector)"
    with pytest.raises(ValueError, match=r"temperatures=\(1.0,\) must be two positive numbers"):
        Learned(temperatures=(1.0,))


@pytest.mark.parametrize("objective", ["lm", "kl"])
def test_the_fusion_learns_which_granularity_is_right_per_layer(objective):
    """Half of every layer's MLP channels are dead (zero down_proj columns). Scheme A ranks them last
    in the front layers and is noise in the back ones; scheme B the reverse. Trained on the frozen
    model's loss over text the model itself predicts well (its greedy continuations), or on the KL
    from the unmasked model, the fusion must trust A in front and B at the back, and so keep (almost)
    only live channels everywhere."""
    torch.manual_seed(0)
    model = tiny_llama(num_key_value_heads=2, num_hidden_layers=4)
    dead = torch.arange(0, 96, 2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, dead] = 0
            layer.mlp.down_proj.weight.mul_(4)  # make the live channels matter
        model.lm_head.weight.mul_(30)  # confident predictions: a wrong channel choice costs loss
    informative = torch.ones(96)
    informative[dead] = 1e-3
    noise = torch.Generator().manual_seed(1)
    groups, targets = [], []
    for i, layer in enumerate(model.model.layers):
        random_scores = torch.rand(96, generator=noise) + 0.01
        a, b = (informative, random_scores) if i < 2 else (random_scores, informative)
        groups.append(GroupScores.build(f"layers.{i}.mlp", "mlp", i, 4, [a, b]))
        targets.append(MaskTarget(layer.mlp.down_proj, 1, keep=48))
    torch.manual_seed(0)
    module = FusionTraining(model, FusionAttention(2, width=8), groups, targets, lr=0.05, temperatures=(0.5, 0.1),
                            objective=objective)
    prompts = torch.randint(0, 300, (16, 1), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        windows = model.generate(prompts, max_new_tokens=31, min_new_tokens=31, do_sample=False)
    if objective == "kl":  # masks that keep every unit are the teacher: nothing to lose
        module.on_fit_start()
        assert module.loss(windows[:1], [torch.ones(96)] * 4).item() == pytest.approx(0, abs=1e-6)
        assert module.loss(windows[:1], [hard_mask(f.detach(), t) for f, t in zip(module.fused(), targets)]) > 0.01
        module.on_fit_end()
    module.fit(windows[:12], windows[12:], epochs=12, patience=12, seed=0)
    w = module.weights()
    assert (w[:2, 0] > w[:2, 1]).all() and (w[2:, 1] > w[2:, 0]).all(), w
    live = torch.ones(96)
    live[dead] = 0
    for fused, target in zip(module.fused(), targets):
        kept = hard_mask(fused.detach(), target).bool()
        assert live[kept].mean() >= 0.9  # a blend that ignored the layer would keep about 0.5


@pytest.mark.parametrize("mode", ["fixed", "heuristic", "learned"])
def test_hywia_with_a_user_scheme_runs_from_yaml(mode, tiny_model_dir, tmp_path):
    """The extension API end to end: a scheme class named by class_path joins the fusion as a key."""
    import json

    from .pipeline import prune_job, run_fit

    schemes = ["element1", "vector", {"class_path": "tests.test_fusion.UserWanda"}]
    modes = {"learned": {"class_path": "hywia_lightning.fusion.modes.Learned", "init_args": {"epochs": 2, "holdout": 2}},
             "fixed": {"class_path": "hywia_lightning.fusion.modes.Fixed",
                       "init_args": {"weights": {"element1": 1.0, "vector": 1.0, "userwanda": 2.0}}}}
    job = prune_job(tiny_model_dir, tmp_path, data={"num_windows": 6})
    job["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "logs"}}
    job["pruning"] = {"class_path": "callbacks.HybridPruning", "init_args": {
        "target_ratio": 0.1, "layer_start": 1, "layer_end": -1, "fusion": {"schemes": schemes, "mode": modes.get(mode, mode)}}}
    run_fit(job, tmp_path)
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    fusion = report["fusion"]
    assert fusion["schemes"] == ["element1", "vector", "userwanda"]
    assert set(fusion["weights"]) == {"layers.1.mlp", "layers.1.self_attn", "layers.2.mlp", "layers.2.self_attn"}
    for weights in fusion["weights"].values():
        assert len(weights) == 3 and abs(sum(weights) - 1) < 1e-4
    assert report["pruning"]["granularity"] == f"hywia-{mode}(element1+vector+userwanda)"
    assert (tmp_path / "export" / "fusion_weights.png").stat().st_size > 1000
    if mode == "learned":  # trained by Lightning: its curves in the job's logger and in the report
        training = report["fusion"]["training"]
        assert 1 <= training["epochs_run"] == len(training["train_loss_per_epoch"]) <= 2
        assert training["best_held_out_loss"] == pytest.approx(min(training["held_out_loss_per_epoch"]), abs=1e-5)
        import csv

        rows = list(csv.DictReader((tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv").open()))
        logged = [float(r["fusion/val_loss"]) for r in rows if r.get("fusion/val_loss")]
        assert logged == pytest.approx(training["held_out_loss_per_epoch"], abs=1e-5)
        report_md = (tmp_path / "export" / "report.md").read_text()
        assert training["objective"] == "lm" and "Fusion training (the calibration text's next tokens): " in report_md
        assert "| epoch | train loss (soft masks) | held-out loss (hard masks) |" in report_md
        assert (tmp_path / "fusion" / "best.ckpt").is_file()  # ModelCheckpoint kept the best fusion state


def test_a_scheme_returning_nan_is_refused_naming_it(tiny_model_dir, tmp_path):
    from .pipeline import prune_job, run_fit

    job = prune_job(tiny_model_dir, tmp_path)
    job["pruning"] = {"class_path": "callbacks.HybridPruning", "init_args": {
        "target_ratio": 0.1, "layer_start": 1, "layer_end": -1,
        "fusion": {"mode": "heuristic", "schemes": ["element1", {"class_path": "tests.test_fusion.NaNScheme"}]}}}
    with pytest.raises(ValueError, match="granularity 'nanscheme' returned NaN or infinite scores for layers.1"):
        run_fit(job, tmp_path)


from hywia_lightning.core.granularities import Granularity, Wanda  # noqa: E402


class NaNScheme(Granularity):
    def __call__(self, group):
        return torch.full((group.num_units,), float("nan"))


class UserWanda(Wanda):
    """A user's scheme, given by class_path (here: Wanda under another name)."""


def test_holdout_must_leave_training_windows(tiny_model_dir, tmp_path):
    from .pipeline import prune_job, run_fit

    job = prune_job(tiny_model_dir, tmp_path)  # 4 calibration windows
    job["pruning"] = {"class_path": "callbacks.HybridPruning", "init_args": {
        "target_ratio": 0.1, "layer_start": 1, "layer_end": -1, "fusion": {"mode": {"class_path": "hywia_lightning.Learned", "init_args": {"holdout": 4}}}}}
    with pytest.raises(ValueError, match=r"holdout=4 must leave windows .* allowed 1..3 with 4 calibration windows"):
        run_fit(job, tmp_path)


def test_the_compensated_fusion_keeps_per_group_the_blend_the_refit_recovers_best():
    """Each group's blend is the grid point whose kept units leave the least output error after the
    least-squares refit, computed here again from independently estimated covariances."""
    from hywia_lightning import PruningScope, UniformAllocation, prune, target_layers
    from hywia_lightning.core.compensation import compensated_error, damped
    from hywia_lightning.core.pipeline import estimate
    from hywia_lightning.core.plan import kept_output_columns
    from hywia_lightning.core.unit_groups import unit_groups
    from hywia_lightning.fusion.attention import fuse

    model = tiny_llama(num_key_value_heads=2, num_hidden_layers=4)
    windows = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(0))
    layers, scope = target_layers(model, 1, -1), PruningScope(0.25)
    scorer = HyWIA(["random", "obs"], mode=Compensated(grid=2))
    result = prune(model, windows, scorer, scope, UniformAllocation(), layers)
    record = result.record["refit_error"]
    stats = estimate(model, layers, windows, frozenset({"input_moments", "output_gram"}), "query_heads")
    by_layer = {s.layer: s for s in layers}
    scored = scorer.scheme_scores(unit_groups(layers, "query_heads", 4, stats))
    picked_obs = 0
    for group in unit_groups(layers, "query_heads", 4, stats):
        n = group.output_covariance.shape[0]
        weight_t, h = group.weights[group.output_member].reshape(n, -1), damped(group.output_covariance, 0.01)
        errors = {}
        for blend in ((0.5, 0.5), (1.0, 0.0), (0.0, 1.0)):
            scores = fuse(torch.tensor(blend, dtype=torch.float64), scored[group.key].normalized)
            s = by_layer[group.layer]
            keep = kept_output_columns(group.key, scores, s, result.widths[group.layer], "query_heads")
            errors[blend] = compensated_error(weight_t, h, keep)
        assert record[group.name]["chosen"] == pytest.approx(min(errors.values()), rel=1e-5)
        assert record[group.name]["uniform"] == pytest.approx(errors[(0.5, 0.5)], rel=1e-5)
        picked_obs += result.record["weights"][group.name] == [0.0, 1.0]
    assert picked_obs >= 2  # the scheme that prices the refit wins somewhere over random scores
    from hywia_lightning.report.markdown import render_markdown

    assert "Compensated fusion: the chosen blends leave" in render_markdown({"fusion": result.record})
    with pytest.raises(ValueError, match="damping=0.0 must be positive"):
        Compensated(damping=0.0)
