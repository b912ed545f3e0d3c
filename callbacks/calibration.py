"""Which calibration windows a stage uses: its own, or the job's ``data``."""

from __future__ import annotations

from lightning import LightningModule, Trainer

from hywia_lightning.checks import check_context
from hywia_lightning.data.calibration import CalibrationData
from hywia_lightning.distributed.collective import trainer_collective


def calibration_for(stage: str, own: CalibrationData | None, trainer: Trainer) -> CalibrationData:
    data = own if own is not None else trainer.datamodule
    if not isinstance(data, CalibrationData):
        raise ValueError(
            f"{stage} needs calibration windows: set its calibration to a hywia_lightning.CalibrationData, "
            f"or the job's data to one (found {type(data).__name__})"
        )
    return data


def checked_calibration(stage: str, own: CalibrationData | None, trainer: Trainer, pl_module: LightningModule) -> CalibrationData:
    """The windows, built now (in the preflight, before any stage changes the model) so that a
    missing or too short source fails before any forward pass, and ``generated`` samples the dense
    model. Every rank takes rank 0's windows."""
    data = calibration_for(stage, own, trainer)
    data.check(f"{stage}.calibration.source" if data is own else "data.source")
    check_context(data.seq_len, pl_module.model.config,
                  f"{stage}.calibration.seq_len" if data is own else "data.seq_len")
    data.attach(pl_module.tokenizer, pl_module.model, trainer_collective(trainer))
    data.windows()
    return data
