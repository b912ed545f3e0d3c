"""Lightning callbacks that run the pipeline's stages inside ``fit``; add yours here."""

from .export import Export
from .perplexity import PerplexityEvaluation
from .preflight import Preflight, run_preflight
from .pruning import StructuredPruning

__all__ = ["Export", "PerplexityEvaluation", "Preflight", "StructuredPruning", "run_preflight"]
