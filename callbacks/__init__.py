"""Lightning callbacks that run the pipeline's stages inside ``fit`` (and evaluate in ``validate``/``test``); add yours here."""

from .evaluation import Evaluation
from .export import Export
from .hybrid_pruning import HybridPruning
from .perplexity import PerplexityEvaluation
from .preflight import Preflight, run_preflight
from .pruning import StructuredPruning
from .pruning_hooks import PruningHooks
from .reconstruction import LeastSquaresReconstruction
from .report import Report
from .zeroshot import ZeroShotEvaluation

#: the pipeline's stages, in the order they run: the CLI's named argument groups (``pruning:``,
#: ``reconstruction:``, ...) that ``main.py`` hands to :class:`hywia_lightning.cli.HywiaCLI`
STAGES = {"pruning": StructuredPruning, "reconstruction": LeastSquaresReconstruction, "perplexity": PerplexityEvaluation,
          "zeroshot": ZeroShotEvaluation, "report": Report, "export": Export}

__all__ = [
    "Evaluation", "Export", "HybridPruning", "LeastSquaresReconstruction", "PerplexityEvaluation", "Preflight", "PruningHooks", "Report",
    "STAGES", "StructuredPruning", "ZeroShotEvaluation", "run_preflight",
]
