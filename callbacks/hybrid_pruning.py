"""HyWIA: structured pruning with hybrid-grained importance fused per layer.

Every scheme (Element¹, Element², Vector and any :class:`~hywia_lightning.Granularity` named by
``class_path``) scores every group; the scores are normalized (standardized logs) and blended per
group with weights chosen by ``mode``:

- ``fixed``: the same given weights everywhere;
- ``heuristic``: front layers fine-grained, back layers coarse-grained, as the paper observed:
  ``w_s ∝ exp(sharpness · (depth − ½) · g_s)`` with ``g_s`` = −1 for fine, +1 for coarse, 0 otherwise;
- ``learned``: the fusion attention, trained with its own Trainer on the calibration windows
  (see :mod:`hywia_lightning.fusion_training`); the last ``holdout`` windows stop it early.

The blend weights of every layer go into the report (and a plot next to the export).
"""

from __future__ import annotations

import logging
import time

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from hywia_lightning.calibration import CalibrationData
from hywia_lightning.estimation import Statistics
from hywia_lightning.fusion import FusionAttention, GroupScores, fuse
from hywia_lightning.fusion_training import FusionTraining, MaskTarget
from hywia_lightning.granularities import Granularity, check_scores, make_granularity
from hywia_lightning.importance_summary import importance_summary
from hywia_lightning.plan import count_parameters
from hywia_lightning.structures import LayerStructures, decoder_layers
from hywia_lightning.unit_groups import effective_attention_unit

from .pruning import StructuredPruning

log = logging.getLogger(__name__)

FUSION_MODES = ("fixed", "heuristic", "learned")
GRAIN_SIGN = {"fine": -1.0, "coarse": 1.0, None: 0.0}


class HybridPruning(StructuredPruning):
    def __init__(
        self,
        target_ratio: float,
        schemes: list[str | Granularity] = ["element1", "element2", "vector"],
        mode: str = "learned",
        weights: dict[str, float] | None = None,
        sharpness: float = 4.0,
        epochs: int = 6,
        lr: float = 0.02,
        patience: int = 2,
        holdout: int = 8,
        temperatures: tuple[float, float] = (1.0, 0.05),
        width: int = 16,
        calibration: CalibrationData | None = None,
        layer_start: int = 0,
        layer_end: int | None = None,
        attention_unit: str = "query_heads",
        heads_to_keep: int | None = None,
        round_to: int = 1,
        seed: int = 0,
        accumulate_dtype: str = "float32",
        estimation_batch_size: int = 1,
    ) -> None:
        """
        Args:
            schemes: granularities to fuse (names or ``class_path`` instances), at least two.
            mode: ``fixed``, ``heuristic`` or ``learned``.
            weights: ``fixed`` mode: one weight per scheme name (normalized to sum 1).
            sharpness: ``heuristic`` mode: how fast the blend moves from fine to coarse with depth.
            epochs, lr, patience, holdout, temperatures, width: ``learned`` mode: fusion training
                epochs, Adam learning rate, early-stopping patience (epochs), calibration windows
                held out for early stopping, soft-mask temperature from start to end, attention width.
            Other arguments: as :class:`StructuredPruning`.
        """
        super().__init__(target_ratio, calibration, "element1", layer_start, layer_end, attention_unit,
                         heads_to_keep, round_to, seed, accumulate_dtype=accumulate_dtype,
                         estimation_batch_size=estimation_batch_size)
        if mode not in FUSION_MODES:
            raise ValueError(f"mode={mode!r} is unknown; allowed: {', '.join(FUSION_MODES)}")
        self.schemes = [make_granularity(s, seed) for s in schemes]
        names = [s.name for s in self.schemes]
        if len(self.schemes) < 2:
            raise ValueError(f"schemes={names} fuses fewer than two granularities; list at least two")
        if len(set(names)) != len(names):
            raise ValueError(f"schemes={names} lists a granularity twice")
        if mode == "fixed":
            if not weights or set(weights) != set(names) or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
                raise ValueError(f"mode='fixed' needs weights: one non-negative weight for each of {names}; got {weights}")
        for key, value in (("epochs", epochs), ("patience", patience), ("width", width)):
            if value < 1:
                raise ValueError(f"{key}={value} must be at least 1")
        if not (len(temperatures) == 2 and all(t > 0 for t in temperatures)):
            raise ValueError(f"temperatures={temperatures} must be two positive numbers (start, end)")
        self.mode, self.fixed_weights, self.sharpness = mode, weights, sharpness
        self.epochs, self.lr, self.patience, self.holdout = epochs, lr, patience, holdout
        self.temperatures, self.width, self.seed = tuple(temperatures), width, seed

    @property
    def needs_statistics(self) -> bool:
        return any(s.needs_statistics for s in self.schemes)

    @property
    def method(self) -> str:
        return f"hywia-{self.mode}({'+'.join(s.name for s in self.schemes)})"

    def check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().check(trainer, pl_module)
        if self.plan is None and self.mode == "learned":
            windows = self.calibration_data(trainer).num_windows
            if not 0 < self.holdout < windows:
                raise ValueError(
                    f"holdout={self.holdout} must leave windows for both training and early stopping: "
                    f"allowed 1..{windows - 1} with {windows} calibration windows"
                )

    # -- scoring --------------------------------------------------------------------------------
    def score(
        self, trainer: Trainer, pl_module: LightningModule, layers: list[LayerStructures], statistics: Statistics | None
    ) -> dict[str, Tensor]:
        num_layers = pl_module.model.config.num_hidden_layers
        unit_groups = self.unit_groups(layers, statistics, num_layers)
        groups = [
            GroupScores.build(g.name, g.kind, g.layer, num_layers, [check_scores(s(g), g, s) for s in self.schemes])
            for g in unit_groups
        ]
        pl_module.report.record("importance", importance_summary(
            {s.name: {g.name: g.raw[i] for g in groups} for i, s in enumerate(self.schemes)}
        ))
        start = time.perf_counter()
        if self.mode == "learned":
            weights, training = self.learn_weights(trainer, pl_module, layers, groups)
        else:
            weights, training = self.rule_weights(groups), None
        weights = trainer.strategy.broadcast(weights, src=0)
        pl_module.report.record("fusion", {
            "mode": self.mode,
            "schemes": [s.name for s in self.schemes],
            "weights": {g.name: [round(float(w), 6) for w in weights[i]] for i, g in enumerate(groups)},
            "training": training,
            "seconds": round(time.perf_counter() - start, 3),
        })
        return {g.name: fuse(weights[i], g.normalized) for i, g in enumerate(groups)}

    def rule_weights(self, groups: list[GroupScores]) -> Tensor:
        """``fixed`` and ``heuristic`` blends, G × S."""
        if self.mode == "fixed":
            w = torch.tensor([float(self.fixed_weights[s.name]) for s in self.schemes], dtype=torch.float64)
            return (w / w.sum()).expand(len(groups), -1).clone()
        signs = torch.tensor([GRAIN_SIGN[s.grain] for s in self.schemes], dtype=torch.float64)
        depth = torch.tensor([g.depth for g in groups], dtype=torch.float64)
        return (self.sharpness * (depth[:, None] - 0.5) * signs[None, :]).softmax(-1)

    def mask_targets(self, pl_module: LightningModule, layers: list[LayerStructures], groups: list[GroupScores]) -> list[MaskTarget]:
        """Where each group's soft mask acts, and how many units it keeps."""
        widths = self.widths(layers, count_parameters(pl_module.model))
        by_layer = {s.layer: s for s in layers}
        targets = []
        for g in groups:
            index = int(g.name.split(".")[1])
            s, w = by_layer[index], widths[index]
            if g.kind == "mlp":
                targets.append(MaskTarget(s.mlp.down_proj, 1, w.num_channels))
            elif effective_attention_unit(s.attention, self.attention_unit) == "kv_groups":
                targets.append(MaskTarget(s.attention.o_proj, s.attention.group_size * s.attention.head_dim, w.num_kv_heads))
            else:
                targets.append(MaskTarget(s.attention.o_proj, s.attention.head_dim,
                                          w.num_heads // s.attention.num_kv_heads, s.attention.num_kv_heads))
        return targets

    def learn_weights(
        self, trainer: Trainer, pl_module: LightningModule, layers: list[LayerStructures], groups: list[GroupScores]
    ) -> tuple[Tensor, dict]:
        """Train the fusion attention with its own single-device Trainer (every rank trains the same
        fusion from the same seed and windows; rank 0's weights are broadcast)."""
        windows = self.calibration_data(trainer).windows()
        train, held_out = windows[: -self.holdout], windows[-self.holdout :]
        torch.manual_seed(self.seed)
        module = FusionTraining(
            pl_module.model, FusionAttention(len(self.schemes), self.width), groups,
            self.mask_targets(pl_module, layers, groups), self.lr, self.temperatures, self.epochs,
        )
        initial = module.weights()
        inner = Trainer(
            strategy=SingleDeviceStrategy(trainer.strategy.root_device), max_epochs=self.epochs,
            callbacks=[EarlyStopping("val_loss", patience=self.patience)], logger=False,
            enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
            enable_progress_bar=trainer.progress_bar_callback is not None, default_root_dir=trainer.default_root_dir,
        )
        generator = torch.Generator().manual_seed(self.seed)
        inner.fit(
            module,
            DataLoader(TensorDataset(train), batch_size=1, shuffle=True, generator=generator),
            DataLoader(TensorDataset(held_out), batch_size=1),
        )
        weights = module.weights().double()
        return weights, {
            "epochs_run": len(module.val_history),
            "held_out_loss_per_epoch": [round(v, 5) for v in module.val_history],
            "best_held_out_loss": module.best_val_loss,
            "weights_moved": float((weights - initial.double()).abs().max()),
        }
