"""hywia-lightning: structured pruning of Llama-family LLMs with hybrid-grained importance.

The names below are imported when first used (PEP 562), so that importing one submodule (the memory
plan's arithmetic in ``scripts/memory_plan.py``) does not import Lightning, torchmetrics and
transformers with every other module: several CPU seconds.
"""

from __future__ import annotations

import importlib

_SOURCES = {
    "CalibrationData": "data.calibration", "CausalLM": "models.causal_lm", "Estimator": "core.estimation",
    "GlobalAllocation": "core.allocation", "PruningScope": "core.allocation", "UniformAllocation": "core.allocation",
    "GRANULARITIES": "core.granularities", "Element1": "core.granularities", "Element2": "core.granularities",
    "Fluctuation": "core.granularities", "Granularity": "core.granularities", "Magnitude": "core.granularities",
    "Random": "core.granularities", "Vector": "core.granularities", "Vector2": "core.granularities", "Wanda": "core.granularities",
    "HyWIA": "fusion.hywia", "Fixed": "fusion.modes", "Heuristic": "fusion.modes", "Learned": "fusion.modes",
    "Compensated": "fusion.modes", "FusionMode": "fusion.modes", "LoRARecovery": "recovery.lora_recovery",
    "BUNDLED_MODEL": "models.loading", "load_causal_lm": "models.loading", "prune": "core.pipeline", "target_layers": "core.structures",
    "RecoveryData": "data.recovery_data", "Generation": "data.self_generation", "apply_plan": "core.slicing",
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
