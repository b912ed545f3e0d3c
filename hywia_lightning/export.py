"""Export a (pruned) model as a self-contained Hugging Face folder, written atomically.

The folder holds safetensors weights, the config with per-layer widths, the tokenizer and a copy
of :mod:`hywia_lightning.modeling_pruned`, so it loads with plain transformers and
``trust_remote_code=True`` on a machine without this package.

An export never deletes what it did not write. Every export carries :data:`MARKER`, the list of
its files; a folder is only replaced when every file in it is on that list. The new folder is
staged next to the old one (``.<name>.staging-*``), the old one is renamed aside
(``.<name>.old-*``), the new one renamed into place, and the old one removed last; a run killed
anywhere in between leaves folders that the next export of the same folder cleans up or restores
(:func:`recover_interrupted`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Callable

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import modeling_pruned
from .files import file_mode, write_json_atomic
from .input_errors import mark_input_error
from .structures import check_supported

log = logging.getLogger(__name__)

MODELING_FILE = Path(modeling_pruned.__file__).name
MARKER = ".hywia_export"  # JSON: {"written_by": ..., "files": [every file of the export, relative]}
KILL_AT = "HYWIA_TEST_KILL_AT"  # tests: SIGKILL this process at the named point of the swap (see _crash_point)


def export_pretrained(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``model`` and ``tokenizer`` to ``out_dir``, replacing a previous export there only once
    the new folder is complete; a folder holding anything else is refused (:func:`check_replaceable`).

    ``write_extra(folder)`` adds files of the caller's (plan, adapters, report) to the folder before it is swapped in.
    """
    check_supported(model)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(out_dir)
    check_replaceable(out_dir, "the export folder")
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    write_json_atomic(staging / MARKER, {"written_by": __name__, "files": []})  # ours, for the cleanup of a killed run
    config = model.config
    class_name = modeling_pruned.PRUNED_CLASSES[config.model_type]
    previous = {key: getattr(config, key, None) for key in ("auto_map", "architectures")}
    try:
        config.auto_map = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{class_name}"}
        config.architectures = [class_name]
        model.save_pretrained(staging)
        _crash_point("writing")
        tokenizer.save_pretrained(staging)
        shutil.copyfile(modeling_pruned.__file__, staging / MODELING_FILE)
        if write_extra is not None:
            write_extra(staging)
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file() and p.name != MARKER)
        write_json_atomic(staging / MARKER, {"written_by": __name__, "files": files})
        _make_readable(staging)
        _sync(staging)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        reason = _out_of_space(error)
        if reason:
            raise mark_input_error(OSError((
                f"writing the export to {out_dir} failed: {reason}. Nothing of it was left behind"
                f"{' and the previous export there is kept' if out_dir.exists() else ''}; free space on that disk, "
                "or move the run with trainer.default_root_dir"))) from error
        raise
    finally:
        for key, value in previous.items():
            setattr(config, key, value)
    _crash_point("staged")
    try:
        check_replaceable(out_dir, "the export folder")  # again: a file may have been added while this run worked
    except ValueError as error:
        raise ValueError(f"{error}. The new export is complete in {staging}: move it before the next run, "
                         "which removes stale staging folders") from None
    _replace_dir(staging, out_dir)
    return out_dir


_NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}  # a full disk, a file size limit, a quota


def _out_of_space(error: BaseException) -> str | None:
    """Why ``error`` means the disk took no more (an ``OSError``, or safetensors' own error that
    carries the OS error number), else ``None``."""
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
        return error.strerror
    number = re.search(r"os error (\d+)", str(error))
    if number and int(number.group(1)) in _NO_SPACE:
        return os.strerror(int(number.group(1)))
    return None


def _crash_point(name: str) -> None:
    """Fault injection for the tests: ``HYWIA_TEST_KILL_AT=<name>`` kills this process here, as a
    preempted node would (no cleanup). Points: ``staged`` (new folder complete, nothing swapped),
    ``backed-up`` (old folder renamed aside, new one not yet in place), ``swapped`` (new one in
    place, old one not yet removed)."""
    if os.environ.get(KILL_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def written_files(folder: Path) -> list[str] | None:
    """The files an export of ours says it wrote (``None``: the folder is no export of ours)."""
    try:
        manifest = json.loads((folder / MARKER).read_text())
        return [str(name) for name in manifest["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def foreign_files(folder: Path) -> list[str]:
    """Everything in ``folder`` (relative paths) that no export of ours wrote."""
    entries = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    written = written_files(folder)
    if written is None:
        return entries
    ours = {MARKER, *written}
    ours |= {parent.as_posix() for name in written for parent in Path(name).parents if parent != Path(".")}
    return [entry for entry in entries if entry not in ours]


def check_replaceable(folder: Path, key: str) -> None:
    """Refuse to replace ``folder`` unless it is absent, empty, or a previous export of ours with
    nothing added to it; ``key`` names the setting in the error."""
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise ValueError(f"{key}: {folder} exists and is not a folder; an export writes a folder there. "
                         "Move it away or choose another dirname")
    foreign = foreign_files(folder)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"{key}: {folder} holds files that no export of this package wrote ({shown}); an export replaces its "
            f"whole folder, so it only replaces an empty folder or a previous export (recognised by its {MARKER} "
            "file, which lists the export's files). Move those files away, or choose another dirname"
        )


def recover_interrupted(out_dir: Path) -> None:
    """Clean up after an export of ``out_dir`` that was killed: a previous export moved aside and
    not put back is restored when no export is in place (removed when one is); staging folders of
    ours (they carry :data:`MARKER`) are removed. Each action is logged."""
    parent, name = out_dir.parent, out_dir.name
    if not parent.is_dir():
        return
    for backup in sorted(parent.glob(f".{name}.old-*")):
        if written_files(backup) is None:
            log.warning("%s looks like the backup of an interrupted export but has no %s: left alone", backup, MARKER)
        elif not out_dir.exists():
            backup.rename(out_dir)
            log.warning("restored the previous export %s from %s (a run was killed while swapping in its export)",
                        out_dir, backup.name)
        else:
            shutil.rmtree(backup)
            log.warning("removed %s, the previous export that an interrupted run had already replaced", backup)
    for staging in sorted(parent.glob(f".{name}.staging-*")):
        if staging.is_dir() and not staging.is_symlink() and (written_files(staging) is not None or not any(staging.iterdir())):
            size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
            shutil.rmtree(staging)
            log.warning("removed the stale staging folder %s (%.1f MB) of an export that was killed while writing",
                        staging, size / 2**20)


def _make_readable(folder: Path) -> None:
    """Give the staged folder the modes a plain ``mkdir``/``open`` would (``mkdtemp`` makes it private)."""
    files = file_mode()
    folders = files | (files & 0o444) >> 2  # searchable wherever readable
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, folders if path.is_dir() else files)


def _sync(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk, so the swap never puts in place a folder
    whose files are still only in the page cache."""
    for path in [*folder.rglob("*"), folder]:
        _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(new: Path, target: Path) -> None:
    """Swap ``new`` into place: the old folder is renamed aside first and removed last (renames are atomic)."""
    backup = None
    if target.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        backup.rmdir()
        target.rename(backup)
        log.info("replacing the previous export %s (moved aside to %s until the new one is in place)", target, backup.name)
        _crash_point("backed-up")
    new.rename(target)
    _fsync(target.parent)  # the renames themselves
    _crash_point("swapped")
    if backup is not None:
        shutil.rmtree(backup)
