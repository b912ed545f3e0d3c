"""The LightningCLI of hywia-lightning."""

from __future__ import annotations

import os
from typing import Any

import torch
from jsonargparse import Namespace
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveInt, import_object
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from .calibration import CalibrationData
from .progress import show_info_logs


def _instantiate_nested(class_type, *args, **kwargs):
    return class_type(*args, **kwargs)


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [] if value in (None, True, False) else [value]


def _in_run_folder(root: str, path: Any) -> Any:
    if isinstance(path, (str, os.PathLike)) and not os.path.isabs(path):
        return os.path.normpath(os.path.join(os.path.abspath(root), path))
    return path


# Typed keys (jsonargparse's PositiveInt, ...) reach the classes as int subclasses, and from them the
# report and the checkpoints: a resumed run reads those back with torch.load(weights_only=True).
torch.serialization.add_safe_globals([PositiveInt, NonNegativeInt, NonNegativeFloat])


class HywiaCLI(LightningCLI):
    """LightningCLI that

    - accepts data modules nested inside callbacks (calibration data): Lightning's own instantiator
      for data modules records hyperparameters from the top-level ``data`` key, which a calibration
      set given to a callback does not have; those are built plainly;
    - resolves the relative ``save_dir`` of every logger and ``dirpath`` of every
      ``ModelCheckpoint`` against ``trainer.default_root_dir``, so that one flag moves a whole run;
    - tells every callback with a ``config_index`` attribute its place in ``trainer.callbacks``,
      so that its errors can name their YAML key.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        show_info_logs()
        super().__init__(*args, **kwargs)

    def before_fit(self) -> None:
        """Hand ``--ckpt_path`` to the trainer before ``fit`` starts: a pruning callback reads the saved
        plan from it in ``setup`` and rebuilds the pruned architecture instead of pruning again."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path"):
            self.trainer.ckpt_path, config["ckpt_path"] = config["ckpt_path"], None

    def before_instantiate_classes(self) -> None:
        self.parser.add_instantiator(_instantiate_nested, CalibrationData, subclasses=True, prepend=True)
        trainer = self._get(self.config, "trainer")
        if trainer is not None:
            self._paths_in_run_folder(trainer)

    @staticmethod
    def _paths_in_run_folder(trainer: Namespace) -> None:
        root = os.fspath(trainer.get("default_root_dir") or os.getcwd())
        for logger in _as_list(trainer.get("logger")):
            init_args = logger.get("init_args") if isinstance(logger, Namespace) else None
            if init_args is not None and "save_dir" in init_args:
                init_args.save_dir = _in_run_folder(root, init_args.save_dir)
        for callback in _as_list(trainer.get("callbacks")):
            if not isinstance(callback, Namespace) or callback.get("init_args") is None:
                continue
            if issubclass(import_object(callback.class_path), ModelCheckpoint):
                callback.init_args.dirpath = _in_run_folder(root, callback.init_args.get("dirpath"))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        for index, callback in enumerate(_as_list(self._get(self.config_init, "trainer", default={}).get("callbacks"))):
            if hasattr(callback, "config_index"):
                callback.config_index = index
        return super().instantiate_trainer(**kwargs)
