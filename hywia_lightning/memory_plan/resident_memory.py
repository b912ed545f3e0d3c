"""Resident memory of this process, with a peak that can be reset between stages.

Why: ``ru_maxrss`` only ever grows, so it cannot tell one stage's peak from the previous stage's.
Linux keeps the peak in ``/proc/self/status`` (``VmHWM``) and resets it to the current resident
size when ``5`` is written to ``/proc/self/clear_refs``; elsewhere the functions fall back to
``ru_maxrss`` and say that the reset did nothing.
"""

from __future__ import annotations

import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident bytes now (the peak so far where ``/proc`` is missing)."""
    value = _status_bytes("VmRSS")
    return value if value is not None else peak_rss()


def peak_rss() -> int:
    """Peak resident bytes since the process started or since the last :func:`reset_peak`."""
    value = _status_bytes("VmHWM")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Make the peak the current resident size; ``False`` where the system cannot."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True
