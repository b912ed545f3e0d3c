"""Sharded accumulators on 2 gloo processes: the plan, the sliced and the refit weights of 1 process,
with half of its g/g² bytes on each rank; and with the weights sharded too (FSDP2's ``fully_shard``),
the plan and the exported weights of 1 process with half of its weight bytes on each rank, through
the library and through a 2-process job (``pruning.shard_weights``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from hywia_lightning import GlobalAllocation, HyWIA, PruningScope, apply_plan, prune, target_layers
from hywia_lightning.cli import SHARDED_STRATEGY
from hywia_lightning.core.pipeline import accumulator_shards
from hywia_lightning.core.unit_groups import prunable_linears
from hywia_lightning.distributed.collective import Collective, process_group_collective
from hywia_lightning.distributed.gathered_copy import gathered_copy
from hywia_lightning.distributed.gathered_slicing import pruned
from hywia_lightning.distributed.local_ranks import run_ranks
from hywia_lightning.distributed.sharded_model import local_bytes, shard_model
from hywia_lightning.export.huggingface import export_pretrained
from hywia_lightning.input_errors import InputError
from hywia_lightning.memory_plan.stages import EstimationSettings, accumulator_bytes, weights
from hywia_lightning.models.shapes import ModelShape
from hywia_lightning.reconstruction.modes import RECONSTRUCTION_MODES, Independent

from .conftest import tiny_config, tiny_llama
from .pipeline import prune_job, run_fit, run_two_processes

# 5 windows, batches of 2: rank 0 runs windows [0, 2], [4]; rank 1 [1, 3] and a zero-weight window
WINDOWS = torch.randint(0, 300, (5, 16), generator=torch.Generator().manual_seed(1))
SHAPE = ModelShape.from_config(tiny_config().to_dict())
G_AND_G2 = EstimationSettings(needs=frozenset({"gradients", "squared_gradients"}), layers=(1, 2))


def prune_and_refit(collective: Collective | None, out: Path) -> None:
    """Every statistic (g, g², per-window rows, input moments), a global allocation, an intercept refit."""
    rank, world = (collective.rank, collective.world_size) if collective else (0, 1)
    model = tiny_llama()
    scorer = HyWIA(["element1", "element2", "vector2", "fluctuation"], normalization="kind")
    result = prune(model, WINDOWS, scorer, PruningScope(0.25), GlobalAllocation(), target_layers(model, 1, -1),
                   batch_size=2, collective=collective)
    refit, windows = Independent(intercept=True), WINDOWS[rank::world]
    reduce = collective.all_reduce if collective else (lambda t: t)
    refit.before_slicing(model, result.plan, windows, reduce)
    apply_plan(model, result.plan)
    sliced = {name: t.clone() for name, t in model.state_dict().items()}
    refit.after_slicing(model, result.plan, windows, reduce)
    torch.save({"plan": result.plan.to_dict(), "accumulator_bytes": result.accumulator_bytes, "sliced": sliced,
                "refit": model.state_dict()}, out / f"rank{rank}.pt")


def sharded_rank(out: Path) -> None:
    prune_and_refit(process_group_collective(), out)


def test_two_gloo_ranks_shard_the_accumulators_and_prune_like_one(tmp_path):
    prune_and_refit(None, tmp_path)
    one = torch.load(tmp_path / "rank0.pt", weights_only=True)
    (tmp_path / "ranks").mkdir()
    run_ranks(sharded_rank, 2, tmp_path / "ranks", timeout=150)
    for rank in (0, 1):
        got = torch.load(tmp_path / "ranks" / f"rank{rank}.pt", weights_only=True)
        assert json.dumps(got["plan"], sort_keys=True) == json.dumps(one["plan"], sort_keys=True)
        assert got["accumulator_bytes"] == pytest.approx(one["accumulator_bytes"] / 2, rel=0.03)
        assert got["accumulator_bytes"] == accumulator_bytes(SHAPE, G_AND_G2, shards=2)  # the memory plan's
        for stage in ("sliced", "refit"):
            assert got[stage].keys() == one[stage].keys()
            for name, tensor in one[stage].items():
                torch.testing.assert_close(got[stage][name], tensor, atol=1e-4, rtol=1e-4)


def prune_and_export(collective: Collective | None, tokenizer_dir: Path, out: Path, mode: str = "independent") -> None:
    """Every statistic, a global allocation, an intercept refit of ``mode``; under ``collective`` the
    weights are FSDP2-sharded, the pruned model is built one gathered layer at a time and sharded
    again, the refit runs on it, and rank 0 exports a copy gathered one tensor at a time."""
    rank, world = (collective.rank, collective.world_size) if collective else (0, 1)
    model = tiny_llama()
    layers = target_layers(model, 1, -1)
    if collective is not None:
        from torch.distributed.device_mesh import init_device_mesh

        shard_model(model, init_device_mesh("cpu", (collective.world_size,)))
    scorer = HyWIA(["element1", "element2", "vector2", "fluctuation"], normalization="kind")
    result = prune(model, WINDOWS, scorer, PruningScope(0.25), GlobalAllocation(), layers, batch_size=2,
                   collective=collective)
    weight_bytes = {"pruned layers": local_bytes(p for m in prunable_linears(layers, "query_heads") for p in m.parameters()),
                    "model": local_bytes(model.parameters())}  # what this rank holds after estimation and scoring
    refit, windows = RECONSTRUCTION_MODES[mode](intercept=True, batch_size=2), WINDOWS[rank::world]
    reduce = collective.all_reduce if collective else (lambda t: t)
    refit.before_slicing(model, result.plan, windows, reduce)
    model = pruned(model, result.plan, lambda index, layer: refit.prepare_layer(result.plan, index, layer))
    weight_bytes["pruned model"] = local_bytes(model.parameters())  # this rank's shards of the pruned model
    refit.after_slicing(model, result.plan, windows, reduce)
    plain = model if collective is None else gathered_copy(model, receive=rank == 0)
    if plain is not None:
        export_pretrained(plain, AutoTokenizer.from_pretrained(tokenizer_dir), out / "export")
    element1 = result.by_scheme["element1"]  # one scheme's own scores, before the fusion
    torch.save({"plan": result.plan.to_dict(), "element1": {str(k): v for k, v in element1.items()},
                "accumulator_bytes": result.accumulator_bytes, "weight_bytes": weight_bytes}, out / f"rank{rank}.pt")


def fsdp2_rank(tokenizer_dir: Path, out: Path, mode: str) -> None:
    prune_and_export(process_group_collective(), tokenizer_dir, out, mode)


@pytest.mark.parametrize("mode", ["independent", "sequential"])
def test_fsdp2_sharded_weights_prune_refit_and_export_like_one_process(tmp_path, tiny_model_dir, mode):
    prune_and_export(None, tiny_model_dir, tmp_path, mode)
    one = torch.load(tmp_path / "rank0.pt", weights_only=True)
    (tmp_path / "ranks").mkdir()
    run_ranks(fsdp2_rank, 2, tiny_model_dir, tmp_path / "ranks", mode, timeout=150)
    assert all(score.abs().sum() > 0 for score in one["element1"].values())  # gradients reached every group
    for rank in (0, 1):
        got = torch.load(tmp_path / "ranks" / f"rank{rank}.pt", weights_only=True)
        assert json.dumps(got["plan"], sort_keys=True) == json.dumps(one["plan"], sort_keys=True)
        for key, score in one["element1"].items():
            torch.testing.assert_close(got["element1"][key], score, atol=1e-6, rtol=1e-4)
        for part in ("pruned layers", "model"):
            assert got["weight_bytes"][part] == one["weight_bytes"][part] / 2  # FSDP2's shards
        assert got["weight_bytes"]["model"] == weights(SHAPE, 4) / 2  # the memory plan's sharded weights
        # the pruned model stays sharded: each rank about half of it (FSDP2 splits every tensor by rows, the
        # first ranks taking the larger halves of odd row counts)
        assert got["weight_bytes"]["pruned model"] == pytest.approx(one["weight_bytes"]["pruned model"] / 2, rel=0.02)
        assert got["accumulator_bytes"] == one["accumulator_bytes"] / 2
    exported, reference = (load_file(path / "export" / "model.safetensors") for path in (tmp_path / "ranks", tmp_path))
    assert exported.keys() == reference.keys()
    assert any(name.endswith("down_proj.bias") for name in reference)  # the intercepts were exported
    for name, tensor in reference.items():
        torch.testing.assert_close(exported[name], tensor, atol=1e-4, rtol=1e-4)
    configs = [json.loads((path / "export" / "config.json").read_text()) for path in (tmp_path / "ranks", tmp_path)]
    assert configs[0] == configs[1]


def test_sharding_follows_the_setting_and_what_the_collective_can():
    plain = Collective(0, 2, lambda t: t, lambda obj: obj)
    able = Collective(0, 2, lambda t: t, lambda obj: obj, lambda o, i: None, lambda o, i: None)
    assert accumulator_shards(able, None) is able and accumulator_shards(able, True) is able
    assert accumulator_shards(able, False) is None and accumulator_shards(plain, None) is None
    assert accumulator_shards(None, True) is None  # one process: whole sums are its only shard
    with pytest.raises(ValueError, match="shard_accumulators=True needs a reduce-scatter"):
        accumulator_shards(plain, True)


@pytest.mark.skipif(os.environ.get("HYWIA_RUN_SHARDED_JOB") != "1", reason=(
    "opt-in (HYWIA_RUN_SHARDED_JOB=1): passes alone and with its file (20-43 s, also under load), but hung once "
    "in a full-suite run (rank 1 gone, rank 0 waiting, 600 s timeout); cause not found yet"))
def test_a_job_with_shard_weights_on_two_processes_prunes_and_exports_like_one(tiny_model_dir, tmp_path, monkeypatch):
    """``main.py fit`` with ``pruning.shard_weights`` under ModelParallelStrategy (2 gloo processes):
    FSDP2 shards the weights for estimation, scoring, the dense perplexity baseline and the
    independent refit (5 windows: rank 1 pads its share), the slicing shards the pruned model again,
    the pruned perplexity runs on every rank and rank 0 exports; the plan, the exported weights and
    both perplexities are 1 process's, each rank held half of the dense and of the pruned weights."""
    def job(root, **pruning):
        config = prune_job(tiny_model_dir, root, data={"num_windows": 5}, estimation_batch_size=2, **pruning)
        config["reconstruction"] = {"intercept": True, "batch_size": 2}
        return config

    monkeypatch.setenv("HYWIA_CACHE", str(tmp_path / "cache-one"))  # each run measures its dense baseline
    run_fit(job(tmp_path / "one"), tmp_path / "one")
    monkeypatch.setenv("HYWIA_CACHE", str(tmp_path / "cache-two"))
    run_two_processes(job(tmp_path / "two", shard_weights=True), tmp_path, {"class_path": SHARDED_STRATEGY})
    reports = [json.loads((tmp_path / run / "export" / "report.json").read_text()) for run in ("one", "two")]
    plans = [json.loads((tmp_path / run / "export" / "pruning_plan.json").read_text()) for run in ("one", "two")]
    assert plans[1] == plans[0]
    one, two = (r["pruning"] for r in reports)
    assert (one["weight_shards"], two["weight_shards"]) == (1, 2)
    assert two["weight_bytes_per_rank"] * 2 == one["weight_bytes_per_rank"] > 0
    assert two["pruned_weight_bytes_per_rank"] == pytest.approx(one["pruned_weight_bytes_per_rank"] / 2, rel=0.02)
    assert reports[1]["perplexity"]["value"] == pytest.approx(reports[0]["perplexity"]["value"], rel=1e-4)
    assert two["accumulator_bytes_per_rank"] * 2 == one["accumulator_bytes_per_rank"]
    baselines = [r["baseline"]["perplexity"] for r in reports]
    assert not any(b["cached"] for b in baselines)
    assert baselines[1]["results"]["value"] == pytest.approx(baselines[0]["results"]["value"], rel=1e-5)
    exported, reference = (load_file(tmp_path / run / "export" / "model.safetensors") for run in ("two", "one"))
    assert exported.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(exported[name], tensor, atol=1e-4, rtol=1e-4)


def test_shard_weights_in_a_job_of_one_process_is_refused_before_loading(tmp_path):
    """Refused while parsing, before the model (which loads its weights when built) exists."""
    with pytest.raises(InputError, match="shard_weights=true shards the weights") as refused:
        run_fit(prune_job(tmp_path / "no-model-here", tmp_path, shard_weights=True), tmp_path)
    assert refused.value.key == "pruning.init_args.shard_weights"


def test_shard_weights_under_a_strategy_that_wraps_a_plain_model_is_refused_before_loading(tmp_path):
    """DDP broadcasts (and FSDP1 flattens) parameters, which the sharded pruned model's DTensors refuse."""
    config = prune_job(tmp_path / "no-model-here", tmp_path, shard_weights=True)
    config["trainer"].update(strategy="ddp", devices=2)
    with pytest.raises(InputError, match="ModelParallelStrategy") as refused:
        run_fit(config, tmp_path)
    assert refused.value.key == "trainer.strategy"
