"""HyWIA pruning, the convenient way: :class:`StructuredPruning` whose granularity is the fused
:class:`~hywia_lightning.HyWIA` scorer, given as a plain ``fusion`` group:

    - class_path: callbacks.HybridPruning
      init_args:
        target_ratio: 0.2
        fusion: {schemes: [element2, fluctuation], mode: heuristic}

is the same job as ``callbacks.StructuredPruning`` with ``granularity: {class_path:
hywia_lightning.HyWIA, init_args: {schemes: ..., mode: ...}}``. Every other key is
:class:`StructuredPruning`'s.
"""

from __future__ import annotations

from hywia_lightning.fusion.hywia import HyWIA

from .pruning import StructuredPruning


class HybridPruning(StructuredPruning):
    def __init__(self, target_ratio: float, fusion: HyWIA | None = None, **kwargs) -> None:
        """
        Args:
            fusion: the HyWIA scorer's keys (``schemes``, ``mode``, ``weights``, ``sharpness``,
                ``training``, ``normalization``); ``None``: its defaults.
            kwargs: :class:`StructuredPruning`'s keys (all but ``granularity``).
        """
        super().__init__(target_ratio, granularity=fusion or HyWIA(), **kwargs)
