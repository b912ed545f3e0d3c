"""The catalogue of bad inputs a user meets through the real CLI, and how to run one.

Each case is the command-line arguments added to a working job, and the key that the last lines
of the output must name. ``tests/test_input_errors.py`` runs them on a tiny model;
``scripts/bad_inputs.py`` runs them (and the kills) on the bundled model and writes
docs/reliability.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]
    key: str                                   # what the last lines must name
    prepare: Callable[[Path], tuple[str, ...]] | None = None  # extra arguments built in a scratch folder


def _not_a_checkpoint(folder: Path) -> tuple[str, ...]:
    path = folder / "model.ckpt"
    path.write_bytes(b"these bytes are no checkpoint\n" * 10)
    return ("--ckpt_path", str(path))


def _empty_zip_checkpoint(folder: Path) -> tuple[str, ...]:
    import torch

    path = folder / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)  # a real torch file, but no checkpoint of a run
    return ("--ckpt_path", str(path))


def _calibration_file(name: str, text: str) -> Callable[[Path], tuple[str, ...]]:
    """A ``prepare`` that writes a calibration file ``name`` holding ``text`` and points the job at it."""
    def prepare(folder: Path) -> tuple[str, ...]:
        (folder / name).write_text(text)
        return ("--data.init_args.source", str(folder / name))
    prepare.__name__ = f"a file {name}"
    return prepare


def _foreign_export(folder: Path) -> tuple[str, ...]:
    root = folder / "run"
    (root / "export").mkdir(parents=True)
    (root / "export" / "notes.txt").write_text("mine\n")
    return ("--trainer.default_root_dir", str(root))


INPUT_CASES = [
    Case("target_ratio above 1", ("--pruning.target_ratio", "1.5"), "pruning.init_args.target_ratio"),
    Case("target_ratio negative", ("--pruning.target_ratio", "-0.1"), "pruning.init_args.target_ratio"),
    Case("unknown granularity", ("--pruning", "callbacks.StructuredPruning", "--pruning.granularity", "taylor"),
         "pruning.init_args.granularity"),
    Case("a key the chosen class does not take", ("--pruning.init_args.granularity", "element1"),
         "pruning.init_args.granularity"),
    Case("unknown fusion scheme", ("--pruning.init_args.fusion.schemes", "[element2, taylor]"), "pruning.init_args.fusion"),
    Case("unknown fusion mode", ("--pruning.init_args.fusion.mode", "learnt"), "pruning.init_args.fusion.init_args.mode"),
    Case("one scheme only", ("--pruning.init_args.fusion.schemes", "[element2]"), "pruning.init_args.fusion.init_args.schemes"),
    Case("unknown allocation", ("--pruning.allocation", "adaptive"), "pruning.init_args.allocation"),
    Case("unknown attention unit", ("--pruning.attention_unit", "heads"), "pruning.init_args.attention_unit"),
    Case("round_to 0", ("--pruning.round_to", "0"), "pruning.init_args.round_to"),
    Case("layer range outside the model", ("--pruning.layer_start", "100"), "pruning.init_args.layer_start"),
    Case("misspelled stage key", ("--pruning.target_ratoi", "0.3"), "pruning.init_args.target_ratoi"),
    Case("misspelled stage", ("--prunning.target_ratio", "0.3"), "prunning.target_ratio"),
    Case("misspelled class_path", ("--pruning", "callbacks.HybridPrunning"), "pruning.class_path"),
    Case("negative damping", ("--reconstruction.damping", "-1"), "reconstruction.init_args.damping"),
    Case("unknown reconstruction mode", ("--reconstruction.mode", "fancy"), "reconstruction.init_args.mode"),
    Case("num_windows 0", ("--data.init_args.num_windows", "0"), "data.init_args.num_windows"),
    Case("seq_len 0", ("--data.init_args.seq_len", "0"), "data.init_args.seq_len"),
    Case("seq_len over the model's context", ("--data.init_args.seq_len", "100000"), "data.seq_len"),
    Case("missing calibration file", ("--data.init_args.source", "/nonexistent/calibration.txt"), "data.source"),
    Case("unsupported calibration file type", ("--data.init_args.source", "README.md"), "data.source"),
    Case("calibration record without its field", (), "data.source",
         _calibration_file("calibration.jsonl", '{"content": "a record without the text field"}\n')),
    Case("calibration file with a bad JSON line", (), "data.source",
         _calibration_file("calibration.jsonl", '{"text": "fine"}\n{"text": broken\n')),
    Case("calibration text too short", (), "data.source", _calibration_file("short.txt", "Only a few words here.\n")),
    Case("unknown built-in corpus", ("--data.init_args.source", "builtin:wikipedia"), "data.source"),
    Case("perplexity num_chunks 0", ("--perplexity.num_chunks", "0"), "perplexity.init_args.num_chunks"),
    Case("missing perplexity file", ("--perplexity.source", "/nonexistent/test.txt"), "perplexity.init_args.source"),
    Case("unknown zero-shot task", ("--zeroshot.tasks", "[piqa, hellaswagg]", "--zeroshot.data_dir", "."),
         "zeroshot.init_args.tasks"),
    Case("dtype float8", ("--model.init_args.dtype", "float8"), "model.init_args.dtype"),
    Case("missing local model folder", ("--model.init_args.model_name_or_path", "/nonexistent/model"),
         "model.init_args.model_name_or_path"),
    Case("unknown bundled model", ("--model.init_args.model_name_or_path", "bundled:SmolLM2-135M"),
         "model.init_args.model_name_or_path"),
    Case("ckpt_path that is no checkpoint", (), "ckpt_path", _not_a_checkpoint),
    Case("ckpt_path that is a plain torch file", (), "ckpt_path", _empty_zip_checkpoint),
    Case("export into the run folder itself", ("--export.dirname", "."), "export.init_args.dirname"),
    Case("export over a folder with the user's files", (), "export.init_args.dirname", _foreign_export),
]


@dataclass
class Outcome:
    command: list[str]
    returncode: int
    seconds: float
    output: str
    left: list[str] = field(default_factory=list)  # files of the run folder afterwards

    def last_lines(self, n: int = 4) -> list[str]:
        return [line for line in self.output.splitlines() if line.strip()][-n:]


def run_cli(args: list[str], root: Path, env: dict[str, str] | None = None, timeout: int = 600) -> Outcome:
    """``python main.py <args>`` in a new process, its output (stdout and stderr together) and the
    files of ``root`` afterwards."""
    command = [sys.executable, "main.py", *args]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})})
    left = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []
    return Outcome(command, result.returncode, time.perf_counter() - start, result.stdout, left)


def run_case(case: Case, job_args: list[str], folder: Path, env: dict[str, str] | None = None) -> Outcome:
    """``case`` added to the job ``job_args`` (``fit --config ...``), run in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    extra = case.prepare(folder) if case.prepare else ()
    root = folder / "run"
    args = [*job_args, "--trainer.default_root_dir", str(root), *case.args, *extra]
    return run_cli(args, root, env)
