"""Data safety through the real CLI (``python main.py fit --config``) on a tiny Llama: an export never
deletes what it did not write, a killed export never leaves a model without its report, every path
a run writes lies in its ``trainer.default_root_dir``, and ``last.ckpt`` is as current as the step
checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from hywia_lightning.export.huggingface import KILL_AT, MARKER

from .conftest import REPO
from .pipeline import prune_job, recovery_job, run_main

KILLED = -9  # SIGKILL


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_complete(export: Path) -> dict:
    """The export holds its model, report.json, report.md and every plot the report names, and its
    marker lists exactly its files."""
    report = json.loads((export / "report.json").read_text())
    names = set(files(export)) - {MARKER}
    assert {"model.safetensors", "config.json", "report.md", "pruning_plan.json", *report["model"]["plots"]} <= names
    assert report["model"]["plots"] and "perplexity" in report
    assert set(json.loads((export / MARKER).read_text())["files"]) == names
    return report


def leftovers(root: Path, kind: str) -> list[Path]:
    return sorted(root.glob(f".export.{kind}-*"))


# the export folder ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dirname,existing,message", [
    (".", "notes.txt", r"Export.dirname \(export.init_args.dirname\)='.' is the run folder itself"),
    ("export", "export/notes.txt", r"Export.dirname \(export.init_args.dirname\)='export': .*export "
                                   r"holds files that no export of this package wrote \(notes.txt\)"),
])
def test_an_export_that_would_delete_other_files_is_refused_before_estimation(
        dirname, existing, message, tiny_model_dir, tmp_path, env):
    root = tmp_path / "run"
    (root / existing).parent.mkdir(parents=True, exist_ok=True)
    (root / existing).write_text("mine\n")
    job = prune_job(tiny_model_dir, root)
    job["export"]["dirname"] = dirname
    result = run_main(job, tmp_path / "jobs", env=env)
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr[-3000:]
    assert "allowed:" in result.stderr or "Move those files away, or choose another dirname" in result.stderr
    assert "estimation: window" not in result.stderr and "pruned" not in result.stderr
    assert files(root) == {existing: b"mine\n"}


def test_a_killed_export_never_leaves_a_model_without_its_report(tiny_model_dir, tmp_path, env):
    """Killed at each point of the swap; every next run cleans up, says so, and ends with a complete export."""
    root, jobs = tmp_path / "run", tmp_path / "jobs"
    job = prune_job(tiny_model_dir, root)
    export = root / "export"

    first = run_main(job, jobs, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    previous = files(export)
    assert_complete(export)

    # killed while writing the new export: the previous export is untouched, the partial one apart
    writing = run_main(job, jobs, env={**env, KILL_AT: "writing"})
    assert writing.returncode == KILLED, writing.stderr[-3000:]
    assert files(export) == previous
    [partial] = leftovers(root, "staging")
    assert not (partial / "report.json").exists()

    # the next run removes it; killed with the new export complete in its staging folder
    staged = run_main(job, jobs, env={**env, KILL_AT: "staged"})
    assert staged.returncode == KILLED, staged.stderr[-3000:]
    assert f"removed the stale staging folder {partial}" in staged.stderr
    assert files(export) == previous
    [staging] = leftovers(root, "staging")
    assert_complete(staging)

    # the next run removes the stale staging folder; killed with the old export moved aside
    backed_up = run_main(job, jobs, env={**env, KILL_AT: "backed-up"})
    assert backed_up.returncode == KILLED
    assert f"removed the stale staging folder {staging}" in backed_up.stderr
    assert "holds a previous export: it is kept until the new one is complete" in backed_up.stderr
    assert not export.exists() and not staging.exists()
    [backup] = leftovers(root, "old")
    assert files(backup) == previous

    # the next run restores it before it starts; killed with the new export in place, the old not yet removed
    swapped = run_main(job, jobs, env={**env, KILL_AT: "swapped"})
    assert swapped.returncode == KILLED
    assert f"restored the previous export {export} from {backup.name}" in swapped.stderr
    report = assert_complete(export)
    assert report["seconds"]["export"] > 0
    assert len(leftovers(root, "old")) == 1 and not leftovers(root, "staging")

    # the next run removes the replaced export and ends cleanly
    last = run_main(job, jobs, env=env)
    assert last.returncode == 0, last.stderr[-3000:]
    assert "the previous export that an interrupted run had already replaced" in last.stderr
    assert "replacing the previous export" in last.stderr
    assert_complete(export)
    assert not list(root.glob(".export.*"))

    # a file of the user's put into the export: the export is refused, and nothing is touched
    (export / "notes.txt").write_text("mine\n")
    kept = files(export)
    refused = run_main(job, jobs, env=env)
    assert refused.returncode != 0 and "holds files that no export of this package wrote (notes.txt)" in refused.stderr
    assert files(export) == kept


# paths and checkpoints of the shipped recovery config ----------------------------------------------

def shipped_recovery(model_dir: Path, root: Path, max_steps: int) -> dict:
    """The tiny recovery job with the logger and the checkpoint settings of configs/recover_smollm2.yaml
    (checkpoints every 2 steps instead of 20)."""
    shipped = yaml.safe_load((REPO / "configs" / "recover_smollm2.yaml").read_text())["trainer"]
    job = recovery_job(model_dir, root, max_steps=max_steps)
    del job["trainer"]["default_root_dir"]
    job["trainer"]["logger"] = shipped["logger"]
    checkpoint = next(c for c in shipped["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
    checkpoint["init_args"]["every_n_train_steps"] = 2
    job["trainer"]["callbacks"][0] = checkpoint
    return job


def test_two_recovery_runs_with_different_root_dirs_share_no_file(tiny_model_dir, tmp_path, env):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    written = {}
    for name in ("a", "b"):
        root = tmp_path / name
        result = run_main(shipped_recovery(tiny_model_dir, root, 2), tmp_path / "jobs", "--trainer.default_root_dir",
                          str(root), cwd=cwd, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        written[name] = {root / relative for relative in files(root)}
        assert (root / "checkpoints" / "last.ckpt").exists() and (root / "export" / "report.json").is_file()
        assert list((root / "logs").rglob("metrics.csv"))
    assert not list(cwd.iterdir()), "a run wrote outside its trainer.default_root_dir"
    assert not written["a"] & written["b"]


def test_last_ckpt_is_current_whenever_a_step_checkpoint_is(tiny_model_dir, tmp_path, env):
    """Killed as soon as the step-4 checkpoint is written, last.ckpt is step 4's; the run resumes from it."""
    job = shipped_recovery(tiny_model_dir, tmp_path, 6)
    job["trainer"]["default_root_dir"] = str(tmp_path)
    crashing = json.loads(json.dumps(job))
    crashing["trainer"]["callbacks"].append({"class_path": "tests.crash.CrashAfterCheckpoint", "init_args": {"step": 4}})
    crashed = run_main(crashing, tmp_path / "jobs", env=env)
    assert crashed.returncode == 13, crashed.stderr[-3000:]
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=False, mmap=True)["global_step"] == 4

    resumed = run_main(job, tmp_path / "jobs", "--ckpt_path", str(checkpoints / "last.ckpt"), env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "estimation skipped" in resumed.stderr
    assert json.loads((tmp_path / "export" / "report.json").read_text())["recovery"]["steps"] == 6
