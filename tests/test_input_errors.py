"""What a user sees for a bad input through the real CLI: the key in the last lines, exit code 2,
no traceback; and faults of the export's disk."""

import resource
import signal
import subprocess
import sys

import pytest
import yaml

from hywia_lightning.input_errors import TRACEBACK_VARIABLE, from_parse_error

from .bad_inputs import INPUT_CASES, REPO, run_case
from .pipeline import prune_job, run_main


@pytest.fixture(scope="module")
def job_args(tiny_model_dir, tmp_path_factory) -> list[str]:
    """A working job on the tiny model with every stage the cases touch."""
    job = prune_job(tiny_model_dir, tmp_path_factory.mktemp("unused"))
    job["pruning"] = {"class_path": "callbacks.HybridPruning", "init_args": {
        "target_ratio": 0.1, "layer_start": 1, "layer_end": -1, "fusion": {"schemes": ["element2", "fluctuation"]}}}
    job["reconstruction"] = {"damping": 0.01}
    path = tmp_path_factory.mktemp("job") / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return ["fit", "--config", str(path)]


@pytest.mark.parametrize("case", INPUT_CASES, ids=[case.name for case in INPUT_CASES])
def test_a_bad_input_ends_in_one_paragraph_naming_its_key(case, job_args, tmp_path, env):
    outcome = run_case(case, job_args, tmp_path, env)
    last = outcome.last_lines(4)
    assert outcome.returncode == 2, outcome.output[-3000:]
    assert any(case.key in line for line in last), last
    assert "Traceback" not in outcome.output and "Does not validate against any of the Union" not in outcome.output
    assert "estimation: window" not in outcome.output, "refused only after heavy work started"
    assert not [f for f in outcome.left if "export/" in f and not f.startswith("export/notes")], outcome.left


def test_the_full_report_on_request(job_args, tmp_path, env):
    outcome = run_case(INPUT_CASES[0], job_args, tmp_path, {**env, TRACEBACK_VARIABLE: "1"})
    assert outcome.returncode != 0 and "Traceback" in outcome.output
    assert "target_ratio=1.5 must be in (0, 1)" in outcome.output


def test_a_misspelled_option_gets_the_closest_name():
    error = from_parse_error("unrecognized arguments: --reconstuction.damping 0.1", ["pruning", "reconstruction"])
    assert error.key == "reconstuction.damping" and "did you mean '--reconstruction.damping'?" in str(error)


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_disk_that_fills_while_exporting_keeps_the_previous_export(tiny_model_dir, tmp_path, env):
    root = tmp_path / "run"
    job = prune_job(tiny_model_dir, root)
    first = run_main(job, tmp_path / "jobs", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in (root / "export").iterdir()}
    weights = (root / "export" / "model.safetensors").stat().st_size

    path = tmp_path / "jobs" / "full.yaml"
    path.write_text(yaml.safe_dump(job))
    full = subprocess.run([sys.executable, "main.py", "fit", "--config", str(path)], cwd=REPO, capture_output=True,
                          text=True, env={**__import__("os").environ, **env}, preexec_fn=_file_size_limit(weights // 2))
    assert full.returncode == 2, full.stderr[-3000:]
    last = [line for line in full.stderr.splitlines() if line.strip()][-4:]
    assert any("writing the export to" in line and "File too large" in line and "previous export there is kept" in line
               for line in last), last
    assert {p.name: p.read_bytes() for p in (root / "export").iterdir()} == before
    assert not list(root.glob(".export.*")), "a partial export was left behind"
