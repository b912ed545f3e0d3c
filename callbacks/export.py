"""Export the fitted (pruned) model and its report at the end of ``fit``."""

from __future__ import annotations

from pathlib import Path

from lightning import Callback, LightningModule, Trainer

from hywia_lightning.export import export_pretrained
from hywia_lightning.report import write_json_atomic

from .preflight import Preflight, run_preflight
from .report import write_report


class Export(Preflight, Callback):
    """Write ``<default_root_dir>/<dirname>/``: a Hugging Face folder, ``report.json``, ``report.md``,
    PNG plots of the report, after pruning ``pruning_plan.json``, and after LoRA recovery ``adapter/``. Only global rank 0 writes; the previous export is replaced
    only once the new one is complete."""

    def __init__(self, dirname: str = "export") -> None:
        if not dirname or Path(dirname).is_absolute() or ".." in Path(dirname).parts:
            raise ValueError(f"dirname={dirname!r} must be a relative folder name inside trainer.default_root_dir")
        self.dirname = dirname

    def export_dir(self, trainer: Trainer) -> Path:
        return Path(trainer.default_root_dir) / self.dirname

    def check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out = self.export_dir(trainer).resolve()
        source = Path(pl_module.source_path).expanduser()
        if source.exists() and (out == source.resolve() or out in source.resolve().parents):
            raise ValueError(
                f"trainer.default_root_dir={trainer.default_root_dir!r} with dirname={self.dirname!r} would write the "
                f"export to {out}, overwriting the input model model_name_or_path={str(source)!r}; "
                "choose another trainer.default_root_dir"
            )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        run_preflight(trainer, pl_module)

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
        with report.stage("export"):
            export_pretrained(pl_module.model, pl_module.tokenizer, out, lambda folder: self.write_artifacts(pl_module, folder))
        write_report(trainer, pl_module, out, export_dir=str(out))  # report.json, report.md, plots, logger
