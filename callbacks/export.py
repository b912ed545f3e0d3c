"""Export the fitted (pruned) model and its report at the end of ``fit``."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from lightning import LightningModule, Trainer

from hywia_lightning.export import check_replaceable, export_pretrained, recover_interrupted, written_files
from hywia_lightning.files import run_folder, write_json_atomic

from .preflight import Preflight
from .report import write_report

log = logging.getLogger(__name__)


class Export(Preflight):
    """Write ``<default_root_dir>/<dirname>/``: a Hugging Face folder, ``report.json``, ``report.md``,
    PNG plots of the report, after pruning ``pruning_plan.json``, and after LoRA recovery ``adapter/``.
    Only global rank 0 writes. Everything is staged next to the folder and swapped in complete; the
    folder replaced must be empty or a previous export (preflight refuses anything else)."""

    def __init__(self, dirname: str = "export") -> None:
        """
        Args:
            dirname: the export folder, relative to ``trainer.default_root_dir`` (or an absolute path
                inside it); never the run folder itself.
        """
        self.dirname = dirname

    def export_dir(self, trainer: Trainer) -> Path:
        return run_folder(trainer.default_root_dir, self.dirname, self.setting("dirname"))

    def check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out = self.export_dir(trainer)
        source = Path(pl_module.source_path).expanduser()
        if source.exists() and (out == source.resolve() or out in source.resolve().parents):
            raise ValueError(
                f"trainer.default_root_dir={trainer.default_root_dir!r} with dirname={self.dirname!r} would write the "
                f"export to {out}, overwriting the input model model_name_or_path={str(source)!r}; "
                "choose another trainer.default_root_dir"
            )
        if trainer.is_global_zero:
            recover_interrupted(out)  # what a killed export left: restored, or removed (logged)
        check_replaceable(out, f"{self.setting('dirname')}={self.dirname!r}")
        if trainer.is_global_zero and written_files(out):
            log.info("%s holds a previous export: it is kept until the new one is complete, then replaced", out)

    def write_artifacts(self, pl_module: LightningModule, folder: Path) -> None:
        """What goes into the export besides the model: the pruning plan, and the module's own
        artifacts (``write_artifacts(folder)``, e.g. the LoRA adapters)."""
        plan = getattr(pl_module, "pruning_plan", None)
        if plan is not None:
            write_json_atomic(folder / "pruning_plan.json", plan.to_dict())
        if hasattr(pl_module, "write_artifacts"):
            pl_module.write_artifacts(folder)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        out = self.export_dir(trainer)
        report = pl_module.report
        start = time.perf_counter()

        def complete(folder: Path) -> None:  # into the staged folder, before it is swapped in
            self.write_artifacts(pl_module, folder)
            report.add_seconds("export", time.perf_counter() - start)
            write_report(trainer, pl_module, folder, export_dir=str(out))  # report.json, report.md, plots, logger

        export_pretrained(pl_module.model, pl_module.tokenizer, out, complete)
        report.moved_to(out / "report.json")
        log.info("export: %s (model, report.json, report.md and plots)", out)
