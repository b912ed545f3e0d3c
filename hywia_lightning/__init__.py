"""hywia-lightning: structured pruning of Llama-family LLMs with hybrid-grained importance."""

from .calibration import CalibrationData
from .causal_lm import CausalLM
from .estimation import Estimator
from .allocation import GlobalAllocation, PruningScope, UniformAllocation
from .granularities import (
    GRANULARITIES, Element1, Element2, Fluctuation, Granularity, Magnitude, Random, Vector, Vector2, Wanda,
)
from .hywia import FusionTrainingArgs, HyWIA
from .lora_recovery import LoRARecovery
from .models import BUNDLED_MODEL, load_causal_lm
from .pipeline import prune, target_layers
from .recovery_data import RecoveryData
from .self_generation import Generation
from .slicing import apply_plan

__all__ = [
    "BUNDLED_MODEL", "CalibrationData", "CausalLM", "Element1", "Element2", "Estimator", "Fluctuation",
    "FusionTrainingArgs", "GRANULARITIES", "Generation", "GlobalAllocation", "Granularity", "HyWIA", "LoRARecovery", "Magnitude",
    "PruningScope", "Random", "RecoveryData", "UniformAllocation", "Vector", "Vector2", "Wanda", "apply_plan",
    "load_causal_lm", "prune", "target_layers",
]
