"""HyWIA as a scorer: several granularities fused per group.

Every scheme scores every group; the scores are normalized (standardized logs, see
:mod:`hywia_lightning.fusion.attention`) and blended per group with weights chosen by ``mode``:

- ``fixed``: the same given weights everywhere;
- ``heuristic``: front layers fine-grained, back layers coarse-grained, as the paper observed:
  ``w_s ∝ exp(sharpness · (depth − ½) · g_s)`` with ``g_s`` = −1 for fine, +1 for coarse, 0 otherwise;
- ``learned``: the fusion attention, trained on the calibration windows against the widths the
  plan's allocation gives (:mod:`hywia_lightning.fusion.training`); the last ``holdout`` windows
  stop it early;
- ``compensated``: per group, the blend (on a grid over the simplex, ``grid`` steps per weight)
  whose kept units, at the widths the allocation gives, leave the least output error after the
  least-squares refit (:func:`~hywia_lightning.core.compensation.compensated_error`): the blend is
  judged by the layer the refit will make of it, at a few Cholesky solves per candidate; each
  group's chosen and uniform errors go to the report.

It is a :class:`~hywia_lightning.core.granularities.Granularity`, so it goes wherever one can
(``granularity: {class_path: hywia_lightning.HyWIA, ...}``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from jsonargparse.typing import PositiveInt
from torch import Tensor

from ..core.compensation import compensated_error, damped
from ..core.granularities import Granularity, check_scores, make_granularity
from ..core.plan import kept_output_columns
from ..core.scoring import Scored, ScoringContext
from ..core.unit_groups import GroupKey, UnitGroup
from .attention import FusionAttention, GroupScores, fuse, standardize_across_groups

FusionMode = Literal["fixed", "heuristic", "learned", "compensated"]
FUSION_MODES = ("fixed", "heuristic", "learned", "compensated")
GRAIN_SIGN = {"fine": -1.0, "coarse": 1.0, None: 0.0}
# what a mode reads besides its schemes' statistics: the error after the refit needs each output
# projection's input covariance
MODE_NEEDS = {"compensated": frozenset({"input_moments", "output_gram"})}


@dataclass
class FusionTrainingArgs:
    """How the ``learned`` fusion trains."""

    epochs: PositiveInt = 6
    """Passes over the training windows (at most; early stopping may end sooner)."""
    lr: float = 0.02
    """Adam learning rate of the fusion attention."""
    patience: PositiveInt = 2
    """Epochs without a better held-out loss before training stops."""
    holdout: PositiveInt = 8
    """Calibration windows held out for early stopping (the last ones)."""
    temperatures: tuple[float, float] = (1.0, 0.05)
    """Soft-mask temperature at the first and the last epoch (annealed geometrically)."""
    width: PositiveInt = 16
    """Width of the attention's queries and keys."""

    def __post_init__(self) -> None:
        if not (len(self.temperatures) == 2 and all(t > 0 for t in self.temperatures)):
            raise ValueError(f"training.temperatures={self.temperatures} must be two positive numbers (start, end)")
        self.temperatures = tuple(self.temperatures)


class HyWIA(Granularity):
    def __init__(
        self,
        schemes: list[str | Granularity] = ["element1", "element2", "vector"],
        mode: FusionMode = "heuristic",
        weights: dict[str, float] | None = None,
        sharpness: float = 4.0,
        training: FusionTrainingArgs | None = None,
        normalization: Literal["group", "kind"] = "group",
        seed: int = 0,
        grid: PositiveInt = 4,
        damping: float = 0.01,
    ) -> None:
        """
        Args:
            schemes: granularities to fuse (names or ``class_path`` instances), at least two.
            mode: ``fixed``, ``heuristic`` or ``learned``.
            weights: ``fixed`` mode: one weight per scheme name (normalized to sum 1).
            sharpness: ``heuristic`` mode: how fast the blend moves from fine to coarse with depth.
            training: ``learned`` mode: how the fusion attention trains.
            normalization: each scheme's scores become standardized logs within each ``group``,
                or across all groups of a structure ``kind`` (fused scores then keep how layers
                differ, for a global allocation).
            seed: seeds the fusion's initialization and window order (and a ``random`` scheme).
            grid: ``compensated`` mode: each weight is a multiple of ``1 / grid``.
            damping: ``compensated`` mode: the refit's damping relative to the mean feature variance
                (as :class:`~hywia_lightning.core.granularities.OBS`'s).
        """
        if mode not in FUSION_MODES:
            raise ValueError(f"mode={mode!r} is unknown; allowed: {', '.join(FUSION_MODES)}")
        self.schemes = [make_granularity(s, seed, f"schemes[{i}]") for i, s in enumerate(schemes)]
        names = [s.name for s in self.schemes]
        if len(self.schemes) < 2:
            raise ValueError(f"schemes={names} fuses fewer than two granularities; list at least two")
        if len(set(names)) != len(names):
            raise ValueError(f"schemes={names} lists a granularity twice")
        if mode == "fixed":
            if not weights or set(weights) != set(names) or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
                raise ValueError(f"mode='fixed' needs weights: one non-negative weight for each of {names}; got {weights}")
        self.mode, self.fixed_weights, self.sharpness = mode, weights, sharpness
        if normalization not in ("group", "kind"):
            raise ValueError(f"normalization={normalization!r} is unknown; allowed: group, kind")
        self.training, self.normalization = training or FusionTrainingArgs(), normalization
        if not damping > 0:
            raise ValueError(f"damping={damping} must be positive (it keeps the refit's system invertible)")
        self.seed, self.grid, self.damping = seed, grid, damping
        self.needs = frozenset().union(*(s.needs for s in self.schemes), MODE_NEEDS.get(mode, ()))

    @property
    def name(self) -> str:
        return f"hywia-{self.mode}({'+'.join(s.name for s in self.schemes)})"

    def check(self, num_windows: int) -> None:
        """Refuse a holdout that leaves nothing to train or to stop on (before any heavy work)."""
        if self.mode == "learned" and not 0 < self.training.holdout < num_windows:
            raise ValueError(
                f"holdout={self.training.holdout} must leave windows for both training and early stopping: "
                f"allowed 1..{num_windows - 1} with {num_windows} calibration windows"
            )

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
        keys, fused_groups = list(scored), list(scored.values())
        start = time.perf_counter()
        extra: dict = {"training": None}
        if self.mode == "learned":
            weights, extra["training"] = self.learn_weights(keys, fused_groups, context)
        elif self.mode == "compensated":
            weights, extra["refit_error"] = self.compensated_weights(groups, scored, context)
        else:
            weights = self.rule_weights(fused_groups)
        record = {
            "mode": self.mode,
            "schemes": [s.name for s in self.schemes],
            "weights": {fg.name: [round(float(w), 6) for w in weights[i]] for i, fg in enumerate(fused_groups)},
            **extra,
            "seconds": round(time.perf_counter() - start, 3),
        }
        raw = {s.name: {fg.name: fg.raw[i] for fg in fused_groups} for i, s in enumerate(self.schemes)}  # what was blended
        return Scored({key: fuse(weights[i], fg.normalized) for i, (key, fg) in enumerate(scored.items())}, record, raw)

    def rule_weights(self, groups: list[GroupScores]) -> Tensor:
        """``fixed`` and ``heuristic`` blends, G × S."""
        if self.mode == "fixed":
            w = torch.tensor([float(self.fixed_weights[s.name]) for s in self.schemes], dtype=torch.float64)
            return (w / w.sum()).expand(len(groups), -1).clone()
        signs = torch.tensor([GRAIN_SIGN[s.grain] for s in self.schemes], dtype=torch.float64)
        depth = torch.tensor([g.depth for g in groups], dtype=torch.float64)
        return (self.sharpness * (depth[:, None] - 0.5) * signs[None, :]).softmax(-1)

    def learn_weights(
        self, keys: list[GroupKey], scored: list[GroupScores], context: ScoringContext
    ) -> tuple[Tensor, dict]:
        """Train the fusion attention against the widths the allocation gives the uniform blend."""
        uniform = torch.full((len(self.schemes),), 1 / len(self.schemes), dtype=torch.float64)
        widths = context.widths({key: fuse(uniform, s.normalized) for key, s in zip(keys, scored)})
        holdout = self.training.holdout
        train, held_out = context.windows[:-holdout], context.windows[-holdout:]
        torch.manual_seed(self.seed)
        from .training import FusionTraining, mask_targets  # Lightning: not for the memory plan, which reads needs

        module = FusionTraining(
            context.model, FusionAttention(len(self.schemes), self.training.width), scored,
            mask_targets(context, keys, widths), self.training.lr, self.training.temperatures,
        )
        initial = module.weights()
        module.fit(train, held_out, self.training.epochs, self.training.patience, self.seed, context.loop)
        weights = module.weights().double()
        return weights, {
            "epochs_run": len(module.val_history),
            "train_loss_per_epoch": [round(v, 5) for v in module.train_history],
            "held_out_loss_per_epoch": [round(v, 5) for v in module.val_history],
            "best_held_out_loss": module.best_val_loss,
            "weights_moved": float((weights - initial.double()).abs().max()),
        }

    def compensated_weights(
        self, groups: Sequence[UnitGroup], scored: dict[GroupKey, GroupScores], context: ScoringContext
    ) -> tuple[Tensor, dict]:
        """Per group, the grid blend with the least error after the refit, at the widths the
        allocation gives the uniform blend (each group is read a second time, for its covariance)."""
        candidates = simplex_grid(len(self.schemes), self.grid)  # the uniform blend first
        widths = context.widths({key: fuse(candidates[0], s.normalized) for key, s in scored.items()})
        by_layer = {s.layer: s for s in context.layers}
        chosen, errors = {}, {}
        for group in groups:
            fg = scored[group.key]
            if group.output_covariance is None:
                raise ValueError(f"mode='compensated' needs output_gram statistics, but {group.name} has none")
            n = group.output_covariance.shape[0]
            weight_t = group.weights[group.output_member].reshape(n, -1)  # [in, out]: Wᵀ
            h = damped(group.output_covariance, self.damping)
            error_of: dict[tuple[int, ...], float] = {}  # candidates that keep the same units cost one solve
            costs = []
            for candidate in candidates:
                keep = tuple(kept_output_columns(group.key, fuse(candidate, fg.normalized), by_layer[group.layer],
                                                 widths[group.layer], context.scope.attention_unit))
                if keep not in error_of:
                    error_of[keep] = compensated_error(weight_t, h, list(keep))
                costs.append(error_of[keep])
            best = min(range(len(candidates)), key=lambda i: (costs[i], i))  # ties: the earlier candidate
            chosen[group.key] = candidates[best]
            errors[fg.name] = {"chosen": float(f"{costs[best]:.6g}"), "uniform": float(f"{costs[0]:.6g}")}
        return torch.stack([chosen[key] for key in scored]), errors


def simplex_grid(schemes: int, steps: int) -> list[Tensor]:
    """Every weight vector with entries in ``{0, 1/steps, ..., 1}`` summing to 1, the uniform blend first."""
    points = [torch.tensor(c, dtype=torch.float64) / steps for c in _compositions(schemes, steps)]
    uniform = torch.full((schemes,), 1 / schemes, dtype=torch.float64)
    return [uniform] + [p for p in points if not torch.allclose(p, uniform)]


def _compositions(parts: int, total: int) -> list[tuple[int, ...]]:
    if parts == 1:
        return [(total,)]
    return [(first, *rest) for first in range(total, -1, -1) for rest in _compositions(parts - 1, total - first)]
