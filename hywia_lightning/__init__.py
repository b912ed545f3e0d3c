"""hywia-lightning: structured pruning of Llama-family LLMs with hybrid-grained importance.

The names below are imported when first used (PEP 562), so that importing one submodule (the memory
plan's arithmetic in ``scripts/memory_plan.py``) does not import Lightning, torchmetrics and
transformers with every other module: several CPU seconds.
"""

from __future__ import annotations

import importlib

_SOURCES = {
    "CalibrationData": "calibration", "CausalLM": "causal_lm", "Estimator": "estimation",
    "GlobalAllocation": "allocation", "PruningScope": "allocation", "UniformAllocation": "allocation",
    "GRANULARITIES": "granularities", "Element1": "granularities", "Element2": "granularities",
    "Fluctuation": "granularities", "Granularity": "granularities", "Magnitude": "granularities",
    "Random": "granularities", "Vector": "granularities", "Vector2": "granularities", "Wanda": "granularities",
    "FusionTrainingArgs": "hywia", "HyWIA": "hywia", "LoRARecovery": "lora_recovery",
    "BUNDLED_MODEL": "models", "load_causal_lm": "models", "prune": "pipeline", "target_layers": "pipeline",
    "RecoveryData": "recovery_data", "Generation": "self_generation", "apply_plan": "slicing",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
