"""hywia-lightning: structured pruning of Llama-family LLMs with hybrid-grained importance."""

from .calibration import CalibrationData
from .causal_lm import CausalLM
from .estimation import ImportanceEstimation
from .granularities import GRANULARITIES, Element1, Element2, Granularity, Magnitude, Random, Vector
from .lora_recovery import LoRARecovery
from .models import BUNDLED_MODEL, load_causal_lm
from .recovery_data import RecoveryData

__all__ = [
    "BUNDLED_MODEL", "CalibrationData", "CausalLM", "Element1", "Element2", "GRANULARITIES", "Granularity",
    "ImportanceEstimation", "LoRARecovery", "Magnitude", "Random", "RecoveryData", "Vector", "load_causal_lm",
]
