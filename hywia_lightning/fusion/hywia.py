"""HyWIA: a granularity that fuses several granularities (its ``schemes``) per group.

Every scheme scores every group; the scores are normalized (standardized logs, see
:mod:`hywia_lightning.fusion.attention`) and blended per group with weights chosen by the fusion
``mode`` (:mod:`hywia_lightning.fusion.modes`: ``fixed``, ``heuristic``, ``learned``, ``compensated``,
or your own :class:`~hywia_lightning.fusion.modes.FusionMode`).

It is a :class:`~hywia_lightning.core.granularities.Granularity`, so it goes wherever one can
(``granularity: {class_path: hywia_lightning.HyWIA, ...}``).
"""

from __future__ import annotations

import time
from typing import Literal, Sequence

from ..core.granularities import Granularity, check_scores, make_granularity
from ..core.scoring import Scored, ScoringContext
from ..core.unit_groups import GroupKey, UnitGroup
from .attention import GroupScores, fuse, standardize_across_groups
from .modes import FusionMode, make_fusion_mode


class HyWIA(Granularity):
    def __init__(
        self,
        schemes: list[str | Granularity] = ["element1", "element2", "vector"],
        mode: str | FusionMode = "heuristic",
        normalization: Literal["group", "kind"] = "group",
        seed: int = 0,
    ) -> None:
        """
        Args:
            schemes: granularities to fuse (names or ``class_path`` instances), at least two.
            mode: how each group's blend is chosen: ``heuristic``, ``learned``, ``compensated`` (each
                with its defaults), or a :class:`~hywia_lightning.fusion.modes.FusionMode` by
                ``class_path`` with its own keys (``Fixed`` needs its ``weights``).
            normalization: each scheme's scores become standardized logs within each ``group``,
                or across all groups of a structure ``kind`` (fused scores then keep how layers
                differ, for a global allocation).
            seed: seeds the fusion's initialization and window order (and a ``random`` scheme).
        """
        self.schemes = [make_granularity(s, seed, f"schemes[{i}]") for i, s in enumerate(schemes)]
        names = [s.name for s in self.schemes]
        if len(self.schemes) < 2:
            raise ValueError(f"schemes={names} fuses fewer than two granularities; list at least two")
        if len(set(names)) != len(names):
            raise ValueError(f"schemes={names} lists a granularity twice")
        self.mode = make_fusion_mode(mode)
        self.mode.check_schemes(self.schemes)
        if normalization not in ("group", "kind"):
            raise ValueError(f"normalization={normalization!r} is unknown; allowed: group, kind")
        self.normalization, self.seed = normalization, seed
        self.needs = frozenset().union(*(s.needs for s in self.schemes), self.mode.needs)

    @property
    def name(self) -> str:
        return f"hywia-{self.mode.name}({'+'.join(s.name for s in self.schemes)})"

    def check(self, num_windows: int) -> None:
        self.mode.check(num_windows)

    def scheme_scores(self, groups: Sequence[UnitGroup]) -> dict[GroupKey, GroupScores]:
        """Every scheme's scores of every group, reading each group once (a read may gather its statistics)."""
        scored = {
            g.key: GroupScores.build(g.name, g.kind, g.layer, g.num_layers, [check_scores(s(g), g, s) for s in self.schemes])
            for g in groups
        }
        if self.normalization == "kind":
            standardize_across_groups(list(scored.values()))
        return scored

    def score_groups(self, groups: Sequence[UnitGroup], context: ScoringContext) -> Scored:
        scored = self.scheme_scores(groups)
        start = time.perf_counter()
        weights, extra = self.mode.blend(self.schemes, groups, scored, context, self.seed)
        record = {
            "mode": self.mode.name,
            "schemes": [s.name for s in self.schemes],
            "weights": {fg.name: [round(float(w), 6) for w in weights[i]] for i, fg in enumerate(scored.values())},
            "training": None,
            **extra,
            "seconds": round(time.perf_counter() - start, 3),
        }
        raw = {s.name: {fg.name: fg.raw[i] for fg in scored.values()} for i, s in enumerate(self.schemes)}  # what was blended
        return Scored({key: fuse(weights[i], fg.normalized) for i, (key, fg) in enumerate(scored.items())}, record, raw)
