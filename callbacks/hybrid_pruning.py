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

from typing import Any

from hywia_lightning.core.granularities import GRANULARITIES, unknown_granularity
from hywia_lightning.fusion.hywia import HyWIA
from hywia_lightning.input_errors import InputError, did_you_mean

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

    @staticmethod
    def check_arguments(init_args: dict[str, Any], key: str) -> None:
        """The fusion's granularity names, before any class is built (the CLI loads the model first)."""
        fusion = init_args.get("fusion")
        fusion = fusion.get("init_args") or fusion if hasattr(fusion, "get") else None
        for i, scheme in enumerate((fusion.get("schemes") if fusion is not None else None) or []):
            if isinstance(scheme, str) and scheme not in GRANULARITIES:
                setting = f"{key.removesuffix('.init_args')}.init_args.fusion.schemes[{i}]"
                raise InputError(setting, unknown_granularity(scheme),
                                 did_you_mean(scheme, GRANULARITIES) or f"change {setting} in the YAML")
