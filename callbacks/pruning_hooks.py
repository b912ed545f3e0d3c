"""Hooks around slicing, for callbacks that take part in pruning (reconstruction, new schemes)."""

from __future__ import annotations

from lightning import LightningModule, Trainer

from hywia_lightning.plan import PruningPlan


class PruningHooks:
    """Mixin: :class:`StructuredPruning` calls these on every callback of the trainer that has them."""

    def on_before_slicing(self, trainer: Trainer, pl_module: LightningModule, plan: PruningPlan) -> None:
        """The plan is final and the model still dense."""

    def on_after_slicing(self, trainer: Trainer, pl_module: LightningModule, plan: PruningPlan) -> None:
        """The model is pruned; no strategy has wrapped it yet."""
