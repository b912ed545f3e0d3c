"""Least-squares reconstruction of pruned layers as a Lightning callback.

Runs around :class:`~callbacks.pruning.StructuredPruning`'s slicing, before any strategy wraps the
model: refits ``o_proj`` of every layer that lost heads and ``down_proj`` of every layer that lost
MLP channels (see :mod:`hywia_lightning.reconstruction` for the math).

- ``independent``: every layer sees the dense model's activations; one forward pass over the
  windows, before slicing.
- ``sequential``: layer after layer, each block (attention, then MLP) is calibrated on the inputs
  produced by the already pruned and refit earlier blocks, against the dense block applied to those
  same inputs; it keeps a copy of the dense pruned-range blocks meanwhile and costs two partial
  forward passes per layer.
"""

from __future__ import annotations

import copy
import logging
import time

import torch
from lightning import Callback, LightningModule, Trainer
from torch import nn

from hywia_lightning.calibration import CalibrationData
from hywia_lightning.plan import PruningPlan
from hywia_lightning.progress import Progress, show_info_logs
from hywia_lightning.reconstruction import RefitResult, RefitStatistics, dense_grams, sequential_statistics, solve_refit
from hywia_lightning.slicing import unit_indices
from hywia_lightning.structures import decoder_layers

from .calibration import calibration_for, checked_calibration
from .preflight import Preflight, run_preflight
from .pruning import StructuredPruning
from .pruning_hooks import PruningHooks

log = logging.getLogger(__name__)

MODES = ("independent", "sequential")
# block attribute, its output projection, the plan field whose kept units are that projection's inputs
BLOCKS = (("self_attn", "o_proj", "heads"), ("mlp", "down_proj", "channels"))
KEPT_FIELD = {block: field for block, _, field in BLOCKS}
OUTPUT_PROJECTION = {block: proj for block, proj, _ in BLOCKS}


class LeastSquaresReconstruction(Preflight, PruningHooks, Callback):
    def __init__(self, mode: str = "independent", damping: float = 0.01, calibration: CalibrationData | None = None) -> None:
        """
        Args:
            mode: ``independent`` or ``sequential`` (see the module docstring).
            damping: λ relative to the mean diagonal of ``X Xᵀ``; raised (and logged) where the
                system is not positive definite.
            calibration: windows for the refit (their count is independent of the estimation's);
                ``None`` uses the job's ``data``.
        """
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is unknown; allowed: {', '.join(MODES)}")
        if not damping >= 0:
            raise ValueError(f"damping={damping} must be >= 0 (relative to the mean diagonal of X Xᵀ)")
        self.mode, self.damping, self.calibration = mode, damping, calibration
        self._pending: dict[tuple[int, str], RefitResult] = {}
        self._dense_blocks: dict[int, dict[str, nn.Module]] = {}

    def check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not any(isinstance(c, StructuredPruning) for c in trainer.callbacks):
            raise ValueError("LeastSquaresReconstruction refits pruned layers: add callbacks.StructuredPruning to trainer.callbacks")
        checked_calibration("LeastSquaresReconstruction", self.calibration, trainer, pl_module.tokenizer)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        run_preflight(trainer, pl_module)

    def windows(self, trainer: Trainer) -> torch.Tensor:
        """This rank's share of the windows (the moments are summed over ranks)."""
        return calibration_for("LeastSquaresReconstruction", self.calibration, trainer).windows()[
            trainer.global_rank :: trainer.world_size
        ]

    @staticmethod
    def _sum_over_ranks(trainer: Trainer, tensor: torch.Tensor) -> torch.Tensor:
        return trainer.strategy.reduce(tensor, reduce_op="sum") if trainer.world_size > 1 else tensor

    # -- hooks ----------------------------------------------------------------------------------
    def on_before_slicing(self, trainer: Trainer, pl_module: LightningModule, plan: PruningPlan) -> None:
        show_info_logs()
        layers = decoder_layers(pl_module.model)
        with pl_module.report.stage("reconstruction"):
            if self.mode == "sequential":
                self._dense_blocks = {
                    i: {block: copy.deepcopy(getattr(layers[i], block)) for block, _, field in BLOCKS
                        if getattr(plan.layers[i], field) is not None}
                    for i in plan.layers
                }
                return
            projections = {
                (i, block): getattr(getattr(layers[i], block), proj)
                for i in plan.layers for block, proj, field in BLOCKS if getattr(plan.layers[i], field) is not None
            }
            windows = self.windows(trainer)
            start = time.perf_counter()
            grams, tokens = dense_grams(pl_module.model, projections, windows)
            seconds = time.perf_counter() - start
            log.info("reconstruction: X Xᵀ of %d projections over %d windows in %.1fs (%.2f windows/s)",
                     len(projections), len(windows), seconds, len(windows) / max(seconds, 1e-9))
            tokens = int(self._sum_over_ranks(trainer, torch.tensor(float(tokens))).item())
            progress = Progress("reconstruction: refit", len(projections), unit="projection")
            for (i, block), proj in progress.iterate(projections.items()):
                unit_size = layers[i].self_attn.head_dim if block == "self_attn" else 1
                keep = unit_indices(getattr(plan.layers[i], KEPT_FIELD[block]), unit_size)
                gram = self._sum_over_ranks(trainer, grams.pop((i, block)))
                stats = RefitStatistics.from_dense_gram(gram, keep, tokens)
                sliced = proj.weight[:, keep]
                self._pending[(i, block)] = solve_refit(proj.weight, sliced, stats, self.damping, f"layers.{i}.{block}")

    def on_after_slicing(self, trainer: Trainer, pl_module: LightningModule, plan: PruningPlan) -> None:
        layers = decoder_layers(pl_module.model)
        with pl_module.report.stage("reconstruction"):
            if self.mode == "sequential":
                progress = Progress("reconstruction (sequential)", len(self._dense_blocks), unit="layer")
                for i in sorted(self._dense_blocks):
                    for block, proj, _ in BLOCKS:
                        dense = self._dense_blocks[i].get(block)
                        if dense is None:
                            continue
                        pruned = getattr(layers[i], block)
                        stats = sequential_statistics(pl_module.model, layers[i], pruned, dense, proj, self.windows(trainer))
                        for key in ("target_gram", "cross", "gram"):
                            setattr(stats, key, self._sum_over_ranks(trainer, getattr(stats, key)))
                        stats.tokens = int(self._sum_over_ranks(trainer, torch.tensor(float(stats.tokens))).item())
                        result = solve_refit(getattr(dense, proj).weight, getattr(pruned, proj).weight, stats,
                                             self.damping, f"layers.{i}.{block}")
                        self._assign(getattr(pruned, proj), result)
                        self._pending[(i, block)] = result
                    del self._dense_blocks[i]
                    progress.update()
            else:
                for (i, block), result in self._pending.items():
                    self._assign(getattr(getattr(layers[i], block), OUTPUT_PROJECTION[block]), result)
        self._record(pl_module)

    # -- helpers --------------------------------------------------------------------------------
    @staticmethod
    def _assign(linear: nn.Linear, result: RefitResult) -> None:
        if linear.weight.shape != result.weight.shape:
            raise RuntimeError(f"refit weight {tuple(result.weight.shape)} does not fit {tuple(linear.weight.shape)}")
        with torch.no_grad():
            linear.weight.copy_(result.weight.to(linear.weight.device))

    def _record(self, pl_module: LightningModule) -> None:
        per_layer = {
            f"layers.{i}.{block}": {
                "error_before": r.error_before, "error_after": r.error_after, "condition": r.condition,
                "damping": r.damping, "fallback": r.fallback, "seconds": round(r.seconds, 4),
            }
            for (i, block), r in sorted(self._pending.items())
        }
        errors = [(r.error_before, r.error_after) for r in self._pending.values()]
        pl_module.report.record("reconstruction", {
            "mode": self.mode, "damping": self.damping,
            "mean_error_before": sum(b for b, _ in errors) / max(len(errors), 1),
            "mean_error_after": sum(a for _, a in errors) / max(len(errors), 1),
            "layers": per_layer,
        })
        log.info("reconstruction (%s): mean relative output error %.4f -> %.4f", self.mode,
                 *(sum(x) / max(len(errors), 1) for x in zip(*errors)) if errors else (0.0, 0.0))
        self._pending.clear()
