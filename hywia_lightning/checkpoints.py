"""Reading a Lightning checkpoint's small entries (callback states) without loading its tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SHARDED_METADATA = "meta.pt"  # what Lightning's FSDP writes beside the shards of a sharded checkpoint


def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """The checkpoint's dictionary, with tensors memory-mapped (not read) where the format allows;
    for a sharded (FSDP) checkpoint folder, its metadata file. Read with ``weights_only=True``: a
    checkpoint runs no code."""
    path = Path(path)
    if path.is_dir():
        path = path / SHARDED_METADATA
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(path)!r}: no such checkpoint file (or sharded checkpoint folder)")
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as error:  # an old (non-zip) serialization cannot be memory-mapped
            if "mmap" not in str(error):
                raise
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:200]
        raise ValueError(f"ckpt_path={str(path)!r} is not a checkpoint of this project ({type(error).__name__}: {reason}); "
                         "allowed: a .ckpt file or sharded checkpoint folder that a run's ModelCheckpoint wrote") from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "callbacks"} & checkpoint.keys():
        raise ValueError(f"ckpt_path={str(path)!r} is not a checkpoint of this project (no state_dict or callback states); "
                         "allowed: a .ckpt file or sharded checkpoint folder that a run's ModelCheckpoint wrote")
    return checkpoint


def callback_state(path: str | Path, state_key: str) -> dict[str, Any] | None:
    """The state a callback saved in the checkpoint at ``path`` (``None`` if it saved none)."""
    return checkpoint_metadata(path).get("callbacks", {}).get(state_key)


def saved_parameter_names(path: str | Path) -> list[str]:
    """The names in the checkpoint's ``state_dict`` (for a sharded folder: in its distributed
    checkpoint's metadata), without reading any tensor."""
    path = Path(path)
    if path.is_dir():
        from torch.distributed.checkpoint import FileSystemReader

        return list(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    return list(checkpoint_metadata(path).get("state_dict", {}))
