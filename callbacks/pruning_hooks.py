"""Hooks around slicing, for callbacks that take part in pruning (reconstruction, new schemes)."""

from __future__ import annotations

from lightning import LightningModule, Trainer
from torch import nn

from hywia_lightning.core.plan import PruningPlan


class PruningHooks:
    """Mixin: :class:`StructuredPruning` calls these on every callback of the trainer that has them."""

    def on_before_slicing(self, trainer: Trainer, pl_module: LightningModule, plan: PruningPlan) -> None:
        """The plan is final and the model still dense."""

    def prepare_pruned_layer(self, trainer: Trainer, pl_module: LightningModule, plan: PruningPlan, index: int,
                             layer: nn.Module) -> None:
        """``shard_weights`` only: decoder layer ``index`` is pruned and whole, about to be sharded
        again (FSDP2 takes no parameter added later: a bias must be added here)."""

    def on_after_slicing(self, trainer: Trainer, pl_module: LightningModule, plan: PruningPlan) -> None:
        """The model is pruned; no strategy has wrapped it yet."""
