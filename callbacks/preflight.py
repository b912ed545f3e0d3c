"""Preflight: every stage validates the whole run before any stage does heavy work."""

from __future__ import annotations

from lightning import Callback, LightningModule, Trainer
from typing_extensions import override

from hywia_lightning.input_errors import mark_input_error

_CHECKED = "_hywia_preflight_checked"  # the trainer attribute: the stage (fit, validate, test) already checked


class Preflight(Callback):
    """A callback with a cheap :meth:`check` of the run against the loaded model.

    Heavy stages call :func:`run_preflight` first, so a bad key of a later stage fails before the
    earlier stages spend their hours; every other Preflight callback calls it in ``setup``. The
    checks run once per stage, whichever callback asks first.
    """

    config_key: str | None = None  # where the YAML holds its arguments, e.g. "pruning.init_args" (set by HywiaCLI)

    def check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        raise NotImplementedError

    def setting(self, name: str) -> str:
        """How an error names this callback's key ``name``: the class's argument, and its YAML path
        when the CLI built the callback."""
        own = f"{type(self).__name__}.{name}"
        if self.config_key is None:
            return own
        return f"{own} ({self.config_key}.{name})"

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        run_preflight(trainer, pl_module)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if hasattr(trainer, _CHECKED):
            delattr(trainer, _CHECKED)  # a later fit/validate/test of this trainer checks again


def run_preflight(trainer: Trainer, pl_module: LightningModule) -> None:
    """Every Preflight callback's :meth:`~Preflight.check`, once per stage of ``trainer``."""
    if getattr(trainer, _CHECKED, None) == trainer.state.fn:
        return
    for callback in trainer.callbacks:
        if isinstance(callback, Preflight):
            try:
                callback.check(trainer, pl_module)
            except (ValueError, OSError) as error:  # the run's input, refused before any heavy work
                raise mark_input_error(error, callback.config_key)
    setattr(trainer, _CHECKED, trainer.state.fn)
