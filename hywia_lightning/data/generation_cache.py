"""The on-disk cache of self-generated calibration windows, so that a model samples them once.

``<cache>/calibration/generated-<sha256 of the key>.pt`` (``$HYWIA_CACHE``, default
``~/.cache/hywia_lightning``, where the bundled model is converted), holding the key and the
windows, written atomically. The key is everything the windows depend on: the model (its name,
and for a local folder the sizes and times of its weights), the seed, the window count and
length, the generation settings, and the torch and transformers versions (sampling is
deterministic for one build, not across builds). A stored file whose key differs is not used.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from torch import Tensor

from ..evaluation.baseline import file_fingerprint, model_identity
from ..files import write_atomic
from ..models.loading import keyed_cache_file
from .self_generation import Generation

log = logging.getLogger(__name__)

VERSION = 1  # bump when what the generated windows mean changes


def generation_key(model_name_or_path: str, num_windows: int, seq_len: int, seed: int,
                   settings: Generation) -> dict[str, Any]:
    identity = model_identity(model_name_or_path)
    return {
        "version": VERSION, "model": identity, "model_files": file_fingerprint(identity), "num_windows": num_windows,
        "seq_len": seq_len, "seed": seed, "generation": settings.describe(),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }


def generation_path(key: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    return keyed_cache_file("calibration", "generated", key, ".pt", cache_dir)


def cached_generation(key: dict[str, Any], generate: Callable[[], Tensor],
                      cache_dir: str | os.PathLike | None = None) -> tuple[Tensor, dict[str, Any]]:
    """The windows of ``key`` from the cache, or made by ``generate()`` and stored; and how they were
    obtained (``cache_file``, ``cached``, ``seconds`` of the generation)."""
    path = generation_path(key, cache_dir)
    if path.is_file():
        try:
            stored = torch.load(path, weights_only=True)
        except Exception as error:  # a damaged file is regenerated, not fatal
            log.warning("ignoring the unreadable generated calibration %s (%s); generating it again", path, error)
        else:
            if stored.get("key") == json.loads(json.dumps(key, default=str)):
                log.info("generated calibration windows from the cache %s", path)
                return stored["windows"], {"cache_file": str(path), "cached": True, "seconds": stored.get("seconds")}
    start = time.perf_counter()
    windows = generate()
    seconds = round(time.perf_counter() - start, 1)
    payload = {"key": json.loads(json.dumps(key, default=str)), "windows": windows.contiguous(), "seconds": seconds}
    write_atomic(path, lambda f: torch.save(payload, f))
    log.info("generated %d calibration windows in %.1f s, cached in %s", windows.shape[0], seconds, path)
    return windows, {"cache_file": str(path), "cached": False, "seconds": seconds}
