"""Learning the fusion attention: a differentiable surrogate of "prune with these fused scores".

Each pruned group gets a soft mask over its units, ``σ((f − τ)/T)``, where ``f`` are the fused
scores, ``τ`` the midpoint between the k-th and (k+1)-th largest (k = the units the plan keeps) and
``T`` a temperature annealed geometrically from ``T₀`` to ``T₁`` over the epochs. The masks scale
the units' inputs to ``o_proj`` / ``down_proj`` of the frozen model, and the calibration language
model loss trains only the fusion, or (``objective="kl"``) the KL from the unmasked model's
next-token distributions (:func:`~hywia_lightning.core.distillation.kl_to_logits`; the teacher is the
same frozen model run once more per window with no mask, so nothing is stored): what the pruned
model should keep is the dense model's behaviour, not the calibration text's next tokens.
Validation applies the *hard* masks, the exact pruning decision (before reconstruction), on held-out
windows, with the same objective.

:class:`FusionTraining` is a LightningModule trained by Lightning: Adam by ``configure_optimizers``,
``EarlyStopping`` on the held-out loss (``patience`` epochs without a better one), ``ModelCheckpoint``
keeping the best fusion state, the curves in the job's loggers (``fusion/train_loss``,
``fusion/val_loss``). Its Trainer runs on this process (:mod:`hywia_lightning.local_loop`): every rank
trains the same fusion from the same seed, on the same windows.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch
from lightning import LightningModule
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..core.distillation import kl_to_logits, model_logits
from ..core.frozen import Frozen
from ..core.lm_loss import language_model_loss
from ..core.scoring import ScoringContext
from ..core.unit_groups import GroupKey, effective_attention_unit
from ..local_loop import LocalLoop
from ..progress import Progress
from .attention import FusionAttention, GroupScores


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


class FusionTraining(LightningModule):
    """Trains a :class:`FusionAttention` against the frozen model's calibration loss (``objective``:
    ``lm``, the next-token loss, or ``kl``, the KL from the unmasked model).

    The model is held outside the module's children: Lightning never moves, casts or checkpoints
    it, and the fusion attention is the module's only state."""

    def __init__(
        self, model: nn.Module, fusion: FusionAttention, groups: list[GroupScores], targets: list[MaskTarget],
        lr: float, temperatures: tuple[float, float], objective: str = "lm",
    ) -> None:
        super().__init__()
        self.objective = objective
        self.fusion, self.groups, self.targets = fusion, groups, targets
        self._model = [model]  # a list: not a registered child
        self.lr, self.temperatures = lr, temperatures
        device = next(model.parameters()).device
        self.fusion.to(device)
        self.register_buffer("shared", torch.stack([g.shared_features() for g in groups]).to(device), persistent=False)
        self.register_buffer("schemes", torch.stack([g.scheme_features() for g in groups]).to(device), persistent=False)
        self.normalized = [g.normalized.float().to(device) for g in groups]
        self._masks: list[Tensor | None] = [None] * len(groups)  # what the hooks apply now
        self._hard_masks: list[Tensor] = []  # the current fusion's exact plan, for a validation epoch
        self._handles: list = []
        self._frozen: Frozen | None = None
        self.train_history: list[float] = []
        self.val_history: list[float] = []

    @property
    def model(self) -> nn.Module:
        return self._model[0]

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

    # -- the frozen model under masks, for the span of the fit --------------------------------
    def on_fit_start(self) -> None:
        self._frozen = Frozen(self.model)
        self._handles = [t.projection.register_forward_pre_hook(self._mask_hook(i)) for i, t in enumerate(self.targets)]

    def on_fit_end(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._frozen.restore()
        self._masks = [None] * len(self.groups)

    def temperature(self) -> float:
        """The soft masks' temperature of this epoch, annealed geometrically from the first to the last."""
        t0, t1 = self.temperatures
        return t0 * (t1 / t0) ** (self.current_epoch / max(self.trainer.max_epochs - 1, 1))

    # -- Lightning's steps ----------------------------------------------------------------------
    def loss(self, window: Tensor, masks: list[Tensor]) -> Tensor:
        """The objective on ``window`` with ``masks`` on the model's output projections."""
        if self.objective == "lm":
            self._masks = masks
            return language_model_loss(self.model, window)
        self._masks = [None] * len(masks)  # the teacher: the same model, nothing masked
        with torch.no_grad():
            teacher = model_logits(self.model, window)
        self._masks = masks
        return kl_to_logits(model_logits(self.model, window), teacher).mean()

    def training_step(self, window: Tensor, index: int) -> Tensor:
        loss = self.loss(window, [soft_mask(f, t, self.temperature()) for f, t in zip(self.fused(), self.targets)])
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=1)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._hard_masks = [hard_mask(f.detach(), t) for f, t in zip(self.fused(), self.targets)]

    def validation_step(self, window: Tensor, index: int) -> None:
        """The objective with the hard masks: the exact pruning decision of the current fusion."""
        self.log("val_loss", self.loss(window, self._hard_masks), on_step=False, on_epoch=True, batch_size=1)

    def on_train_start(self) -> None:
        self._progress = Progress("fusion training", self.trainer.max_epochs, unit="epoch", every=0)

    def on_train_epoch_end(self) -> None:
        metrics = self.trainer.callback_metrics
        self.train_history.append(float(metrics["train_loss"]))
        self.val_history.append(float(metrics["val_loss"]))
        self._progress.update(note=f"held-out loss {self.val_history[-1]:.4f} (best {self.best_val_loss:.4f})")

    def configure_optimizers(self):
        return torch.optim.Adam(self.fusion.parameters(), lr=self.lr)

    # -- the whole training ---------------------------------------------------------------------
    def fit(self, train: Tensor, held_out: Tensor, epochs: int, patience: int, seed: int,
            loop: LocalLoop | None = None) -> None:
        """One window per step, the windows shuffled per epoch by ``seed``; the best held-out state is kept."""
        loop = loop or LocalLoop.on_device_of(self.model)
        with tempfile.TemporaryDirectory() as scratch:
            folder = loop.folder("fusion") if loop.rank == 0 else None  # every rank trains the same fusion
            best = ModelCheckpoint(dirpath=str(folder or scratch), filename="best", monitor="val_loss", mode="min",
                                   save_top_k=1, enable_version_counter=False)
            trainer = loop.trainer("fusion", callbacks=[EarlyStopping("val_loss", patience=patience, mode="min"), best],
                                   max_epochs=epochs)
            shuffled = DataLoader(train, batch_size=1, shuffle=True, generator=torch.Generator().manual_seed(seed))
            trainer.fit(self, shuffled, DataLoader(held_out, batch_size=1))
            state = torch.load(best.best_model_path, map_location=self.shared.device, weights_only=True)["state_dict"]
        self.load_state_dict(state)

    @property
    def best_val_loss(self) -> float:
        return min(self.val_history, default=float("inf"))


def mask_targets(context: ScoringContext, keys: list[GroupKey], widths: dict) -> list[MaskTarget]:
    """Where each group's soft mask acts, and how many units it keeps."""
    by_layer = {s.layer: s for s in context.layers}
    targets = []
    for key in keys:
        s, w = by_layer[key.layer], widths[key.layer]
        attn = s.attention
        if key.kind == "mlp":
            targets.append(MaskTarget(s.mlp.down_proj, 1, w.num_channels))
        elif effective_attention_unit(attn, context.scope.attention_unit) == "kv_groups":
            targets.append(MaskTarget(attn.o_proj, attn.group_size * attn.head_dim, w.num_kv_heads))
        else:
            targets.append(MaskTarget(attn.o_proj, attn.head_dim, w.num_heads // attn.num_kv_heads, attn.num_kv_heads))
    return targets
