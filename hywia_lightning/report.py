"""One report per run: sections recorded by each stage, written atomically as ``report.json`` and,
rendered for a person, ``report.md`` next to it."""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .report_markdown import render_markdown


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA allocation where a GPU is used), GiB."""
    peaks = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        peaks["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return peaks


def file_mode() -> int:
    """The mode a plain ``open()`` would give a new file (mkstemp's are private)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_text_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


class RunReport:
    """Sections of a run's report; once :attr:`path` is set, every record rewrites ``report.json``
    there and ``report.md`` next to it."""

    def __init__(self) -> None:
        self.sections: dict[str, Any] = {"seconds": {}}
        self.path: Path | None = None

    def record(self, section: str, values: Any) -> None:
        if isinstance(values, dict) and isinstance(self.sections.get(section), dict):
            self.sections[section].update(values)
        else:
            self.sections[section] = values
        self.sections["memory"] = peak_memory()
        self.flush()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the time spent in a stage to ``seconds.<name>`` (a stage may run in several parts)."""
        start = time.perf_counter()
        yield
        spent = time.perf_counter() - start + self.sections["seconds"].get(name, 0.0)
        self.record("seconds", {name: round(spent, 3)})

    def write_to(self, path: Path) -> None:
        self.path = path
        self.flush()

    def flush(self) -> None:
        if self.path is not None:
            write_json_atomic(self.path, self.sections)
            write_text_atomic(self.path.with_name("report.md"), render_markdown(self.sections))
