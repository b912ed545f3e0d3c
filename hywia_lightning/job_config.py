"""A job's keys from its ``--config`` files and ``--key value`` overrides, read without the CLI's parser.

Why: the CLI's parser (``cli.parse_job``) builds itself from the signatures of the Trainer and of
every stage, so it imports Lightning first, and Lightning imports torchmetrics, transformers and
scipy: 7–10 CPU seconds here. The memory plan reads a dozen keys and should answer in a few
seconds (``scripts/memory_plan.py``). This reader merges the YAML files in order and applies the
overrides as the CLI does (the later wins; ``--a.b VALUE`` or ``--a.b=VALUE`` with VALUE read as
YAML; a class's keys given beside its ``class_path`` or under ``init_args``). It validates nothing
and fills no default: ``main.py fit`` parses the same job with the CLI's parser and checks the same
plan before loading anything (tests/test_memory_plan.py compares both on the shipped configs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace

from .input_errors import InputError

_CLASS_KEYS = ("class_path", "init_args", "dict_kwargs")


def _merge(into: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def _as_class_spec(value: Any) -> Any:
    """``{class_path, init_args}`` with the class's keys given beside ``class_path`` moved into ``init_args``."""
    if not isinstance(value, dict):
        return value
    init_args = {k: v for k, v in value.items() if k not in _CLASS_KEYS}
    spec = {k: v for k, v in value.items() if k in _CLASS_KEYS}
    spec["init_args"] = _merge(dict(spec.get("init_args") or {}), init_args)
    return spec


def _normalized(value: Any, top: bool = False) -> Any:
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    if not isinstance(value, dict):
        return value
    if top:  # every top-level group but the trainer's is a class: the model, the data and the stages
        return {k: _normalized(_as_class_spec(v) if k != "trainer" else v) for k, v in value.items()}
    if "class_path" in value:
        value = _as_class_spec(value)
    return {k: _normalized(v) for k, v in value.items()}


def _namespace(value: Any) -> Any:
    if isinstance(value, dict):
        return Namespace(**{k: _namespace(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_namespace(v) for v in value]
    return value


def read_job(args: list[str]) -> Namespace:
    """The job of ``args`` (as given to ``main.py fit``) as a namespace, nothing imported or checked
    but the YAML."""
    config: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise InputError(arg, "is not a --key", "give keys as --key VALUE (or --key=VALUE)")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            key, value = arg[2:], args[i + 1]
            i += 1
        else:
            raise InputError(arg[2:], "has no value", f"give it one: {arg} VALUE")
        i += 1
        if key == "config":
            path = Path(value)
            if not path.is_file():
                raise InputError("config", f"{value!r} is not a file", "give the path of a job's YAML file")
            _merge(config, yaml.safe_load(path.read_text()) or {})
            continue
        *parents, last = key.split(".")
        node = config
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise InputError(key, f"sets a key inside {part!r}, which is not a group", "check the key's path")
        node[last] = yaml.safe_load(value)
    return _namespace(_normalized(config, top=True))
