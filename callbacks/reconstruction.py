"""Least-squares reconstruction of pruned layers as a Lightning callback.

A thin adapter over :mod:`hywia_lightning.reconstruction.modes`: it runs the mode's hooks around
:class:`~callbacks.pruning.StructuredPruning`'s slicing (before any strategy wraps the model), on
this rank's share of the windows with moments summed over ranks, and records the report.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from jsonargparse.typing import PositiveInt
from lightning import Callback, LightningModule, Trainer
from typing_extensions import override

from hywia_lightning.core.distillation import DistillationSet
from hywia_lightning.core.plan import PruningPlan
from hywia_lightning.data.calibration import CalibrationData
from hywia_lightning.progress import show_info_logs
from hywia_lightning.reconstruction.least_squares import check_refit_settings
from hywia_lightning.reconstruction.modes import reconstruction_mode

from .calibration import calibration_for, checked_calibration
from .preflight import Preflight, run_preflight
from .pruning import StructuredPruning
from .pruning_hooks import PruningHooks

log = logging.getLogger(__name__)


class LeastSquaresReconstruction(Preflight, PruningHooks, Callback):
    def __init__(
        self, mode: str = "independent", damping: float | list[float] = 0.01,
        intercept: bool = False, prior: Literal["zero", "original"] = "zero", batch_size: PositiveInt = 1,
        calibration: CalibrationData | None = None, folds: PositiveInt = 4,
        choose_by: Literal["heldout_error", "kl"] = "heldout_error", kl_windows: PositiveInt = 8,
    ) -> None:
        """
        Args:
            mode: ``independent``, ``sequential`` (see :mod:`hywia_lightning.reconstruction.modes`),
                or the import path of a ``ReconstructionMode`` subclass (``my_package.MyMode``), which
                gets this stage's other keys.
            damping: λ relative to the mean diagonal of ``X Xᵀ``; raised (and logged) where the
                system is not positive definite. A list: candidates, one chosen per structure by
                held-out windows (``sequential`` mode; see :func:`hywia_lightning.reconstruction.least_squares.choose_damping`).
            intercept: also fit a bias of each refit projection (FLAP's bias compensation as a
                special case); the export carries it.
            prior: what the damping pulls the refit toward: ``zero`` (ridge) or ``original``, the
                pruned layer's own weights (a large damping then refits only the bias).
            batch_size: calibration windows per call of a layer (the refit is the same for any
                value; larger runs faster on small models and holds that many windows' activations
                of one layer).
            calibration: windows for the refit (their count is independent of the estimation's);
                ``None`` uses the job's ``data``.
            folds: with a list of dampings, the windows' folds (window ``i`` in fold ``i % folds``):
                each candidate is solved without one fold and judged on it.
            choose_by: what chooses among a list of dampings: ``heldout_error`` (the output error on
                the left-out folds) or ``kl``, the pruned model's KL to the dense model on the first
                ``kl_windows`` of the pruning stage's held-out ``distillation`` windows, with the
                layers not refit yet dense (``sequential`` mode; the windows are split over ranks).
            kl_windows: the distillation windows ``choose_by: kl`` judges on; the report's KL on the
                others is one no choice was made on.
        """
        if choose_by == "kl" and not isinstance(damping, list):
            raise ValueError(f"reconstruction.choose_by=kl chooses among candidate dampings: give damping a list "
                             f"(e.g. [0.01, 0.1, 1.0]), not {damping!r}, or choose_by: heldout_error")
        strategy = reconstruction_mode(mode)
        if choose_by == "kl" and not strategy.judges_by_kl:
            raise ValueError(f"reconstruction.choose_by=kl: mode={mode!r} does not judge its refit by the KL to the "
                             "dense model; use mode: sequential, or choose_by: heldout_error")
        check_refit_settings(damping, prior, folds)
        self.mode, self.damping, self.intercept, self.calibration = mode, damping, intercept, calibration
        self.batch_size, self.prior, self.folds = batch_size, prior, folds
        self.choose_by, self.kl_windows = choose_by, kl_windows
        self.strategy = strategy(damping, intercept, batch_size, prior, folds)

    def check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pruning = [c for c in trainer.callbacks if isinstance(c, StructuredPruning)]
        if not pruning:
            raise ValueError("LeastSquaresReconstruction refits pruned layers: add callbacks.StructuredPruning to trainer.callbacks")
        if all(c.plan is not None for c in pruning):
            return  # resumed from a checkpoint: the refit weights are in it, no window is needed
        if self.choose_by == "kl":
            self.check_kl_judge(pruning)
        windows = calibration_for("LeastSquaresReconstruction", self.calibration, trainer).num_windows
        if isinstance(self.damping, list) and windows < self.folds:
            raise ValueError(f"reconstruction.folds={self.folds} folds of {windows} calibration windows leave a "
                             f"fold empty: lower folds to at most {windows} or give more windows")
        checked_calibration("LeastSquaresReconstruction", self.calibration, trainer, pl_module)

    def check_kl_judge(self, pruning: list[StructuredPruning]) -> None:
        distillation = [c.distillation for c in pruning]
        if any(d is None for d in distillation):
            raise ValueError("reconstruction.choose_by=kl judges the refit by the KL to the dense model on the pruning "
                             "stage's held-out windows: set pruning.init_args.distillation (e.g. {windows: 32}), or "
                             "choose_by: heldout_error")
        if any(self.kl_windows > d.windows for d in distillation):
            raise ValueError(f"reconstruction.kl_windows={self.kl_windows} is more than the pruning stage's "
                             f"distillation.windows={min(d.windows for d in distillation)}: lower it or add windows")
        if any(c.shard_weights for c in pruning):
            raise ValueError("reconstruction.choose_by=kl runs the judge windows on whole layers; with "
                             "pruning.shard_weights: true use choose_by: heldout_error")

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        run_preflight(trainer, pl_module)

    def windows(self, trainer: Trainer) -> torch.Tensor:
        """This rank's share of the windows (the moments are summed over ranks)."""
        return calibration_for("LeastSquaresReconstruction", self.calibration, trainer).windows()[
            trainer.global_rank :: trainer.world_size
        ]

    @staticmethod
    def window_ids(trainer: Trainer, windows: torch.Tensor) -> torch.Tensor:
        """The ids of this rank's share among every rank's windows: the folds are the same on any number of ranks."""
        return torch.arange(len(windows)) * trainer.world_size + trainer.global_rank

    @staticmethod
    def reduce(trainer: Trainer):
        if trainer.world_size == 1:
            return lambda tensor: tensor
        return lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum")

    def on_before_slicing(self, trainer: Trainer, pl_module: LightningModule, plan: PruningPlan) -> None:
        show_info_logs()
        with pl_module.report.stage("reconstruction"):
            self.strategy.before_slicing(pl_module.model, plan, self.windows(trainer), self.reduce(trainer))

    def prepare_pruned_layer(self, trainer, pl_module, plan, index, layer) -> None:
        with pl_module.report.stage("reconstruction"):
            self.strategy.prepare_layer(plan, index, layer)

    def take_judge(self, trainer: Trainer) -> DistillationSet | None:
        """This rank's share of the windows ``choose_by: kl`` judges on (the pruning stage's first
        ones), marked as judged there: the report's unseen KL leaves them out."""
        if self.choose_by != "kl":
            return None
        pruning = next(c for c in trainer.callbacks if isinstance(c, StructuredPruning))
        pruning.mark_judged(self.kl_windows)
        return pruning.distillation_targets[: self.kl_windows][trainer.global_rank :: trainer.world_size]

    def on_after_slicing(self, trainer: Trainer, pl_module: LightningModule, plan: PruningPlan) -> None:
        self.strategy.judge = self.take_judge(trainer)
        with pl_module.report.stage("reconstruction"):
            windows = self.windows(trainer)
            results = self.strategy.after_slicing(pl_module.model, plan, windows, self.reduce(trainer),
                                                  self.window_ids(trainer, windows))
        self.strategy.judge = None  # the pruning stage's targets: not kept past the refit
        errors = [(r.error_before, r.error_after) for r in results.values()]
        mean_before, mean_after = (sum(x) / len(errors) for x in zip(*errors)) if errors else (0.0, 0.0)
        pl_module.report.record("reconstruction", {
            "mode": self.mode, "damping": self.damping, "intercept": self.intercept, "prior": self.prior,
            **({"folds": self.folds} if isinstance(self.damping, list) and self.choose_by != "kl" else {}),
            **({"choose_by": "kl", "kl_windows": self.kl_windows} if self.choose_by == "kl" else {}),
            "mean_error_before": mean_before, "mean_error_after": mean_after,
            "layers": {
                str(key): {"error_before": r.error_before, "error_after": r.error_after, "condition": r.condition,
                           "damping": r.damping, "fallback": r.fallback, "seconds": round(r.seconds, 4),
                           **({"heldout_error": {str(d): e for d, e in r.heldout.items()}} if r.heldout else {}),
                           **({"kl": {str(d): e for d, e in r.judged_kl.items()}} if r.judged_kl else {})}
                for key, r in sorted(results.items())
            },
        })
        log.info("reconstruction (%s): mean relative output error %.4f -> %.4f", self.mode, mean_before, mean_after)
