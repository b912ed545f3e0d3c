"""Lightning callbacks that run the pipeline's stages inside ``fit``; add yours here."""

from .export import Export
from .perplexity import PerplexityEvaluation
from .preflight import Preflight, run_preflight
from .pruning import StructuredPruning
from .pruning_hooks import PruningHooks
from .reconstruction import LeastSquaresReconstruction

__all__ = [
    "Export", "LeastSquaresReconstruction", "PerplexityEvaluation", "Preflight", "PruningHooks", "StructuredPruning",
    "run_preflight",
]
