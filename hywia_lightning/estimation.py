"""Importance estimation: forward + backward over calibration windows, accumulating per-parameter
mean gradient ``g`` and mean squared gradient ``g²`` (the diagonal empirical Fisher).

Only the prunable weights get accumulators; every other parameter is frozen during the pass, and
each gradient is folded into its accumulators as soon as autograd produces it and then freed, so
no separate gradient buffer lives alongside the accumulators. One window per backward keeps
``g²`` a true per-window Fisher (a batched backward would square a batch mean instead). The same
forward passes also sum the squared input features of every prunable Linear (activation-aware
schemes such as Wanda's |W|·‖X‖ read their norms), at O(width) memory.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from lightning import LightningModule
from torch import Tensor, nn

from .lm_loss import language_model_loss

# per parameter: mean g, mean g², and for a Linear's weight the L2 norm of each of its input
# features over all calibration tokens (None for biases)
Statistics = dict[nn.Parameter, tuple[Tensor, Tensor, Tensor | None]]


class ImportanceEstimation(LightningModule):
    """Calibration language-model loss of a frozen model, with gradient statistics of ``params``."""

    def __init__(
        self, model: nn.Module, linears: Sequence[nn.Linear], accumulate_dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.model = model
        self.linears = list(linears)
        self.params = [p for m in self.linears for p in (m.weight, m.bias) if p is not None]
        self.input_sq_sum: dict[nn.Linear, Tensor] = {}
        self.accumulate_dtype = accumulate_dtype
        self.grad_sum: dict[nn.Parameter, Tensor] = {}
        self.sq_grad_sum: dict[nn.Parameter, Tensor] = {}
        self.windows_seen = 0

    def training_step(self, batch: Tensor, batch_idx: int = 0) -> Tensor:
        return language_model_loss(self.model, batch)

    def configure_optimizers(self):
        return None  # estimation reads gradients; it never changes a weight

    def accumulate(self, windows: Iterable[Tensor]) -> None:
        """One forward + backward per window; gradients go straight into the accumulators."""
        trainable = {p: p.requires_grad for p in self.model.parameters()}
        tracked = {id(p) for p in self.params}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in tracked)
        handles = [p.register_post_accumulate_grad_hook(self._fold_gradient) for p in self.params]
        handles += [m.register_forward_pre_hook(self._fold_input) for m in self.linears]
        was_training = self.model.training
        self.model.eval()  # no dropout: the statistics are those of the deployed model
        try:
            device = self.params[0].device
            for window in windows:
                loss = self.training_step(window.reshape(1, -1).to(device))
                loss.backward()
                self.windows_seen += 1
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in trainable.items():
                p.requires_grad_(flag)
            self.model.train(was_training)

    def _fold_gradient(self, param: nn.Parameter) -> None:
        grad = param.grad.detach().to(self.accumulate_dtype)
        if param not in self.grad_sum:
            self.grad_sum[param] = torch.zeros_like(grad)
            self.sq_grad_sum[param] = torch.zeros_like(grad)
        self.grad_sum[param].add_(grad)
        self.sq_grad_sum[param].addcmul_(grad, grad)
        param.grad = None

    def _fold_input(self, module: nn.Linear, args) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(self.accumulate_dtype)
        if module not in self.input_sq_sum:
            self.input_sq_sum[module] = torch.zeros(x.shape[-1], dtype=self.accumulate_dtype, device=x.device)
        self.input_sq_sum[module].add_(x.pow(2).sum(0))

    def statistics(self, all_reduce: Callable[[Tensor], Tensor] | None = None) -> Statistics:
        """Mean ``g`` and ``g²`` per parameter and input norms per weight, summed over all processes
        by ``all_reduce`` when given."""
        count = torch.tensor(float(self.windows_seen), dtype=torch.float64)
        if all_reduce is not None:
            count = all_reduce(count)
        if count.item() == 0:
            raise RuntimeError("importance estimation saw no calibration window")
        stats = {}
        for p in self.params:
            empty = torch.zeros(p.shape, dtype=self.accumulate_dtype, device=p.device)  # a rank with no window
            g, g2 = self.grad_sum.get(p, empty), self.sq_grad_sum.get(p, empty)
            if all_reduce is not None:
                g, g2 = all_reduce(g), all_reduce(g2)
            stats[p] = (g / count.item(), g2 / count.item(), None)
        for m in self.linears:
            sq = self.input_sq_sum.get(m, torch.zeros(m.in_features, dtype=self.accumulate_dtype, device=m.weight.device))
            if all_reduce is not None:
                sq = all_reduce(sq)
            g, g2, _ = stats[m.weight]
            stats[m.weight] = (g, g2, sq.sqrt())
        return stats
