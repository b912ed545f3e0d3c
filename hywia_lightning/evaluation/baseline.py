"""The dense baseline of an evaluation, cached on disk so that it is measured once.

A pruned model's perplexity or zero-shot accuracy means little without the same numbers of the
model it was pruned from, on the same evaluation settings. Those do not change between runs, so
they are kept in ``<cache>/baselines/<sha256 of model + settings>.json`` (written atomically) and
measured only when missing. A local model folder enters the key with the sizes and times of its
weights and config, so a rewritten folder is measured again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from ..files import write_json_atomic
from ..models.loading import keyed_cache_file

log = logging.getLogger(__name__)

VERSION = 1  # bump when what a cached baseline means changes
_MODEL_FILES = ("config.json", "*.safetensors", "*.bin", "*.gguf")


def model_identity(model_name_or_path: str) -> str:
    """A stable name: an absolute path for a local folder, the name itself otherwise."""
    path = Path(model_name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else model_name_or_path


def file_fingerprint(path: str | os.PathLike) -> list | None:
    """Size and modification time of a local file, or of the weights and config of a local folder."""
    path = Path(path).expanduser()
    if path.is_file():
        stat = path.stat()
        return [path.name, stat.st_size, stat.st_mtime_ns]
    if path.is_dir():
        files = sorted({f for pattern in _MODEL_FILES for f in path.glob(pattern)})
        return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return None


def baseline_key(model_name_or_path: str, dtype: str, kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Everything the dense numbers depend on."""
    identity = model_identity(model_name_or_path)
    return {
        "version": VERSION, "kind": kind, "model": identity, "model_files": file_fingerprint(identity),
        "dtype": dtype, "settings": settings,
    }


def baseline_path(key: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    return keyed_cache_file("baselines", key["kind"], key, ".json", cache_dir)


def cached_baseline(
    key: dict[str, Any], compute: Callable[[], dict], cache_dir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """``{"results", "model", "cached", "cache_file", "seconds"}``: read from the cache, or computed by
    ``compute()`` and stored."""
    return read_baseline(key, cache_dir) or measure_baseline(key, compute, cache_dir)


def read_baseline(key: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The cached baseline of ``key`` (as :func:`cached_baseline` gives it), ``None`` when there is none."""
    path = baseline_path(key, cache_dir)
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            log.warning("ignoring the unreadable cached baseline %s (%s); measuring it again", path, error)
        else:
            if stored.get("key") == json.loads(json.dumps(key, default=str)):
                log.info("dense %s baseline of %s from the cache %s", key["kind"], key["model"], path)
                return {"model": key["model"], "results": stored["results"], "cached": True,
                        "cache_file": str(path), "seconds": stored.get("seconds")}
    return None


def measure_baseline(key: dict[str, Any], compute: Callable[[], dict], cache_dir: str | os.PathLike | None = None,
                     store: bool = True) -> dict[str, Any]:
    """The baseline of ``key`` computed by ``compute()``, stored in the cache where ``store``."""
    path = baseline_path(key, cache_dir)
    start = time.perf_counter()
    results = compute()
    seconds = round(time.perf_counter() - start, 3)
    if store:
        store_baseline(key, results, seconds, cache_dir)
    return {"model": key["model"], "results": results, "cached": False, "cache_file": str(path), "seconds": seconds}


def store_baseline(key: dict[str, Any], results: dict, seconds: float | None, cache_dir: str | os.PathLike | None = None) -> Path:
    path = baseline_path(key, cache_dir)
    write_json_atomic(path, {"key": key, "results": results, "seconds": seconds})
    return path


def is_pruned_folder(model_name_or_path: str) -> bool:
    """A local folder whose config carries per-layer widths (an export of a pruned model)."""
    config = Path(model_name_or_path).expanduser() / "config.json"
    if not config.is_file():
        return False
    return "layer_intermediate_size" in json.loads(config.read_text())


def dense_reference(model_name_or_path: str, max_hops: int = 8) -> str | None:
    """The unpruned model a model comes from: itself unless it is a pruned export, whose
    ``report.json`` names the model it was made from (followed through exports of exports).
    ``None`` when a pruned folder does not say."""
    name = model_name_or_path
    for _ in range(max_hops):
        if not is_pruned_folder(name):
            return name
        report = Path(name).expanduser() / "report.json"
        try:
            source = json.loads(report.read_text())["model"]["model_name_or_path"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return None
        if not source or model_identity(source) == model_identity(name):
            return None
        name = source
    return None
