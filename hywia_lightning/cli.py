"""The LightningCLI of hywia-lightning."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from .calibration import CalibrationData
from .progress import show_info_logs


def _instantiate_nested(class_type, *args, **kwargs):
    return class_type(*args, **kwargs)


class HywiaCLI(LightningCLI):
    """LightningCLI that also accepts data modules nested inside callbacks (calibration data).

    Lightning's own instantiator for data modules records hyperparameters from the top-level
    ``data`` key, which a calibration set given to a callback does not have; those are built plainly.
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
