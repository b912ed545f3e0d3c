"""Run a job through the real CLI, as ``python main.py fit --config`` would, from a config dict."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from callbacks import STAGES
from hywia_lightning.cli import HywiaCLI

REPO = Path(__file__).resolve().parent.parent


def prune_job(model_dir: Path, root: Path, data: dict | None = None, **pruning) -> dict:
    """A pruning-only job on ``model_dir``: prune, evaluate on a few chunks, export to ``root/export``."""
    return {
        "seed_everything": 0,
        "model": {"class_path": "hywia_lightning.CausalLM", "init_args": {"model_name_or_path": str(model_dir)}},
        "data": {"class_path": "hywia_lightning.CalibrationData", "init_args": {
            "source": "builtin:python-docs/train", "num_windows": 4, "seq_len": 32, "seed": 0, **(data or {}),
        }},
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 0, "limit_train_batches": 0, "limit_val_batches": 0,
            "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
            "default_root_dir": str(root),
        },
        "pruning": {"class_path": "callbacks.StructuredPruning", "init_args": {
            "target_ratio": 0.1, "granularity": "element1", "layer_start": 1, "layer_end": -1, **pruning,
        }},
        "perplexity": {"source": "builtin:python-docs/test", "seq_len": 32, "num_chunks": 4},
        "export": {"dirname": "export"},
    }


def run_fit(config: dict, workdir: Path) -> HywiaCLI:
    path = workdir / "job.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(copy.deepcopy(config)))
    return HywiaCLI(args=["fit", "--config", str(path)], stages=STAGES)


def run_two_processes(config: dict, tmp_path: Path, strategy: str | dict = "ddp") -> None:
    """``python main.py fit`` of ``config`` under ``strategy`` (DDP) with 2 CPU processes."""
    config["trainer"].update(strategy=strategy, devices=2)
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "main.py", "fit", "--config", str(path)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]


def run_main(config: dict, workdir: Path, *extra: str, timeout: int = 600, cwd: Path = REPO,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python main.py fit --config <workdir>/job-N.yaml *extra`` in a new process, from ``cwd``;
    ``env`` is added to this process's environment."""
    path = workdir / f"job-{len(list(workdir.glob('job-*.yaml')))}.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, str(REPO / "main.py"), "fit", "--config", str(path), *extra],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


FRESH_PROCESS_LOAD = r"""
import sys
sys.modules["hywia_lightning"] = None  # the export must not need this package
try:
    import hywia_lightning
except ImportError:
    pass
else:
    raise SystemExit("hywia_lightning is importable")
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=sys.argv[4] == "remote-code").eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
print(type(model).__name__)
"""


def logits_in_fresh_process(export_dir: Path, input_ids: torch.Tensor, workdir: Path,
                            remote_code: bool = True) -> tuple[torch.Tensor, str]:
    """Logits of ``export_dir`` loaded by plain transformers in a new process where this package
    cannot be imported (``trust_remote_code`` only with ``remote_code``); also the class name transformers chose."""
    torch.save(input_ids, workdir / "ids.pt")
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_LOAD, str(export_dir), str(workdir / "ids.pt"), str(workdir / "out.pt"),
         "remote-code" if remote_code else "stock"],
        capture_output=True, text=True, cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(workdir / "out.pt"), result.stdout.strip().splitlines()[-1]


def recovery_job(model_dir: Path, root: Path, max_steps: int = 4, **data) -> dict:
    """Prune a tiny model, train LoRA adapters for ``max_steps`` steps (checkpoint every 2), export."""
    calibration = {"class_path": "hywia_lightning.CalibrationData", "init_args": {
        "source": "builtin:python-docs/train", "num_windows": 4, "seq_len": 32, "seed": 0}}
    return {
        "seed_everything": 0,
        "model": {"class_path": "hywia_lightning.LoRARecovery", "init_args": {
            "model_name_or_path": str(model_dir), "r": 4, "alpha": 8, "dropout": 0.1,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
        }},
        "data": {"class_path": "hywia_lightning.RecoveryData", "init_args": {
            "source": "builtin:python-docs/train", "format": "text", "seq_len": 32, "batch_size": 2,
            "val_size": 4, "max_examples": 64, "seed": 0, **data,
        }},
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "val_check_interval": 2,
            "num_sanity_val_steps": 0, "logger": False, "enable_progress_bar": False, "default_root_dir": str(root),
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
                    "dirpath": str(root / "checkpoints"), "every_n_train_steps": 2, "save_top_k": -1, "save_last": True}},
            ],
        },
        "pruning": {"class_path": "callbacks.StructuredPruning", "init_args": {
            "target_ratio": 0.1, "calibration": calibration, "layer_start": 1, "layer_end": -1}},
        "reconstruction": {"calibration": calibration, "intercept": True},  # resume restores the fitted biases
        "export": {"dirname": "export"},
    }
