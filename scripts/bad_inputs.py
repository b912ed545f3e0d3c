"""Every bad input and fault of tests/bad_inputs.py, run through the real CLI on the bundled model,
tabulated into docs/reliability.md.

    python -m scripts.bad_inputs                      # everything (~15 min on 2 cores); from the repository root,
                                                      # so that tests.bad_inputs (the cases) imports
    python -m scripts.bad_inputs --only inputs        # or: faults

Inputs are added to the default job (``configs/prune_smollm2.yaml``, with 4 calibration windows and
4 perplexity chunks so that a case that is not refused still ends soon). Faults start from a
finished run (a previous export in place), kill the job with SIGKILL when its log reaches a stage,
or limit the size of the files it may write (a full disk), and record what was left and what the
next run did.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from tests.bad_inputs import INPUT_CASES, REPO, Outcome, run_case, run_cli

JOB = ["fit", "--config", "configs/prune_smollm2.yaml", "--data.init_args.num_windows", "4",
       "--perplexity.num_chunks", "4"]
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_killed(args: list[str], root: Path, trigger: str, timeout: int = 900) -> Outcome:
    """``python main.py <args>``, killed with SIGKILL as soon as a line of its output contains ``trigger``."""
    command = [sys.executable, "main.py", *args]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **ENV})
    lines = []
    for line in process.stdout:
        lines.append(line)
        if trigger in line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout)
    lines += process.stdout.read().splitlines(keepends=True)
    left = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []
    return Outcome(command, process.returncode, time.perf_counter() - start, "".join(lines), left)


def export_state(root: Path, previous: dict[str, int] | None) -> str:
    """What the run folder holds: the export (intact or not) and leftovers of interrupted exports."""
    export = root / "export"
    words = []
    if export.is_dir():
        sizes = {p.name: p.stat().st_size for p in export.iterdir() if p.is_file()}
        complete = {"report.json", "report.md", "model.safetensors", ".hywia_export"} <= set(sizes)
        words.append("previous export intact" if previous is not None and sizes == previous
                     else "complete new export" if complete else "INCOMPLETE export")
    else:
        words.append("no export folder")
    for kind in ("staging", "old"):
        found = list(root.glob(f".export.{kind}-*"))
        if found:
            words.append(f"{len(found)} .export.{kind}-* folder(s)")
    return ", ".join(words)


def fault_rows(work: Path) -> list[dict]:
    """The faults one after another on one run folder: each run also cleans up after the fault before
    it (what it said is that fault's "next run"), and a last clean run after the last fault."""
    root = work / "run"
    args = [*JOB, "--trainer.default_root_dir", str(root)]
    first = run_cli(args, root, ENV)
    assert first.returncode == 0, first.output[-3000:]
    learned = ["--pruning.init_args.fusion.mode", "hywia_lightning.Learned", "--pruning.init_args.fusion.mode.init_args.holdout", "1"]
    faults = [
        ("kill -9 during estimation", args, "estimation", None),
        ("kill -9 during fusion training", args + learned, "fusion training", None),
        ("kill -9 during reconstruction", args, "reconstruction:", None),
        ("kill -9 during perplexity", args, "perplexity: ", None),
        ("kill -9 while writing the export", args, None, "writing"),
        ("kill -9 with the new export staged", args, None, "staged"),
        ("kill -9 with the old export moved aside", args, None, "backed-up"),
        ("kill -9 right after the swap", args, None, "swapped"),
        (None, args, None, None),  # the clean run after the last fault
    ]
    rows, previous = [], _export_sizes(root)
    for name, fault_args, trigger, kill_at in faults:
        if trigger:
            outcome = run_killed(fault_args, root, trigger)
        else:
            outcome = run_cli(fault_args, root, {**ENV, **({"HYWIA_TEST_KILL_AT": kill_at} if kill_at else {})})
        if rows:
            cleaned = [line.split(": ", 1)[-1] for line in outcome.output.splitlines() if any(
                phrase in line for phrase in ("stale staging", "restored the previous export", "had already replaced"))]
            rows[-1]["next"] = "; ".join(cleaned) or "nothing to clean up"
        if name is None:
            rows[-1]["next"] += f"; that run: exit {outcome.returncode}, {export_state(root, None)}"
            break
        rows.append({"case": name, "command": _command(fault_args) + (f" (HYWIA_TEST_KILL_AT={kill_at})" if kill_at else ""),
                     "exit": outcome.returncode, "seconds": outcome.seconds, "last": outcome.last_lines(2),
                     "left": export_state(root, previous), "next": ""})
        previous = _export_sizes(root)
    rows.append(disk_full_row(args, root, _export_sizes(root)))
    rows.append(ddp_rank_row(work / "ddp"))
    return rows


def _export_sizes(root: Path) -> dict[str, int] | None:
    export = root / "export"
    return {p.name: p.stat().st_size for p in export.iterdir() if p.is_file()} if export.is_dir() else None


def disk_full_row(args: list[str], root: Path, previous: dict[str, int]) -> dict:
    limit = previous["model.safetensors"] // 2

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    start = time.perf_counter()
    result = subprocess.run([sys.executable, "main.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **ENV}, preexec_fn=limited)
    outcome = Outcome([], result.returncode, time.perf_counter() - start, result.stdout)
    return {"case": f"the disk fills while exporting (files limited to {limit // 2**20} MiB)",
            "command": _command(args) + " (ulimit -f)", "exit": outcome.returncode, "seconds": outcome.seconds,
            "last": outcome.last_lines(3), "left": export_state(root, previous), "next": "-"}


def ddp_rank_row(root: Path) -> dict:
    """Recovery on 2 DDP processes; rank 1 is killed once the step-2 checkpoint exists; then resumed."""
    args = ["fit", "--config", "configs/recover_smollm2.yaml", "--config", "configs/recover_smollm2_ddp.yaml",
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
            "--trainer.callbacks.every_n_train_steps", "2", "--data.init_args.val_size", "8",
            "--pruning.init_args.calibration.init_args.num_windows", "4",
            "--reconstruction.calibration.init_args.num_windows", "4", "--perplexity.num_chunks", "4"]
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, **ENV})
    checkpoint = root / "checkpoints" / "epoch=0-step=2.ckpt"
    while process.poll() is None and not checkpoint.exists():
        time.sleep(0.5)
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    killed_at = time.perf_counter()
    for child in children:
        os.kill(int(child), signal.SIGKILL)
    output, _ = process.communicate(timeout=600)
    waited = time.perf_counter() - killed_at
    left = sorted(p.name for p in (root / "checkpoints").iterdir())  # what the kill left, before the resume writes more
    resumed = run_cli([*args, "--ckpt_path", str(root / "checkpoints" / "last.ckpt")], root, ENV)
    report = root / "export" / "report.json"
    steps = json.loads(report.read_text())["recovery"]["steps"] if report.is_file() else None
    return {"case": f"kill -9 rank 1 of 2 (DDP) during recovery, after the step-2 checkpoint ({len(children)} process killed)",
            "command": _command(args), "exit": process.returncode, "seconds": time.perf_counter() - start,
            "last": [line for line in output.splitlines() if line.strip()][-2:],
            "left": f"rank 0 exited {waited:.1f} s after the kill; checkpoints: " + ", ".join(left),
            "next": f"--ckpt_path last.ckpt: exit {resumed.returncode}, recovery steps in the report: {steps}"
                    + ("" if resumed.returncode == 0 else "; " + " ".join(resumed.last_lines(3)))}


def input_rows(work: Path) -> list[dict]:
    rows = []
    for case in INPUT_CASES:
        outcome = run_case(case, JOB, work / re.sub(r"\W+", "_", case.name), ENV)
        named = any(case.key in line for line in outcome.last_lines(4))
        rows.append({"case": case.name, "command": _command(case.args) or f"(file made by {case.prepare.__name__})",
                     "exit": outcome.returncode, "seconds": outcome.seconds, "last": outcome.last_lines(3),
                     "left": ", ".join(f for f in outcome.left if not f.startswith("export/notes")) or "nothing",
                     "next": "key named" if named else f"KEY {case.key} NOT NAMED"})
    return rows


def _command(args) -> str:
    return " ".join(a if " " not in a else repr(a) for a in args)


def markdown(inputs: list[dict], faults: list[dict], seconds: float) -> str:
    def cell(text) -> str:
        text = "<br>".join(text) if isinstance(text, list) else str(text)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["# Reliability: bad inputs and faults, as a user meets them", "",
             "Written by `python -m scripts.bad_inputs` (tests/bad_inputs.py holds the cases; "
             "tests/test_input_errors.py runs the inputs on a tiny model in CI). "
             f"{len(inputs)} inputs and {len(faults)} faults on the bundled model, {seconds / 60:.0f} min on 2 cores. "
             "Each input is added to `python main.py fit --config configs/prune_smollm2.yaml --data.init_args.num_windows 4 "
             "--perplexity.num_chunks 4`. Exit code 2: the input was refused, with the paragraph shown; "
             "`HYWIA_TRACEBACK=1` shows the full report instead.", "",
             "## Bad inputs", "", "| case | arguments | exit | seconds | last lines of the output | left in the run folder | check |",
             "|---|---|---:|---:|---|---|---|"]
    lines += [f"| {cell(r['case'])} | `{cell(r['command'])}` | {r['exit']} | {r['seconds']:.1f} | {cell(r['last'])} | "
              f"{cell(r['left'])} | {cell(r['next'])} |" for r in inputs]
    lines += ["", "## Faults", "",
              "Each starts from a finished run of the same job (an export in place). Exit -9: killed by SIGKILL.", "",
              "| fault | command | exit | seconds | last lines | left on disk | the next run |", "|---|---|---:|---:|---|---|---|"]
    lines += [f"| {cell(r['case'])} | `{cell(r['command'])}` | {r['exit']} | {r['seconds']:.1f} | {cell(r['last'])} | "
              f"{cell(r['left'])} | {cell(r['next'])} |" for r in faults]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["inputs", "faults"])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability.md")
    options = parser.parse_args()
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bad_inputs-"))
    results = options.out.with_suffix(".json")
    rows = json.loads(results.read_text()) if results.is_file() else {"inputs": [], "faults": [], "seconds": {}}
    try:
        for section, run in (("inputs", input_rows), ("faults", fault_rows)):
            if options.only in (None, section):
                section_start = time.perf_counter()
                rows[section] = run(work / section)
                rows["seconds"][section] = time.perf_counter() - section_start
                results.write_text(json.dumps(rows, indent=1))  # a section kept even if the next one fails
    finally:
        shutil.rmtree(work, ignore_errors=True)
    options.out.write_text(markdown(rows["inputs"], rows["faults"], sum(rows["seconds"].values())))
    print(f"wrote {options.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
