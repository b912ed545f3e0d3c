"""Export a (pruned) model as a self-contained Hugging Face folder, written atomically.

The folder holds safetensors weights, the config with per-layer widths, the tokenizer and a copy
of :mod:`hywia_lightning.modeling_pruned`, so it loads with plain transformers and
``trust_remote_code=True`` on a machine without this package.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import modeling_pruned
from .report import file_mode
from .structures import check_supported

MODELING_FILE = Path(modeling_pruned.__file__).name


def export_pretrained(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``model`` and ``tokenizer`` to ``out_dir``, replacing it only once the new folder is complete.

    ``write_extra(folder)`` adds files of the caller's (plan, adapters) to the folder before it is swapped in.
    """
    check_supported(model)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    config = model.config
    class_name = modeling_pruned.PRUNED_CLASSES[config.model_type]
    previous = {key: getattr(config, key, None) for key in ("auto_map", "architectures")}
    try:
        config.auto_map = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{class_name}"}
        config.architectures = [class_name]
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.copyfile(modeling_pruned.__file__, staging / MODELING_FILE)
        if write_extra is not None:
            write_extra(staging)
        _make_readable(staging)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        for key, value in previous.items():
            setattr(config, key, value)
    return out_dir


def _make_readable(folder: Path) -> None:
    """Give the staged folder the modes a plain ``mkdir``/``open`` would (``mkdtemp`` makes it private)."""
    files = file_mode()
    folders = files | (files & 0o444) >> 2  # searchable wherever readable
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, folders if path.is_dir() else files)


def _replace_dir(new: Path, target: Path) -> None:
    """Swap ``new`` into place: the old folder is moved aside first and removed last."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        old.rmdir()
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
