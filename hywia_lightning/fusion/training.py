"""Learning the fusion attention: a differentiable surrogate of "prune with these fused scores".

Each pruned group gets a soft mask over its units, ``σ((f − τ)/T)``, where ``f`` are the fused
scores, ``τ`` the midpoint between the k-th and (k+1)-th largest (k = the units the plan keeps) and
``T`` a temperature annealed geometrically from ``T₀`` to ``T₁`` over the epochs. The masks scale
the units' inputs to ``o_proj`` / ``down_proj`` of the frozen model, and the calibration language
model loss trains only the fusion. Validation applies the *hard* masks, the exact pruning decision
(before reconstruction), on held-out windows; the best fusion state is kept, and training stops
when the held-out loss has not improved for ``patience`` epochs.

A plain loop on the current process (no Trainer): it runs inside the pruning stage, where an
outer distributed run may already exist; every rank trains the same fusion from the same seed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import FusionAttention, GroupScores
from ..core.lm_loss import language_model_loss
from ..progress import Progress


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
    if keep == 0:
        return torch.full((blocks, 1), torch.inf, dtype=fused.dtype, device=fused.device)
    return ((ordered[:, keep - 1] + ordered[:, keep]) / 2).unsqueeze(1)


def soft_mask(fused: Tensor, target: MaskTarget, temperature: float) -> Tensor:
    tau = _block_threshold(fused, target.keep, target.blocks)
    return torch.sigmoid((fused.view(target.blocks, -1) - tau) / temperature).reshape(-1)


def hard_mask(fused: Tensor, target: MaskTarget) -> Tensor:
    tau = _block_threshold(fused, target.keep, target.blocks)
    return (fused.view(target.blocks, -1) > tau).to(fused.dtype).reshape(-1)


class FusionTraining:
    """Trains a :class:`FusionAttention` against the frozen model's calibration loss."""

    def __init__(
        self, model: nn.Module, fusion: FusionAttention, groups: list[GroupScores], targets: list[MaskTarget],
        lr: float, temperatures: tuple[float, float],
    ) -> None:
        self.model, self.fusion, self.groups, self.targets = model, fusion, groups, targets
        self.lr, self.temperatures = lr, temperatures
        device = next(model.parameters()).device
        self.fusion.to(device)
        self.shared = torch.stack([g.shared_features() for g in groups]).to(device)
        self.schemes = torch.stack([g.scheme_features() for g in groups]).to(device)
        self.normalized = [g.normalized.float().to(device) for g in groups]
        self._masks: list[Tensor | None] = [None] * len(groups)
        self.best_val_loss = float("inf")
        self.val_history: list[float] = []

    def fused(self) -> list[Tensor]:
        return self.fusion(self.shared, self.schemes, self.normalized)

    def weights(self) -> Tensor:
        """Blend weights of every group (G × S) with the current fusion state."""
        with torch.no_grad():
            return self.fusion.weights(self.shared, self.schemes).cpu()

    def _mask_hook(self, index: int):
        target = self.targets[index]

        def apply(module, args):
            mask = self._masks[index]
            if mask is None:
                return None
            return (args[0] * mask.repeat_interleave(target.unit_size).to(args[0].dtype),) + tuple(args[1:])
        return apply

    def held_out_loss(self, windows: Tensor) -> float:
        """Calibration loss with the hard masks: the exact pruning decision of the current fusion."""
        with torch.no_grad():
            self._masks = [hard_mask(f, t) for f, t in zip(self.fused(), self.targets)]
            return sum(float(language_model_loss(self.model, w[None])) for w in windows) / len(windows)

    def fit(self, train: Tensor, held_out: Tensor, epochs: int, patience: int, seed: int) -> None:
        """Adam on the soft-masked loss, one window per step, windows shuffled per epoch by ``seed``."""
        frozen = {p: p.requires_grad for p in self.model.parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        handles = [t.projection.register_forward_pre_hook(self._mask_hook(i)) for i, t in enumerate(self.targets)]
        was_training = self.model.training
        self.model.eval()
        optimizer = torch.optim.Adam(self.fusion.parameters(), lr=self.lr)
        generator = torch.Generator().manual_seed(seed)
        progress = Progress("fusion training", epochs, unit="epoch", every=0)
        best_state, stale = None, 0
        device = self.shared.device
        try:
            for epoch in range(epochs):
                t0, t1 = self.temperatures
                temperature = t0 * (t1 / t0) ** (epoch / max(epochs - 1, 1))
                for index in torch.randperm(len(train), generator=generator).tolist():
                    self._masks = [soft_mask(f, t, temperature) for f, t in zip(self.fused(), self.targets)]
                    loss = language_model_loss(self.model, train[index][None].to(device))
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                value = self.held_out_loss(held_out.to(device))
                self.val_history.append(value)
                if value < self.best_val_loss:
                    self.best_val_loss, best_state, stale = value, copy.deepcopy(self.fusion.state_dict()), 0
                else:
                    stale += 1
                progress.update(note=f"held-out loss {value:.4f} (best {self.best_val_loss:.4f})")
                if stale >= patience:
                    break
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in frozen.items():
                p.requires_grad_(flag)
            self.model.train(was_training)
            self._masks = [None] * len(self.groups)
        if best_state is not None:
            self.fusion.load_state_dict(best_state)
