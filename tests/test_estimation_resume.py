"""An estimation killed midway resumes from its checkpoint, in Lightning's loop, to the same plan."""

from __future__ import annotations

import json

from tests.pipeline import prune_job, run_main


def test_a_killed_estimation_resumes_to_the_same_plan(tiny_model_dir, tmp_path):
    def job(root, **extra):
        config = prune_job(tiny_model_dir, root, {"num_windows": 8}, granularity="element1", **extra)
        config["trainer"]["callbacks"] = []
        config.pop("perplexity")
        return config

    whole = run_main(job(tmp_path / "whole"), tmp_path / "jobs")
    assert whole.returncode == 0, whole.stderr[-3000:]

    root = tmp_path / "resumed"
    crashing = job(root, estimation_checkpoint_every=2)
    crashing["trainer"]["callbacks"] = [{"class_path": "tests.crash.CrashInEstimation", "init_args": {"steps": 5}}]
    crashed = run_main(crashing, tmp_path / "jobs")
    assert crashed.returncode == 13, crashed.stderr[-3000:]
    saved = sorted(p.name for p in (root / "estimation").iterdir())
    assert len(saved) == 1 and saved[0].endswith("-rank0-step=4.ckpt"), saved

    resumed = run_main(job(root, estimation_checkpoint_every=2), tmp_path / "jobs")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "estimation resumes from" in resumed.stderr and saved[0] in resumed.stderr
    assert not list((root / "estimation").iterdir()), "the checkpoint outlived a complete estimation"
    plan = json.loads((root / "export" / "pruning_plan.json").read_text())
    assert plan == json.loads((tmp_path / "whole" / "export" / "pruning_plan.json").read_text())
    report = json.loads((root / "export" / "report.json").read_text())
    assert report["pruning"]["calibration"]["num_windows"] == 8


def test_a_checkpoint_of_another_job_is_not_resumed(tiny_model_dir, tmp_path):
    root = tmp_path / "run"
    config = prune_job(tiny_model_dir, root, {"num_windows": 8}, granularity="element1", estimation_checkpoint_every=2)
    config["trainer"]["callbacks"] = [{"class_path": "tests.crash.CrashInEstimation", "init_args": {"steps": 3}}]
    config.pop("perplexity")
    assert run_main(config, tmp_path / "jobs").returncode == 13
    config["trainer"]["callbacks"] = []
    config["data"]["init_args"]["seed"] = 1  # other windows: the saved sums measured something else
    result = run_main(config, tmp_path / "jobs")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "estimation resumes from" not in result.stderr
