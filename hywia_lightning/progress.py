"""Progress of long stages: a live bar in a terminal, rate-limited INFO log lines elsewhere.

A stage that runs for minutes (estimation, fusion training, reconstruction, perplexity, zero-shot)
says how far it is. Attached to a terminal (standard error is a TTY, on the first process of the
node) it draws a tqdm bar and logs the final line; otherwise (batch jobs, SLURM, files, the other
ranks) it logs counts, rates and time left, at most one line every ``every`` seconds plus the last
one. ``HYWIA_PROGRESS=bar`` or ``log`` overrides the choice.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
PACKAGES = ("hywia_lightning", "callbacks")
DEFAULT_EVERY = 10.0
MODE_VARIABLE = "HYWIA_PROGRESS"


def use_bar() -> bool:
    """A live bar (terminal, first process of the node) rather than log lines; ``HYWIA_PROGRESS`` overrides."""
    mode = os.environ.get(MODE_VARIABLE, "").lower()
    if mode in ("bar", "log"):
        return mode == "bar"
    if mode:
        raise ValueError(f"{MODE_VARIABLE}={mode!r}: use bar or log (unset: a bar in a terminal, log lines elsewhere)")
    return sys.stderr.isatty() and os.environ.get("LOCAL_RANK", "0") == "0"


def show_info_logs() -> None:
    """Make this project's INFO lines visible when the application configured no logging.

    Lightning does the same for its own logger: with no handler on the root logger, Python would
    print WARNING and above only. Where logging is configured (an application, pytest), nothing changes.
    """
    if logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    for name in PACKAGES:
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


def _plural(unit: str) -> str:
    return unit if unit.endswith("s") else f"{unit}s"


class Progress:
    """``stage: window 12/32, 3.1 windows/s, 6s left``: one INFO line at most every ``every`` s, or a
    live bar (:func:`use_bar`) and the last line."""

    def __init__(self, stage: str, total: int | None, unit: str = "window", every: float = DEFAULT_EVERY,
                 logger: logging.Logger | None = None) -> None:
        if every < 0:
            raise ValueError(f"every={every} must be >= 0 (seconds between progress lines)")
        show_info_logs()
        self.stage, self.total, self.unit, self.every = stage, total, unit, every
        self.log = logger or logging.getLogger("hywia_lightning.progress")
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.bar = None
        if use_bar():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=stage, unit=unit, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        finished = self.total is not None and self.done >= self.total
        if self.bar is not None:
            self.bar.update(n)
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            if not finished:
                return
            self.bar.close()
        if finished or now - self.last >= self.every:
            self.last = now
            self.log.info("%s", self.line(now, note))

    def line(self, now: float | None = None, note: str = "") -> str:
        elapsed = max((now or time.perf_counter()) - self.start, 1e-9)
        rate = self.done / elapsed
        count = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
        text = f"{self.stage}: {self.unit} {count}, "
        text += f"{rate:.2f} {_plural(self.unit)}/s" if rate >= 1 else f"{1 / max(rate, 1e-9):.1f} s/{self.unit}"
        if self.total is not None and self.done < self.total and rate > 0:
            text += f", {(self.total - self.done) / rate:.0f}s left"
        elif self.total is not None:
            text += f", done in {elapsed:.1f}s"
        return f"{text}{', ' + note if note else ''}"

    def iterate(self, items: Iterable[T]) -> Iterator[T]:
        try:
            for item in items:
                yield item
                self.update()
        finally:
            self.close()

    def close(self) -> None:
        """End the bar of a stage that stopped before its total (nothing to do for log lines)."""
        if self.bar is not None:
            self.bar.close()
