"""The run's report as files (``report.json``, ``report.md``, PNG plots) and in the Lightning logger.

:func:`write_report` is what :class:`~callbacks.export.Export` does into its staged folder at the end of ``fit``;
:class:`Report` does it into a folder of its own at the end of ``fit``, ``validate`` or ``test``
(an evaluation job exports no model, but its numbers deserve a report too).
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib.pyplot as plt
from lightning import LightningModule, Trainer

from hywia_lightning.core.plan import count_parameters
from hywia_lightning.files import run_folder
from hywia_lightning.report.plots import figures, save

from .stage_end import StageEnd

log = logging.getLogger(__name__)


def report_scalars(sections: dict) -> dict[str, float]:
    """Numbers of the report that a metrics logger (CSV, TensorBoard) should also have; the
    evaluations log their own as they run."""
    scalars: dict[str, float] = {}
    pruning = sections.get("pruning")
    if pruning:
        scalars.update({"pruning/params_before": pruning["params_before"], "pruning/params_after": pruning["params_after"],
                        "pruning/fraction_removed": pruning["fraction_removed"]})
    recon = sections.get("reconstruction")
    if recon:
        scalars.update({"reconstruction/mean_error_before": recon["mean_error_before"],
                        "reconstruction/mean_error_after": recon["mean_error_after"]})
    scalars.update({f"seconds/{stage}": value for stage, value in sections.get("seconds", {}).items()})
    scalars.update({f"memory/{key}": value for key, value in sections.get("memory", {}).items()})
    return scalars


def write_report(trainer: Trainer, pl_module: LightningModule, folder: Path, **model_fields) -> Path:
    """Plots into ``folder`` (and to every logger that takes figures), the report's scalars to every
    logger, then ``report.json``, ``report.md`` and the files the evaluations attached; returns the
    path of ``report.json``."""
    report = pl_module.report
    written = []
    for name, fig in figures(report.sections).items():
        try:
            save(fig, folder / name)
            written.append(name)
            for logger in trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                if hasattr(experiment, "add_figure"):  # TensorBoard
                    experiment.add_figure(f"report/{name.rsplit('.', 1)[0]}", fig, global_step=trainer.global_step, close=False)
        finally:
            plt.close(fig)
    report.record("model", {
        "model_name_or_path": pl_module.hparams.get("model_name_or_path"),
        "params": count_parameters(pl_module.model),
        **model_fields,
        "plots": written,
    })
    for logger in trainer.loggers:
        logger.log_metrics(report_scalars(report.sections), step=trainer.global_step)
    report.write_to(folder / "report.json")
    return folder / "report.json"


class Report(StageEnd):
    """Write ``<default_root_dir>/<dirname>/report.json``, ``report.md`` and plots at the end of
    ``fit``, ``validate`` or ``test``. Only global rank 0 writes. List it after the evaluations."""

    def __init__(self, dirname: str = "report") -> None:
        """
        Args:
            dirname: the report's folder, relative to ``trainer.default_root_dir`` (or an absolute
                path inside it); never the run folder itself.
        """
        self.dirname = dirname

    def folder(self, trainer: Trainer) -> Path:
        return run_folder(trainer.default_root_dir, self.dirname, self.setting("dirname"))

    def check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.folder(trainer)

    def at_stage_end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            path = write_report(trainer, pl_module, self.folder(trainer), stage=stage)
            log.info("report: %s (and report.md, %d plots)", path, len(pl_module.report.sections["model"]["plots"]))
