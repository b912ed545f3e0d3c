"""Two CPU processes (DDP, gloo) give the same pruning plan as one."""

import json
import subprocess
import sys

import yaml

from .conftest import REPO
from .pipeline import prune_job, run_fit


def test_two_processes_prune_like_one(tiny_model_dir, tmp_path):
    single = tmp_path / "single"
    run_fit(prune_job(tiny_model_dir, single), single)

    config = prune_job(tiny_model_dir, tmp_path / "ddp")
    config["trainer"].update(strategy="ddp", devices=2)
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "main.py", "fit", "--config", str(path)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]

    plan = lambda root: json.loads((root / "export" / "pruning_plan.json").read_text())
    assert plan(tmp_path / "ddp") == plan(single)
    report = json.loads((tmp_path / "ddp" / "export" / "report.json").read_text())
    assert report["pruning"]["params_after"] < report["pruning"]["params_before"]
