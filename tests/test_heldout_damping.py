"""The refit's damping chosen per structure by held-out windows: the held-out errors are those of
refits solved without each fold, the folds are the same on any number of ranks, and bad settings
are refused before any work."""

import json
from dataclasses import replace

import pytest
import torch

from callbacks import LeastSquaresReconstruction
from hywia_lightning.memory_plan.stages import ReconstructionSettings, plan_memory
from hywia_lightning.models.shapes import ModelShape
from hywia_lightning.reconstruction.layer_stream import LayerStream
from hywia_lightning.reconstruction.least_squares import (
    MOMENTS, RefitStatistics, choose_damping, sequential_statistics, solve_refit,
)

from .conftest import tiny_config, tiny_llama
from .pipeline import prune_job, run_fit
from .test_memory_plan import estimation_job
from .test_reconstruction import model_with_redundant_units, run_reconstruction

KEEP = [0, 2, 3, 5]


def noisy_windows(folds: int, tokens: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Each fold's target features: the removed ones are noisy mixtures of the kept ones, so a refit
    on few tokens overfits the noise."""
    parts, mixing = [], torch.randn(4, 2, dtype=torch.float64, generator=generator)
    for _ in range(folds):
        kept = torch.randn(tokens, 4, dtype=torch.float64, generator=generator) + 1
        removed = kept @ mixing * 0.3 + torch.randn(tokens, 2, dtype=torch.float64, generator=generator)
        target = torch.empty(tokens, 6, dtype=torch.float64)
        target[:, KEEP], target[:, [1, 4]] = kept, removed
        parts.append(target)
    return parts


def fold_statistics(parts: list[torch.Tensor]) -> list[RefitStatistics]:
    stats = []
    for target in parts:
        s = RefitStatistics(6, 4)
        s.add(target, target[:, KEEP])
        stats.append(s)
    return stats


def test_heldout_errors_are_those_of_refits_solved_without_each_fold():
    generator = torch.Generator().manual_seed(0)
    parts = noisy_windows(4, 12, generator)
    weight = torch.randn(3, 6, dtype=torch.float64, generator=generator)
    sliced = weight[:, KEEP]
    candidates = [1e-6, 0.1, 10.0]
    result = choose_damping(weight, sliced, fold_statistics(parts), candidates, "layers.1.mlp",
                            intercept=True, prior="original")
    for damping in candidates:
        residual = energy = 0.0
        for f, held in enumerate(parts):
            train = RefitStatistics(6, 4)
            for g, target in enumerate(parts):
                if g != f:
                    train.add(target, target[:, KEEP])
            refit = solve_refit(weight, sliced, train, damping, intercept=True, prior="original")
            predicted = held[:, KEEP] @ refit.weight.T + refit.bias
            residual += ((held @ weight.T - predicted) ** 2).sum().item()
            energy += ((held @ weight.T) ** 2).sum().item()
        assert result.heldout[damping] == pytest.approx(residual / energy, rel=1e-6)
    chosen = min(result.heldout, key=result.heldout.get)
    assert result.damping == chosen
    whole = RefitStatistics.total(fold_statistics(parts))
    final = solve_refit(weight, sliced, whole, chosen, intercept=True, prior="original")
    torch.testing.assert_close(result.weight, final.weight)
    torch.testing.assert_close(result.bias, final.bias)


def test_few_tokens_choose_a_stronger_damping_than_many():
    """Two tokens a fold against four inputs overfit the noise: a larger damping generalizes better.
    With 2,000 a fold the plain refit does."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(3, 6, dtype=torch.float64, generator=generator)
    candidates = [1e-6, 1.0, 100.0]
    few = choose_damping(weight, weight[:, KEEP], fold_statistics(noisy_windows(4, 2, generator)), candidates,
                         intercept=True, prior="original")
    many = choose_damping(weight, weight[:, KEEP], fold_statistics(noisy_windows(4, 2000, generator)), candidates,
                          intercept=True, prior="original")
    assert many.damping == 1e-6 and few.damping > 1e-6, (few.heldout, many.heldout)


def test_the_folds_are_the_same_on_one_rank_and_on_two():
    """Window ``i`` is in fold ``i % folds`` whichever rank holds it: two ranks' strided shares,
    with their ids, give the same fold moments as one process."""
    model = tiny_llama(num_hidden_layers=3)
    windows = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(0))
    block, dense = model.model.layers[1].mlp, tiny_llama(num_hidden_layers=3).model.layers[1].mlp

    def folds(share, ids, pad_to=None):
        stream = LayerStream(model, share, 1, 1, 2, pad_to, ids)
        return sequential_statistics(stream.run, block, dense, "down_proj", lambda: stream.batch_ids, 3)

    one = folds(windows, None)
    ranks = [folds(windows[r::2], torch.arange(3) * 2 + r, pad_to=4) for r in (0, 1)]  # padded: a batch of 2 and 2
    whole = sequential_statistics(LayerStream(model, windows, 1, 1, 2).run, block, dense, "down_proj")[0]
    assert [p.tokens for p in one] == [32, 32, 32]
    for f in range(3):
        for name in MOMENTS:
            torch.testing.assert_close(getattr(one[f], name), getattr(ranks[0][f], name) + getattr(ranks[1][f], name))
    for name in MOMENTS:
        torch.testing.assert_close(getattr(RefitStatistics.total(one), name), getattr(whole, name))


def test_a_job_chooses_from_the_candidates_and_reports_them(tiny_tokenizer):
    """Removed units that copy kept ones: the held-out windows see that the weakest damping reproduces
    the dense outputs, and the report holds every candidate's held-out error."""
    model = model_with_redundant_units()
    report = run_reconstruction(model, "sequential", tiny_tokenizer, damping=[1e-9, 1.0], windows=6)
    assert report["folds"] == 4 and report["damping"] == [1e-9, 1.0]
    for layer in report["layers"].values():
        assert layer["damping"] == 1e-9 and layer["error_after"] < 1e-8
        assert set(layer["heldout_error"]) == {"1e-09", "1.0"}
        assert layer["heldout_error"]["1e-09"] < layer["heldout_error"]["1.0"]


def test_bad_damping_lists_are_refused_with_the_key_to_change(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"damping=\[0.1, 1.0\]: choosing the damping by held-out windows needs mode: sequential"):
        LeastSquaresReconstruction(mode="independent", damping=[0.1, 1.0])
    with pytest.raises(ValueError, match="at least two"):
        LeastSquaresReconstruction(mode="sequential", damping=[0.1])
    with pytest.raises(ValueError, match=r"damping=\[0.1, -1\] must be >= 0"):
        LeastSquaresReconstruction(mode="sequential", damping=[0.1, -1])
    job = prune_job(tiny_model_dir, tmp_path)  # 4 calibration windows
    job["reconstruction"] = {"mode": "sequential", "damping": [0.1, 1.0], "folds": 5}
    with pytest.raises(ValueError, match="reconstruction.folds=5 folds of 4 calibration windows leave a fold empty"):
        run_fit(job, tmp_path)
    assert not (tmp_path / "export").exists()


def test_a_job_with_a_damping_list_writes_the_choice_to_its_report(tiny_model_dir, tmp_path):
    job = prune_job(tiny_model_dir, tmp_path)
    job["reconstruction"] = {"mode": "sequential", "damping": [0.01, 0.1, 1.0], "folds": 2, "prior": "original",
                             "intercept": True}
    run_fit(job, tmp_path)
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    layers = report["reconstruction"]["layers"]
    assert layers and all(r["damping"] in (0.01, 0.1, 1.0) and len(r["heldout_error"]) == 3 for r in layers.values())
    assert "chosen from [0.01, 0.1, 1.0] by 2 folds of held-out windows" in (tmp_path / "export" / "report.md").read_text()


def test_the_memory_plan_counts_the_folds_moments():
    """Four folds hold four sets of one structure's moments, plus their total and one fold's
    held-out and training moments while it is judged: seven sets of what ``RefitStatistics`` allocates."""
    shape = ModelShape.from_config(tiny_config().to_dict())
    job = replace(estimation_job(shape), target_ratio=0.2)
    one, four = ({s.stage: s for s in plan_memory(shape, replace(job, reconstruction=ReconstructionSettings(
        "sequential", folds=folds))).stages}["reconstruction"] for folds in (1, 4))
    n = shape.intermediate_size  # down_proj's inputs: the widest refit
    stats = RefitStatistics(n, n)
    allocated = sum(getattr(stats, name).numel() * 8 for name in MOMENTS)
    assert four.bytes - one.bytes == pytest.approx(7 * allocated, rel=1e-2)
