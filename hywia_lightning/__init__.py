"""hywia-lightning: structured pruning of Llama-family LLMs with hybrid-grained importance."""

from .calibration import CalibrationData
from .causal_lm import CausalLM
from .estimation import ImportanceEstimation
from .granularities import GRANULARITIES, Element1, Element2, Granularity, Magnitude, Random, Vector
from .models import BUNDLED_MODEL, load_causal_lm

__all__ = [
    "BUNDLED_MODEL", "CalibrationData", "CausalLM", "Element1", "Element2", "GRANULARITIES", "Granularity",
    "ImportanceEstimation", "Magnitude", "Random", "Vector", "load_causal_lm",
]
