"""Preflight: every stage validates the whole run before any stage does heavy work."""

from __future__ import annotations

from lightning import LightningModule, Trainer


class Preflight:
    """A callback with a cheap :meth:`check` of the run against the loaded model.

    Heavy stages call :func:`run_preflight` first, so a bad key of a later stage fails before the
    earlier stages spend their hours.
    """

    def check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        raise NotImplementedError


def run_preflight(trainer: Trainer, pl_module: LightningModule) -> None:
    for callback in trainer.callbacks:
        if isinstance(callback, Preflight):
            callback.check(trainer, pl_module)
