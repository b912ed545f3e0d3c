"""Export the fitted (pruned) model and its report at the end of ``fit``."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

from lightning import LightningModule, Trainer
from typing_extensions import override

from hywia_lightning.distributed.gathered_copy import gathered_copy
from hywia_lightning.distributed.sharded_model import has_sharded_weights
from hywia_lightning.export.gguf import GGUF_NAME, check_exportable, export_gguf, model_name
from hywia_lightning.export.huggingface import (
    check_replaceable, export_kind, export_pretrained, recover_interrupted, written_files,
)
from hywia_lightning.files import run_folder, write_json_atomic

from .preflight import Preflight
from .report import write_report

log = logging.getLogger(__name__)


class Export(Preflight):
    """Write ``<default_root_dir>/<dirname>/``: a Hugging Face folder (stock or with our modeling
    code, the report says which and why), with ``formats: [hf, gguf]`` also ``model.gguf`` for
    llama.cpp, ``report.json``, ``report.md``, PNG plots of the report, the evaluations' own files
    (``zeroshot_lm_eval.json``), after pruning ``pruning_plan.json``, and after LoRA recovery ``adapter/``. Only global rank 0 writes
    (a model whose weights FSDP2 shards is first gathered onto its host, one tensor at a time).
    Everything is staged next to the folder and swapped in complete; the folder replaced must be
    empty or a previous export (preflight refuses anything else)."""

    def __init__(self, dirname: str = "export", formats: list[Literal["hf", "gguf"]] = ["hf"],  # noqa: B006 (a CLI default)
                 gguf_dtype: Literal["float32", "float16", "bfloat16", "q8_0"] = "float16") -> None:
        """
        Args:
            dirname: the export folder, relative to ``trainer.default_root_dir`` (or an absolute path
                inside it); never the run folder itself.
            formats: ``hf`` (always: the Hugging Face folder) and optionally ``gguf``: ``model.gguf``
                in the same folder, converted from it (llama.cpp's ``deci`` architecture for
                per-layer widths, ``llama`` for uniform ones).
            gguf_dtype: the GGUF file's matrix type.
        """
        if "hf" not in formats:
            raise ValueError(f"formats={formats!r}: 'hf' is always written (the GGUF file is converted from it); "
                             "use formats: [hf, gguf]")
        self.dirname, self.formats, self.gguf_dtype = dirname, list(formats), gguf_dtype

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
        if "gguf" in self.formats:
            try:
                check_exportable(pl_module.model.config.to_dict(), pl_module.tokenizer)
            except ValueError as error:
                raise ValueError(f"{self.setting('formats')} has gguf: {error}") from None
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

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        start = time.perf_counter()
        model = pl_module.model
        if has_sharded_weights(model):  # every rank sends its shards, one tensor at a time; rank 0 keeps them
            model = gathered_copy(model, receive=trainer.is_global_zero)
        if not trainer.is_global_zero:
            return
        out = self.export_dir(trainer)
        report = pl_module.report

        kind = export_kind(model)

        def complete(folder: Path) -> None:  # into the staged folder, before it is swapped in
            self.write_artifacts(pl_module, folder)
            files = {}
            if "gguf" in self.formats:
                export_gguf(folder, folder / GGUF_NAME, self.gguf_dtype, name=model_name(out))
                files["gguf"] = {"file": GGUF_NAME, "dtype": self.gguf_dtype}
            report.add_seconds("export", time.perf_counter() - start)
            write_report(trainer, pl_module, folder, export_dir=str(out), export=kind.to_dict() | files)  # report.json, report.md, plots, logger

        export_pretrained(model, pl_module.tokenizer, out, complete)
        report.moved_to(out / "report.json")
        log.info("export: %s (%s model%s, report.json, report.md and plots): %s", out, kind.kind,
                 f", {GGUF_NAME}" if "gguf" in self.formats else "", kind.reason)
