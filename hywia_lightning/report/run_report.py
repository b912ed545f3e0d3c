"""One report per run: sections recorded by each stage, written atomically as ``report.json`` and,
rendered for a person, ``report.md`` next to it."""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ..data.text_sources import corpus_of
from ..files import write_json_atomic, write_text_atomic
from .markdown import render_markdown


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA allocation where a GPU is used), GiB."""
    peaks = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        peaks["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return peaks


def evaluation_warnings(sections: dict[str, Any]) -> list[str]:
    """What a reader must know before trusting the numbers: a perplexity measured on the corpus the
    model was calibrated on flatters it (the refit and the scores fit that text)."""
    calibration = (sections.get("pruning") or {}).get("calibration") or {}
    evaluated = (sections.get("perplexity") or {}).get("source")
    if not calibration or not evaluated:
        return []
    sources = calibration["source"] if isinstance(calibration["source"], list) else [calibration["source"]]
    same = [s for s in sources if s == evaluated or corpus_of(s) == corpus_of(evaluated)]
    if not same:
        return []
    what = "the same text" if evaluated in same else f"the same corpus ({corpus_of(evaluated)})"
    return [f"in-domain perplexity: the evaluation text `{evaluated}` is {what} as the calibration source "
            f"`{same[0]}`; the pruning and the refit fit that text, so this perplexity flatters the model: "
            "evaluate on another corpus to judge it on general text"]


class RunReport:
    """Sections of a run's report; once :attr:`path` is set, every record rewrites ``report.json``
    there and ``report.md`` next to it. Attached files (an evaluation's own results) go next to it
    too, written when attached and wherever the report is written anew."""

    def __init__(self) -> None:
        self.sections: dict[str, Any] = {"seconds": {}}
        self.attached: dict[str, Any] = {}  # file name next to report.json -> JSON data
        self.path: Path | None = None

    def record(self, section: str, values: Any) -> None:
        if isinstance(values, dict) and isinstance(self.sections.get(section), dict):
            self.sections[section].update(values)
        else:
            self.sections[section] = values
        self.sections["memory"] = peak_memory()
        warnings = evaluation_warnings(self.sections)
        if warnings or "warnings" in self.sections:
            self.sections["warnings"] = warnings
        self.flush()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the time spent in a stage to ``seconds.<name>`` (a stage may run in several parts)."""
        start = time.perf_counter()
        yield
        self.add_seconds(name, time.perf_counter() - start)

    def add_seconds(self, name: str, seconds: float) -> None:
        spent = seconds + self.sections["seconds"].get(name, 0.0)
        self.record("seconds", {name: round(spent, 3)})

    def attach(self, name: str, data: Any) -> None:
        """``name`` (a file name) next to ``report.json``, holding ``data`` as JSON."""
        self.attached[name] = data
        if self.path is not None:
            write_json_atomic(self.path.with_name(name), data)

    def write_to(self, path: Path) -> None:
        self.path = path
        for name, data in self.attached.items():
            write_json_atomic(path.with_name(name), data)
        self.flush()

    def moved_to(self, path: Path) -> None:
        """The report written by :meth:`write_to` now lives at ``path`` (its folder was renamed, the
        attached files with it): later records rewrite it there."""
        self.path = path

    def flush(self) -> None:
        if self.path is not None:
            write_json_atomic(self.path, self.sections)
            write_text_atomic(self.path.with_name("report.md"), render_markdown(self.sections))
