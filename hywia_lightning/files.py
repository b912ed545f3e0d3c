"""Files a run writes: atomic writes, and the output folders of its stages inside the run folder."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def file_mode() -> int:
    """The mode a plain ``open()`` would give a new file (mkstemp's are private)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """``write(f)`` into a temporary file next to ``path``, then rename it over ``path``: readers see
    the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def run_folder(root: str | Path, dirname: str, key: str) -> Path:
    """``<root>/<dirname>``, the folder a stage writes, refused unless it lies strictly inside the run
    folder ``root`` (``trainer.default_root_dir``); ``key`` names the setting in the error."""
    root_path = Path(root).expanduser().resolve()
    allowed = (f"allowed: a folder name relative to trainer.default_root_dir ({root_path}), such as 'export', "
               "or an absolute path inside it")
    if not isinstance(dirname, str) or not dirname.strip():
        raise ValueError(f"{key}={dirname!r} is empty; {allowed}")
    if ".." in Path(dirname).parts:
        raise ValueError(f"{key}={dirname!r} contains '..'; {allowed}")
    folder = (root_path / Path(dirname).expanduser()).resolve()
    if folder == root_path:
        raise ValueError(f"{key}={dirname!r} is the run folder itself, whose other files the stage would replace; {allowed}")
    if root_path not in folder.parents:
        raise ValueError(f"{key}={dirname!r} is {folder}, outside the run folder; {allowed}")
    return folder
