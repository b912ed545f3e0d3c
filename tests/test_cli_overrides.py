"""A stage's keys change one at a time, from the command line or an overlay, as a user types them."""

import json
import subprocess
import sys

import yaml

from .conftest import REPO
from .pipeline import prune_job, run_main

DEFAULT_JOB = ["fit", "--config", "configs/prune_smollm2.yaml"]


def printed_config(*args: str, cwd=REPO) -> dict:
    result = subprocess.run([sys.executable, "main.py", *args, "--print_config"], cwd=cwd, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return yaml.safe_load(result.stdout)


def differences(a, b, path="") -> dict:
    """``{key path: (a's value, b's value)}`` of every leaf that differs."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = {}
        for key in a.keys() | b.keys():
            found.update(differences(a.get(key), b.get(key), f"{path}.{key}" if path else key))
        return found
    return {} if a == b else {path: (a, b)}


def test_one_key_of_a_stage_from_the_command_line_changes_exactly_that_key():
    shipped = printed_config(*DEFAULT_JOB)
    overridden = printed_config(*DEFAULT_JOB, "--pruning.target_ratio", "0.3", "--reconstruction.damping", "0.05")
    candidates = shipped["reconstruction"]["init_args"]["damping"]
    assert isinstance(candidates, list) and len(candidates) > 1  # the shipped refit chooses among them
    assert differences(shipped, overridden) == {
        "pruning.init_args.target_ratio": (0.2, 0.3), "reconstruction.init_args.damping": (candidates, 0.05)}


def test_an_overlay_that_sets_one_stage_leaves_the_others_in_place(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"pruning": {"init_args": {"target_ratio": 0.3}},
                                       "perplexity": {"num_chunks": 16}}))
    shipped = printed_config(*DEFAULT_JOB)
    overlaid = printed_config(*DEFAULT_JOB, "--config", str(overlay))
    assert differences(shipped, overlaid) == {
        "pruning.init_args.target_ratio": (0.2, 0.3), "perplexity.init_args.num_chunks": (128, 16)}


def test_a_stage_can_be_switched_off():
    assert printed_config(*DEFAULT_JOB, "--reconstruction", "null")["reconstruction"] is None


def test_a_command_line_override_reaches_the_run_and_its_report(tiny_model_dir, tmp_path, env):
    root = tmp_path / "run"
    job = prune_job(tiny_model_dir, root, layer_start=1, layer_end=-1)
    result = run_main(job, tmp_path / "jobs", "--pruning.target_ratio", "0.2", "--perplexity.num_chunks", "2", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((root / "export" / "report.json").read_text())
    assert report["pruning"]["target_ratio"] == 0.2 and report["pruning"]["layers"] == [1, 3]
    assert report["perplexity"]["chunks"] == 2


def test_a_second_pruning_stage_is_refused_naming_both_keys(tiny_model_dir, tmp_path, env):
    job = prune_job(tiny_model_dir, tmp_path / "run")
    job["trainer"]["callbacks"] = [{"class_path": "callbacks.StructuredPruning", "init_args": {"target_ratio": 0.1}}]
    result = run_main(job, tmp_path / "jobs", env=env)
    assert result.returncode != 0
    assert "trainer.callbacks[0] and pruning are both a StructuredPruning stage; keep one" in result.stderr
