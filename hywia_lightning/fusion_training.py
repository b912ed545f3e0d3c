"""Learning the fusion attention: a differentiable surrogate of "prune with these fused scores".

Each pruned group gets a soft mask over its units, ``σ((f − τ)/T)``, where ``f`` are the fused
scores, ``τ`` the midpoint between the k-th and (k+1)-th largest (k = the units the plan keeps) and
``T`` a temperature annealed geometrically from ``T₀`` to ``T₁`` over the epochs. The masks scale
the units' inputs to ``o_proj`` / ``down_proj`` of the frozen model, and the calibration language
model loss trains only the fusion. Validation applies the *hard* masks, the exact pruning decision
(before reconstruction), on held-out windows; the best fusion state is kept.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from lightning import LightningModule
from torch import Tensor, nn

from .fusion import FusionAttention, GroupScores
from .lm_loss import language_model_loss
from .progress import Progress


@dataclass
class MaskTarget:
    """Where one group's mask acts: the input features of ``projection``, ``unit_size`` per unit,
    with ``keep`` units kept in each of ``blocks`` equal blocks (KV groups for query heads)."""

    projection: nn.Linear
    unit_size: int
    keep: int
    blocks: int = 1


def _block_threshold(fused: Tensor, keep: int, blocks: int) -> Tensor:
    ordered = fused.view(blocks, -1).sort(dim=1, descending=True).values
    if keep >= ordered.shape[1]:
        return torch.full((blocks, 1), -torch.inf, dtype=fused.dtype, device=fused.device)
    return ((ordered[:, keep - 1] + ordered[:, keep]) / 2).unsqueeze(1)


def soft_mask(fused: Tensor, target: MaskTarget, temperature: float) -> Tensor:
    tau = _block_threshold(fused, target.keep, target.blocks)
    return torch.sigmoid((fused.view(target.blocks, -1) - tau) / temperature).reshape(-1)


def hard_mask(fused: Tensor, target: MaskTarget) -> Tensor:
    tau = _block_threshold(fused, target.keep, target.blocks)
    return (fused.view(target.blocks, -1) > tau).to(fused.dtype).reshape(-1)


class FusionTraining(LightningModule):
    """Trains a :class:`FusionAttention` against the frozen model's calibration loss."""

    def __init__(
        self, model: nn.Module, fusion: FusionAttention, groups: list[GroupScores], targets: list[MaskTarget],
        lr: float, temperatures: tuple[float, float], max_epochs: int,
    ) -> None:
        super().__init__()
        self.model, self.fusion, self.groups, self.targets = model, fusion, groups, targets
        self.lr, self.temperatures, self.max_epochs = lr, temperatures, max_epochs
        self.register_buffer("shared", torch.stack([g.shared_features() for g in groups]), persistent=False)
        self.register_buffer("schemes", torch.stack([g.scheme_features() for g in groups]), persistent=False)
        self.normalized = [g.normalized.float() for g in groups]
        self._masks: list[Tensor | None] = [None] * len(groups)
        self.best_state: dict | None = None
        self.best_val_loss = float("inf")
        self.val_history: list[float] = []

    # -- masks ----------------------------------------------------------------------------------
    def temperature(self) -> float:
        t0, t1 = self.temperatures
        progress = self.current_epoch / max(self.max_epochs - 1, 1)
        return t0 * (t1 / t0) ** progress

    def fused(self) -> list[Tensor]:
        return self.fusion(self.shared, self.schemes, [z.to(self.shared.device) for z in self.normalized])

    def _mask_hook(self, index: int):
        target = self.targets[index]

        def apply(module, args):
            mask = self._masks[index]
            if mask is None:
                return None
            scale = mask.repeat_interleave(target.unit_size).to(args[0].dtype)
            return (args[0] * scale,) + tuple(args[1:])
        return apply

    def on_fit_start(self) -> None:
        self._frozen = {p: p.requires_grad for p in self.model.parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._handles = [t.projection.register_forward_pre_hook(self._mask_hook(i)) for i, t in enumerate(self.targets)]
        self.model.eval()
        self._progress = Progress("fusion training", self.max_epochs, unit="epoch", every=0)

    def on_fit_end(self) -> None:
        for handle in self._handles:
            handle.remove()
        for p, flag in self._frozen.items():
            p.requires_grad_(flag)
        self._masks = [None] * len(self.groups)
        if self.best_state is not None:
            self.fusion.load_state_dict(self.best_state)

    # -- steps ----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> Tensor:
        temperature = self.temperature()
        self._masks = [soft_mask(f, t, temperature) for f, t in zip(self.fused(), self.targets)]
        loss = language_model_loss(self.model, batch)
        self.log_dict({"fusion_train_loss": loss, "temperature": temperature}, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx: int) -> Tensor:
        with torch.no_grad():
            self._masks = [hard_mask(f, t) for f, t in zip(self.fused(), self.targets)]
        loss = language_model_loss(self.model, batch)
        self.log("val_loss", loss, on_epoch=True, prog_bar=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        value = float(self.trainer.callback_metrics["val_loss"])
        self.val_history.append(value)
        if value < self.best_val_loss:
            self.best_val_loss = value
            self.best_state = copy.deepcopy(self.fusion.state_dict())
        if hasattr(self, "_progress"):
            self._progress.update(note=f"held-out loss {value:.4f} (best {self.best_val_loss:.4f})")

    def configure_optimizers(self):
        return torch.optim.Adam(self.fusion.parameters(), lr=self.lr)

    def weights(self) -> Tensor:
        """Blend weights of every group (G × S) with the current fusion state."""
        with torch.no_grad():
            return self.fusion.weights(self.shared, self.schemes).cpu()
