"""One report per run: sections recorded by each stage, written atomically as JSON."""

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


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA allocation where a GPU is used), GiB."""
    peaks = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        peaks["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return peaks


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


class RunReport:
    """Sections of a run's report; once :attr:`path` is set, every record rewrites the file."""

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
