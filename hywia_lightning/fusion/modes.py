"""How HyWIA blends its schemes per group: the fusion modes, small strategy classes with their own keys.

- :class:`Fixed`: the same given weights everywhere;
- :class:`Heuristic`: front layers fine-grained, back layers coarse-grained, as the paper observed:
  ``w_s ∝ exp(sharpness · (depth − ½) · g_s)`` with ``g_s`` = −1 for fine, +1 for coarse, 0 otherwise;
- :class:`Learned`: the fusion attention, trained on the calibration windows against the widths the
  plan's allocation gives (:mod:`hywia_lightning.fusion.training`); the last ``holdout`` windows
  stop it early;
- :class:`Compensated`: per group, the blend (on a grid over the simplex, ``grid`` steps per weight)
  whose kept units, at the widths the allocation gives, leave the least output error after the
  least-squares refit (:func:`~hywia_lightning.core.compensation.compensated_error`): the blend is
  judged by the layer the refit will make of it, at a few Cholesky solves per candidate.

In YAML a mode is its name (with its defaults) or a ``class_path`` with its keys::

    mode: compensated
    mode: {class_path: hywia_lightning.fusion.modes.Fixed, init_args: {weights: {wanda: 1, fluctuation: 2}}}

A new mode subclasses :class:`FusionMode` and implements :meth:`FusionMode.blend`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Literal, Sequence

import torch
from jsonargparse.typing import PositiveInt
from torch import Tensor

from ..core.compensation import compensated_error, damped
from ..core.plan import kept_output_columns
from ..core.scoring import ScoringContext
from ..core.unit_groups import GroupKey, UnitGroup
from .attention import FusionAttention, GroupScores, fuse

if TYPE_CHECKING:
    from ..core.granularities import Granularity

GRAIN_SIGN = {"fine": -1.0, "coarse": 1.0, None: 0.0}


class FusionMode(ABC):
    """Chooses each group's blend weights over the fused schemes."""

    #: statistics the mode reads besides its schemes' own
    needs: frozenset[str] = frozenset()
    #: whether the mode trains on the calibration windows (the memory plan counts a training pass)
    trains: bool = False

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    def check_schemes(self, schemes: Sequence["Granularity"]) -> None:
        """Refuse keys that do not fit the fused schemes (when the fusion is built)."""

    def check(self, num_windows: int) -> None:
        """Refuse what ``num_windows`` calibration windows cannot serve (before any heavy work)."""

    @abstractmethod
    def blend(self, schemes: Sequence["Granularity"], groups: Sequence[UnitGroup], scored: dict[GroupKey, GroupScores],
              context: ScoringContext, seed: int) -> tuple[Tensor, dict]:
        """The weights (groups × schemes, in ``scored``'s order) and what the report records of how
        they were chosen (merged into the fusion's record)."""


class Fixed(FusionMode):
    def __init__(self, weights: dict[str, float]) -> None:
        """
        Args:
            weights: one non-negative weight per scheme name (normalized to sum 1).
        """
        self.weights = dict(weights)

    def check_schemes(self, schemes: Sequence["Granularity"]) -> None:
        names = [s.name for s in schemes]
        w = self.weights
        if set(w) != set(names) or any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
            raise ValueError(f"mode fixed needs weights: one non-negative weight for each of {names}; got {w}")

    def blend(self, schemes, groups, scored, context, seed):
        w = torch.tensor([float(self.weights[s.name]) for s in schemes], dtype=torch.float64)
        return (w / w.sum()).expand(len(scored), -1).clone(), {}


class Heuristic(FusionMode):
    def __init__(self, sharpness: float = 4.0) -> None:
        """
        Args:
            sharpness: how fast the blend moves from fine to coarse with depth.
        """
        self.sharpness = sharpness

    def blend(self, schemes, groups, scored, context, seed):
        signs = torch.tensor([GRAIN_SIGN[s.grain] for s in schemes], dtype=torch.float64)
        depth = torch.tensor([g.depth for g in scored.values()], dtype=torch.float64)
        return (self.sharpness * (depth[:, None] - 0.5) * signs[None, :]).softmax(-1), {}


class Learned(FusionMode):
    trains = True

    def __init__(self, epochs: PositiveInt = 6, lr: float = 0.02, patience: PositiveInt = 2, holdout: PositiveInt = 8,
                 temperatures: tuple[float, float] = (1.0, 0.05), width: PositiveInt = 16,
                 objective: Literal["lm", "kl"] = "lm") -> None:
        """
        Args:
            epochs: passes over the training windows (at most; early stopping may end sooner).
            lr: Adam learning rate of the fusion attention.
            patience: epochs without a better held-out loss before training stops.
            holdout: calibration windows held out for early stopping (the last ones).
            temperatures: soft-mask temperature at the first and the last epoch (annealed geometrically).
            width: width of the attention's queries and keys.
            objective: what the masked model is trained against: ``lm``, the calibration windows'
                next tokens, or ``kl``, the unmasked (dense) model's next-token distributions.
        """
        if not (len(temperatures) == 2 and all(t > 0 for t in temperatures)):
            raise ValueError(f"temperatures={temperatures} must be two positive numbers (start, end)")
        if objective not in ("lm", "kl"):
            raise ValueError(f"objective={objective!r} is unknown; allowed: lm, kl")
        self.objective = objective
        self.epochs, self.lr, self.patience, self.holdout = epochs, lr, patience, holdout
        self.temperatures, self.width = tuple(temperatures), width

    def check(self, num_windows: int) -> None:
        if not 0 < self.holdout < num_windows:
            raise ValueError(f"holdout={self.holdout} must leave windows for both training and early stopping: "
                             f"allowed 1..{num_windows - 1} with {num_windows} calibration windows")

    def blend(self, schemes, groups, scored, context, seed):
        """Train the fusion attention against the widths the allocation gives the uniform blend."""
        from .training import FusionTraining, mask_targets  # Lightning: not for the memory plan, which reads needs

        keys, fused = list(scored), list(scored.values())
        uniform = torch.full((len(schemes),), 1 / len(schemes), dtype=torch.float64)
        widths = context.widths({key: fuse(uniform, s.normalized) for key, s in scored.items()})
        train, held_out = context.windows[:-self.holdout], context.windows[-self.holdout:]
        torch.manual_seed(seed)
        module = FusionTraining(context.model, FusionAttention(len(schemes), self.width), fused,
                                mask_targets(context, keys, widths), self.lr, self.temperatures, self.objective)
        initial = module.weights()
        module.fit(train, held_out, self.epochs, self.patience, seed, context.loop)
        weights = module.weights().double()
        return weights, {"training": {
            "objective": self.objective,
            "epochs_run": len(module.val_history),
            "train_loss_per_epoch": [round(v, 5) for v in module.train_history],
            "held_out_loss_per_epoch": [round(v, 5) for v in module.val_history],
            "best_held_out_loss": module.best_val_loss,
            "weights_moved": float((weights - initial.double()).abs().max()),
        }}


class Compensated(FusionMode):
    # the error after the refit needs each output projection's input covariance
    needs = frozenset({"input_moments", "output_gram"})

    def __init__(self, grid: PositiveInt = 4, damping: float = 0.01) -> None:
        """
        Args:
            grid: each weight is a multiple of ``1 / grid``.
            damping: the refit's damping relative to the mean feature variance (as
                :class:`~hywia_lightning.core.granularities.OBS`'s).
        """
        if not damping > 0:
            raise ValueError(f"damping={damping} must be positive (it keeps the refit's system invertible)")
        self.grid, self.damping = grid, damping

    def blend(self, schemes, groups, scored, context, seed):
        """Per group, the grid blend with the least error after the refit, at the widths the
        allocation gives the uniform blend (each group is read a second time, for its covariance)."""
        candidates = simplex_grid(len(schemes), self.grid)  # the uniform blend first
        widths = context.widths({key: fuse(candidates[0], s.normalized) for key, s in scored.items()})
        by_layer = {s.layer: s for s in context.layers}
        chosen, errors = {}, {}
        for group in groups:
            fg = scored[group.key]
            if group.output_covariance is None:
                raise ValueError(f"mode compensated needs output_gram statistics, but {group.name} has none")
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
        return torch.stack([chosen[key] for key in scored]), {"refit_error": errors}


FUSION_MODES: dict[str, type[FusionMode]] = {
    "fixed": Fixed, "heuristic": Heuristic, "learned": Learned, "compensated": Compensated,
}


def make_fusion_mode(spec: str | FusionMode) -> FusionMode:
    """A mode by its name (its defaults), or the given instance."""
    if isinstance(spec, FusionMode):
        return spec
    if spec not in FUSION_MODES:
        raise ValueError(f"mode={spec!r} is unknown; allowed: {', '.join(FUSION_MODES)}, or a FusionMode by class_path")
    if spec == "fixed":
        raise ValueError("mode='fixed' needs its weights: mode: {class_path: hywia_lightning.fusion.modes.Fixed, "
                         "init_args: {weights: {<scheme>: <weight>, ...}}}")
    return FUSION_MODES[spec]()


def simplex_grid(schemes: int, steps: int) -> list[Tensor]:
    """Every weight vector with entries in ``{0, 1/steps, ..., 1}`` summing to 1, the uniform blend first."""
    points = [torch.tensor(c, dtype=torch.float64) / steps for c in _compositions(schemes, steps)]
    uniform = torch.full((schemes,), 1 / schemes, dtype=torch.float64)
    return [uniform] + [p for p in points if not torch.allclose(p, uniform)]


def _compositions(parts: int, total: int) -> list[tuple[int, ...]]:
    if parts == 1:
        return [(total,)]
    return [(first, *rest) for first in range(total, -1, -1) for rest in _compositions(parts - 1, total - first)]
