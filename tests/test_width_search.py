"""The distillation objective and the width search against it, on tiny random Llamas."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from hywia_lightning.core.allocation import PruningScope, UniformAllocation
from hywia_lightning.core.distillation import DistillationSet, kl_per_position, top_k_targets
from hywia_lightning.core.granularities import make_granularity
from hywia_lightning.core.pipeline import prune
from hywia_lightning.core.plan import count_parameters
from hywia_lightning.core.slicing import apply_plan
from hywia_lightning.core.structures import target_layers
from hywia_lightning.core.unit_groups import GroupKey
from hywia_lightning.core.width_search import (
    WidthSearch, _MaskedModel, _Structure, _structures, moved_parameters, propose,
)
from hywia_lightning.data.calibration import CalibrationData
from hywia_lightning.memory_plan.stages import DistillationSettings, plan_memory
from hywia_lightning.models.shapes import ModelShape

from .conftest import tiny_llama
from .pipeline import prune_job, run_fit
from .test_memory_plan import estimation_job

WINDOWS = torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(1))
HELD_OUT = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(2))


def exact_kl(teacher_logits, student_logits):
    p = torch.log_softmax(teacher_logits, -1)
    return (p.exp() * (p - torch.log_softmax(student_logits, -1))).sum(-1)


def test_top_k_kl_is_exact_with_every_token_and_a_lower_bound_with_fewer():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 5, 40) * 3, torch.randn(2, 5, 40) * 3
    exact = exact_kl(teacher, student)
    assert torch.allclose(kl_per_position(student, top_k_targets(teacher, 40)), exact, atol=1e-5)
    coarse = kl_per_position(student, top_k_targets(teacher, 4))
    assert (coarse <= exact + 1e-6).all() and (coarse < exact - 1e-3).any()
    assert torch.allclose(kl_per_position(teacher, top_k_targets(teacher, 4)), torch.zeros(2, 5), atol=1e-5)


def test_the_dense_model_has_zero_kl_and_a_pruned_one_more():
    model = tiny_llama()
    distill = DistillationSet.of(model, HELD_OUT, top_k=16, batch_size=4)
    assert distill.kl(model) == pytest.approx(0.0, abs=1e-6)
    pruned = copy.deepcopy(model)
    layers = target_layers(pruned, 1, -1)
    result = prune(pruned, WINDOWS, make_granularity("wanda"), PruningScope(0.2), UniformAllocation(), layers)
    apply_plan(pruned, result.plan)
    assert distill.kl(pruned) > 1e-4


def structure(layer, options, per_unit):
    return _Structure(GroupKey(layer, "mlp"), None, options, [c * per_unit for c in options])


def test_proposals_trade_units_from_the_cheapest_kl_per_parameter_to_the_dearest():
    cheap, dear = structure(0, list(range(5)), 10), structure(1, list(range(5)), 10)
    base = {cheap.key: 2, dear.key: 2}  # 40 parameters removed
    curves = {cheap.key: {4: 0.0, 2: 0.1, 0: 0.2}, dear.key: {4: 0.0, 2: 1.0, 0: 5.0}}
    assert propose([cheap, dear], curves, base, target=40, tolerance=0) == {cheap.key: 0, dear.key: 4}
    assert propose([cheap, dear], curves, base, target=60, tolerance=0) == {cheap.key: 0, dear.key: 2}
    halved = propose([cheap, dear], curves, base, target=40, tolerance=0, limit=10)
    assert halved == {cheap.key: 1, dear.key: 3} and moved_parameters([cheap, dear], base, halved) == 10
    # a concave curve is cut along its hull: all of it costs less per parameter than the dear one saves
    concave = {cheap.key: {4: 0.0, 2: 1.5, 0: 1.6}, dear.key: {4: 0.0, 2: 1.0, 0: 5.0}}
    assert propose([cheap, dear], concave, base, target=40, tolerance=0)[cheap.key] == 0
    flat = {cheap.key: {4: 0.0, 2: 1.0, 0: 2.0}, dear.key: {4: 0.0, 2: 1.0, 0: 2.0}}
    assert propose([cheap, dear], flat, base, target=40, tolerance=0) == base  # no trade gains
    assert propose([cheap, dear], curves, base, target=100, tolerance=0) is None  # beyond what is measured


def test_search_reaches_the_target_lowers_the_kl_and_is_deterministic():
    def run():
        model = tiny_llama(intermediate_size=64)
        total = count_parameters(model)
        distill = DistillationSet.of(model, HELD_OUT, top_k=32, batch_size=3)
        layers = target_layers(model, 0, None)
        before = [p.detach().clone() for p in model.parameters()]
        result = prune(model, WINDOWS, make_granularity("wanda"), PruningScope(0.25, round_to=8), UniformAllocation(),
                       layers, width_search=WidthSearch(levels=2, rounds=2, search_windows=3, batch_size=3),
                       distillation=distill)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "the search left the model dense"
        apply_plan(model, result.plan)
        return result, (total - count_parameters(model)) / total

    first, removed = run()
    second, _ = run()
    assert first.plan.to_dict() == second.plan.to_dict()
    assert abs(removed - 0.25) <= 0.005
    record = first.width_search
    assert record["chosen_kl"] <= record["start_kl"] and record["evaluations"] > 0
    assert "width_search" in first.seconds


def test_held_out_windows_are_disjoint_from_the_calibration_windows(tiny_tokenizer):
    data = CalibrationData("builtin:python-docs/train", 6, 16, seed=3)
    data.attach(tiny_tokenizer)
    calibration, held_out = data.windows(), data.held_out_windows(5)
    assert held_out.shape == (5, 16)
    assert not {tuple(w) for w in calibration.tolist()} & {tuple(w) for w in held_out.tolist()}
    assert torch.equal(data.held_out_windows(5), held_out)  # seeded and kept
    data.attach(tiny_tokenizer)
    assert torch.equal(data.windows(), calibration)  # the calibration windows do not move
    more = CalibrationData("builtin:python-docs/train", 60, 16, seed=3)
    more.attach(tiny_tokenizer)
    assert torch.equal(more.held_out_windows(5), held_out)  # nor do the held-out ones with more calibration


def test_a_job_reports_the_kl_and_the_searched_widths(tiny_model_dir, tmp_path):
    job = prune_job(tiny_model_dir, tmp_path, data={"num_windows": 6}, target_ratio=0.2, granularity="wanda",
                    distillation={"windows": 3, "top_k": 8, "batch_size": 2},
                    width_search={"levels": 2, "rounds": 2, "search_windows": 2, "batch_size": 2})
    job["reconstruction"] = {"mode": "sequential", "damping": 0.1, "prior": "original", "intercept": True}
    run_fit(job, tmp_path)
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    assert report["distillation"]["windows"] == 3 and report["distillation"]["kl"] > 0
    search = report["width_search"]
    assert search["chosen_kl"] <= search["start_kl"] and len(search["rounds"]) == 3
    assert {"distillation", "width_search"} <= set(report["seconds"])
    assert "Distillation to the dense model" in (tmp_path / "export" / "report.md").read_text()


def test_a_width_search_without_distillation_is_refused_with_the_key(tiny_model_dir, tmp_path):
    job = prune_job(tiny_model_dir, tmp_path, width_search={"levels": 2})
    with pytest.raises(ValueError, match="width_search: the search chooses widths by the KL to the dense model; set distillation"):
        run_fit(job, tmp_path)
    job = prune_job(tiny_model_dir, tmp_path, data={"num_windows": 4}, distillation={"windows": 10_000})
    with pytest.raises(ValueError, match="distillation: windows=10000 held-out windows beside 4 .* too short"):
        run_fit(job, tmp_path)
    assert not (tmp_path / "export").exists()


def test_the_memory_plan_counts_what_the_search_holds():
    """The plan's dense moments and teacher are the bytes the search and the teacher allocate."""
    model = tiny_llama()
    shape = ModelShape.from_config(model.config.to_dict())
    layers = target_layers(model, 1, None)
    job = replace(estimation_job(shape, layers=tuple(s.layer for s in layers)), target_ratio=0.2,
                  distillation=DistillationSettings(windows=6, top_k=16, seq_len=16, search=True))
    stages = {s.stage: {p.name: p.bytes for p in s.parts} for s in plan_memory(shape, job).stages}
    search = _MaskedModel(model, _structures(layers, PruningScope(0.2)), {}, PruningScope(0.2), WINDOWS, 0.1, 4)
    held = sum(t.numel() * t.element_size() for gram, total, _ in search.moments.values() for t in (gram, total))
    assert stages["width search"]["dense moments"] == held
    teacher = DistillationSet.of(model, HELD_OUT, top_k=16).teacher
    assert stages["distillation"]["teacher targets"] == teacher.nbytes == stages["width search"]["teacher targets"]
