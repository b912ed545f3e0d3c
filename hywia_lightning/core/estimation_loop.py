"""Importance estimation as a LightningModule, run by Lightning's loop, resumable from checkpoints.

Each training step passes one batch of this rank's calibration windows through the frozen model
(forward, and backward where a scheme needs gradients), and the :class:`Estimator`'s hooks fold the
statistics. No weight changes: the module has no optimizer (Lightning steps a placeholder, so that
its step counter, and with it ``ModelCheckpoint(every_n_train_steps)``, still advances).

The sums so far are the module's checkpoint (:meth:`ImportanceEstimation.on_save_checkpoint`; a
rank's own shard where ``g``/``g²`` are sharded, so every rank writes its own file). A stopped
estimation, run again in the same run folder, resumes at the batch after its last checkpoint:
Lightning restores the sums before it asks for the batches, and the batches handed over are those
not yet folded. The checkpoint's name carries a fingerprint of what it measured (model, windows,
needs, ranks), so a changed job starts afresh; the ranks resume only from the same batch (else all
start afresh), and the files are deleted once the estimation is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Sequence

import torch
from lightning import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from ..distributed.collective import Collective
from ..local_loop import LocalLoop
from .estimation import Estimator

log = logging.getLogger(__name__)

#: Lightning's remarks on a loop without an optimizer and with steps that return no loss: meant so here
QUIET = ("`LightningModule.configure_optimizers` returned `None`", "`training_step` returned `None`",
         "resuming from a checkpoint that ended before the epoch ended")


class _From(Sampler[int]):
    """Batch numbers ``start..total-1``, with the length of the whole epoch (``total``): Lightning's
    restored step count plus the batches left is the epoch it expects."""

    def __init__(self, start: int, total: int) -> None:
        self.start, self.total = start, total

    def __iter__(self):
        return iter(range(self.start, self.total))

    def __len__(self) -> int:
        return self.total


class ImportanceEstimation(LightningModule):
    """Folds the statistics of ``windows`` (this rank's share, ``indices`` their global positions,
    ``None`` for a zero-weight window) into ``estimator``, one batch of ``estimator.batch_size`` per step."""

    def __init__(self, estimator: Estimator, windows: Tensor, indices: Sequence[int | None], fingerprint: str = "") -> None:
        super().__init__()
        self.estimator, self.fingerprint = estimator, fingerprint
        self.windows, self.indices = windows, list(indices)
        self.batches = math.ceil(len(self.indices) / estimator.batch_size)
        self.batches_done = 0

    def train_dataloader(self) -> DataLoader:
        return DataLoader(range(self.batches), batch_size=None, sampler=_From(self.batches_done, self.batches))

    def on_train_start(self) -> None:
        size = self.estimator.batch_size
        self.estimator.begin(len(self.indices), min(self.batches_done * size, len(self.indices)))

    def training_step(self, batch_number: int, batch_idx: int) -> None:
        start = int(batch_number) * self.estimator.batch_size
        stop = start + self.estimator.batch_size
        self.estimator.step(self.windows[start:stop], self.indices[start:stop])
        self.batches_done = int(batch_number) + 1

    def on_train_end(self) -> None:
        self.estimator.end()

    def configure_optimizers(self) -> None:
        return None  # statistics, not training: no weight changes

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["estimation"] = {"fingerprint": self.fingerprint, "batches_done": self.batches_done,
                                    **self.estimator.state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["estimation"]
        if state["fingerprint"] != self.fingerprint:
            raise ValueError("the estimation checkpoint measured another job (model, windows, needs or ranks)")
        self.batches_done = state["batches_done"]
        self.estimator.load_state(state)


def fingerprint(estimator: Estimator, windows: Tensor, indices: Sequence[int | None], world_size: int) -> str:
    """What an estimation measures, in 16 hex digits: the model's config and a sample of its weights,
    the windows and their positions, the needs, the batch size, the dtype and the ranks."""
    model = estimator.model
    config = getattr(model, "config", None)
    digest = hashlib.sha256(json.dumps({
        "config": config.to_dict() if config is not None else None,
        "weights": [float(m.weight.detach().float().sum()) for m in estimator.linears[:4]],
        "needs": sorted(estimator.needs), "batch_size": estimator.batch_size, "dtype": str(estimator.accumulate_dtype),
        "indices": list(indices), "world_size": world_size,
    }, sort_keys=True, default=str).encode())
    digest.update(windows.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def run_estimation(
    estimator: Estimator, windows: Tensor, indices: Sequence[int | None], loop: LocalLoop | None = None,
    checkpoint_every: int | None = None, collective: Collective | None = None,
) -> None:
    """Fold ``windows`` into ``estimator`` with a Trainer of ``loop`` (``None``: on the model's device,
    writing nothing); every ``checkpoint_every`` batches the sums go to ``loop``'s run folder, and a
    run that finds its own checkpoint there resumes from it."""
    loop = loop or LocalLoop.on_device_of(estimator.model)
    folder = loop.folder("estimation") if checkpoint_every else None
    module = ImportanceEstimation(estimator, windows, indices)
    callbacks, resume = [], None
    if folder is not None:  # only a checkpoint needs to know what it measured
        module.fingerprint = fingerprint(estimator, windows, indices, collective.world_size if collective else 1)
        name = f"{module.fingerprint}-rank{loop.rank}"
        callbacks.append(ModelCheckpoint(dirpath=str(folder), filename=name + "-{step}", every_n_train_steps=checkpoint_every,
                                         save_top_k=1, enable_version_counter=False, save_on_train_epoch_end=False))
        resume = _resumable(folder, name, collective)
    trainer = loop.trainer("estimation", callbacks=callbacks, max_epochs=1, limit_val_batches=0)
    with warnings.catch_warnings():
        for message in QUIET:
            warnings.filterwarnings("ignore", message=f".*{re.escape(message)}")
        trainer.fit(module, ckpt_path=resume)
    if folder is not None:
        for path in folder.glob(f"{name}-step=*.ckpt"):
            path.unlink()


def _resumable(folder: Path, name: str, collective: Collective | None) -> str | None:
    """This rank's checkpoint of the same estimation, where every rank holds one of the same step."""
    found = {int(p.stem.rpartition("=")[2]): p for p in folder.glob(f"{name}-step=*.ckpt")}
    step = max(found, default=-1)
    if collective is not None and collective.world_size > 1:
        steps = torch.zeros(collective.world_size, dtype=torch.float64)
        steps[collective.rank] = step
        steps = collective.all_reduce(steps)
        if bool((steps != steps[0]).any()):
            log.warning("estimation checkpoints of different steps on the ranks (%s): estimating afresh",
                        [int(s) for s in steps])
            return None
    if step < 0:
        return None
    log.info("estimation resumes from %s", found[step])
    return str(found[step])
