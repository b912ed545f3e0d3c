"""The Trainer that runs one of the pipeline's own LightningModules (importance estimation, the
fusion attention) on this process.

Why a Trainer of their own, on one device: these modules run inside the pruning stage, in the
pruning callback's ``setup``, while the job's Trainer is itself running; in a distributed job its
processes already exist, and a second Trainer over the job's devices would launch them again. One
Trainer per process, on that process's device, launches nothing: Lightning's single-device strategy
opens no process group and leaves the job's rank-zero logging as it is, and the cluster environment
is named (:class:`LightningEnvironment`) so that no SLURM or torchelastic detection compares the
job's task count with this loop's one device. Every rank runs its own loop over its own share of
the windows, and the job's collectives sum what the ranks measured: Lightning's distributed sampler,
which pads a share by repeating windows, is not used, so 2 processes give exactly what 1 gives.

The loop's epoch metrics go to the job's loggers under the loop's name (``fusion/val_loss``), and
what it writes (checkpoints) goes under ``root_dir/<name>``. Without a run folder (a library call
with no Trainer of the user's) nothing is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn


@dataclass
class LocalLoop:
    """Where a pipeline module's Trainer runs and writes."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """This process's device."""
    root_dir: str | None = None
    """The run folder: each loop writes under ``root_dir/<name>``; ``None``: nothing is written."""
    loggers: Sequence[Logger] = ()
    """The job's loggers, which receive each loop's epoch metrics."""
    rank: int = 0
    """This process's rank in the job (names its files where ranks hold different states)."""

    @classmethod
    def of(cls, trainer: Trainer) -> "LocalLoop":
        """The loop of one process of ``trainer``'s job: its device, run folder, loggers and rank."""
        return cls(trainer.strategy.root_device, trainer.default_root_dir, list(trainer.loggers), trainer.global_rank)

    @classmethod
    def on_device_of(cls, model: nn.Module) -> "LocalLoop":
        """A loop on the device of ``model``'s weights, writing nothing: a library call's."""
        return cls(next(model.parameters()).device)

    def folder(self, name: str) -> Path | None:
        return None if self.root_dir is None else Path(self.root_dir) / name

    def trainer(self, name: str, callbacks: Sequence[Callback] = (), **kwargs) -> Trainer:
        """A Trainer on this process's device alone; ``kwargs`` are the loop's own (``max_epochs``, ...)."""
        device = self.device
        devices = [device.index] if device.type == "cuda" and device.index is not None else 1
        callbacks = [*callbacks, ForwardedMetrics(name, self.loggers)]
        folder = self.folder(name)
        lightning_info = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        level = lightning_info.level
        lightning_info.setLevel(logging.WARNING)  # its device lines and tips, the job's Trainer printed them already
        try:
            return Trainer(
                accelerator=device.type, devices=devices, num_nodes=1, strategy="auto", plugins=[LightningEnvironment()],
                logger=False, enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                default_root_dir=str(folder) if folder is not None else None, callbacks=callbacks, **kwargs,
            )
        finally:
            lightning_info.setLevel(level)


class ForwardedMetrics(Callback):
    """Hands a loop's metrics of each epoch to the job's loggers, as ``<name>/<metric>`` at step = epoch."""

    def __init__(self, name: str, loggers: Sequence[Logger]) -> None:
        self.name, self.loggers = name, list(loggers)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = {f"{self.name}/{key}": float(value) for key, value in trainer.callback_metrics.items()}
        for logger in self.loggers if metrics else ():
            logger.log_metrics(metrics, step=trainer.current_epoch)
