"""The pruning job end to end on a tiny GQA Llama, through the CLI."""

import json

import pytest
import torch

from callbacks import Preflight
from hywia_lightning.core.plan import TOLERANCE
from hywia_lightning.core.structures import discover_structures

from .pipeline import logits_in_fresh_process, prune_job, run_fit


@pytest.fixture(scope="module")
def pruned_job(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    cli = run_fit(prune_job(tiny_model_dir, root), root)
    return cli, root


def test_job_removes_the_target_fraction_and_keeps_gqa_groups(pruned_job):
    cli, root = pruned_job
    report = json.loads((root / "export" / "report.json").read_text())
    pruning = report["pruning"]
    assert abs(pruning["fraction_removed"] - 0.1) <= TOLERANCE
    assert pruning["layers"] == [1, 3]
    for s in discover_structures(cli.model.model):
        assert s.attention.num_kv_heads == 2  # query_heads mode keeps every KV group...
        assert s.attention.num_heads % 2 == 0  # ...with the same number of query heads in each
    assert report["perplexity"]["value"] > 1
    assert set(report["seconds"]) >= {"estimation", "pruning", "perplexity", "export"}
    assert report["model"]["params"] == pruning["params_after"]


def test_export_loads_in_a_fresh_process_without_the_package_with_equal_logits(pruned_job, tmp_path):
    cli, root = pruned_job
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    logits, class_name = logits_in_fresh_process(root / "export", ids, tmp_path)
    assert class_name == "PrunedLlamaForCausalLM"
    with torch.no_grad():
        expected = cli.model.model(ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    config = json.loads((root / "export" / "config.json").read_text())
    assert config["layer_num_attention_heads"] == [s.attention.num_heads for s in discover_structures(cli.model.model)]


def test_pruned_model_generates(pruned_job):
    cli, _ = pruned_job
    ids = torch.tensor([[5, 6, 7]])
    assert cli.model.model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 7)


def test_same_config_and_seed_give_the_same_plan(pruned_job, tiny_model_dir, tmp_path):
    _, root = pruned_job
    run_fit(prune_job(tiny_model_dir, tmp_path), tmp_path)
    first = json.loads((root / "export" / "pruning_plan.json").read_text())
    second = json.loads((tmp_path / "export" / "pruning_plan.json").read_text())
    assert first == second


@pytest.mark.parametrize("granularity", ["random", "magnitude", "element2", "vector"])
def test_every_granularity_prunes_to_the_target(granularity, tiny_model_dir, tmp_path):
    run_fit(prune_job(tiny_model_dir, tmp_path, granularity=granularity, attention_unit="kv_groups"), tmp_path)
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    assert report["pruning"]["granularity"] == granularity
    assert abs(report["pruning"]["fraction_removed"] - 0.1) <= TOLERANCE


def test_a_ratio_near_the_most_the_range_allows_completes(tiny_model_dir, tmp_path):
    # later stages' preflight must not re-validate the ratio against the already pruned model
    run_fit(prune_job(tiny_model_dir, tmp_path, target_ratio=0.15), tmp_path)
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    assert abs(report["pruning"]["fraction_removed"] - 0.15) <= TOLERANCE


class CountingCheck(Preflight):
    """A stage whose check counts how often it runs."""

    def __init__(self) -> None:
        self.checks: list[str] = []

    def check(self, trainer, pl_module) -> None:
        self.checks.append(trainer.state.fn)


def test_preflight_runs_every_check_once_per_stage(tiny_model_dir, tmp_path):
    job = prune_job(tiny_model_dir, tmp_path)
    job["trainer"]["callbacks"] = [{"class_path": "tests.test_pruning_job.CountingCheck"}]
    cli = run_fit(job, tmp_path)
    [counting] = [c for c in cli.trainer.callbacks if isinstance(c, CountingCheck)]
    assert counting.checks == ["fit"], "four Preflight callbacks, one check"
    cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    assert counting.checks == ["fit", "validate"]
