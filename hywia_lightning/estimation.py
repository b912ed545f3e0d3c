"""Importance estimation: forward + backward over calibration windows, accumulating per-parameter
mean gradient ``g`` and mean squared gradient ``g²`` (the diagonal empirical Fisher).

``g²`` must be the mean of *per-window* squared gradients: a plain batched backward only yields
the gradient of the batch mean, whose square is not the Fisher. Instead of one backward per window,
the per-window gradients of every prunable Linear are computed exactly from the batched pass: for
``y = x Wᵀ + b`` the gradient of window ``i`` is ``δᵢᵀ xᵢ`` (``δᵢ`` the gradient of window ``i``'s
loss at ``y``, ``xᵢ`` its inputs), one small matrix product per window, the same work autograd's
weight gradient does. So all weights stay frozen (autograd computes no weight gradient and keeps
no gradient buffer); a forward hook keeps each prunable Linear's input and a hook on its output
receives ``δ``, folds ``δᵢᵀ xᵢ`` and its square into the accumulators (in ``accumulate_dtype``)
and drops them. Only prunable weights have accumulators. With ``batch_size`` windows per pass the
statistics equal those of one backward per window (up to float summation order).
The same forward passes also sum the squared input features of every prunable Linear
(activation-aware schemes such as Wanda's |W|·‖X‖ read their norms), at O(width) memory.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from lightning import LightningModule
from torch import Tensor, nn

from .lm_loss import language_model_loss
from .progress import Progress

# per parameter: mean g, mean g², and for a Linear's weight the L2 norm of each of its input
# features over all calibration tokens (None for biases)
Statistics = dict[nn.Parameter, tuple[Tensor, Tensor, Tensor | None]]

# float16 cannot hold g² (≈1e-12 on real models, below its smallest subnormal 6e-8)
ACCUMULATE_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def accumulate_dtype_named(name: str) -> torch.dtype:
    """The accumulator dtype for a config value, refusing those that cannot hold ``g²``."""
    if name not in ACCUMULATE_DTYPES:
        raise ValueError(f"accumulate_dtype={name!r} is not supported; allowed: {', '.join(ACCUMULATE_DTYPES)}")
    return ACCUMULATE_DTYPES[name]


class ImportanceEstimation(LightningModule):
    """Calibration language-model loss of a frozen model, with gradient statistics of ``linears``."""

    def __init__(
        self, model: nn.Module, linears: Sequence[nn.Linear], accumulate_dtype: torch.dtype = torch.float32,
        batch_size: int = 1,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1 (calibration windows per forward + backward)")
        self.model = model
        self.linears = list(linears)
        self.params = [p for m in self.linears for p in (m.weight, m.bias) if p is not None]
        self.accumulate_dtype = accumulate_dtype
        self.batch_size = batch_size
        self.input_sq_sum: dict[nn.Linear, Tensor] = {}
        self.grad_sum: dict[nn.Parameter, Tensor] = {}
        self.sq_grad_sum: dict[nn.Parameter, Tensor] = {}
        self.windows_seen = 0
        self._spent = False
        self._inputs: dict[nn.Linear, Tensor] = {}  # this pass's input of each prunable Linear, until its δ arrives

    def training_step(self, batch: Tensor, batch_idx: int = 0) -> Tensor:
        return language_model_loss(self.model, batch)

    def configure_optimizers(self):
        return None  # estimation reads gradients; it never changes a weight

    def accumulate(self, windows: Iterable[Tensor]) -> None:
        """Forward + backward over ``batch_size`` windows at a time (all of one length); the
        per-window gradients of the prunable weights go straight into the accumulators."""
        if self._spent:
            raise RuntimeError("accumulate() after statistics(): the sums were already turned into means")
        if not isinstance(windows, Tensor):
            windows = [w.reshape(-1) for w in windows]
            windows = torch.stack(windows) if windows else torch.empty(0, 1, dtype=torch.long)
        if len(windows) == 0:
            return  # a rank with no window contributes zeros to the sums
        windows = windows.reshape(len(windows), -1)
        trainable = {p: p.requires_grad for p in self.model.parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)  # weight gradients are formed per window by the hooks, never by autograd
        handles = [m.register_forward_pre_hook(self._before_linear) for m in self.linears]
        handles += [m.register_forward_hook(self._after_linear) for m in self.linears]
        was_training = self.model.training
        self.model.eval()  # no dropout: the statistics are those of the deployed model
        try:
            device = self.params[0].device
            progress = Progress("estimation", len(windows), unit="window")
            for start in range(0, len(windows), self.batch_size):
                batch = windows[start : start + self.batch_size].to(device)
                # the loss is the mean over equally long windows, so B·loss has window i's own loss as its i-th term
                loss = self.training_step(batch) * len(batch)
                loss.backward()
                self.windows_seen += len(batch)
                progress.update(len(batch))
                self._inputs.clear()
        finally:
            self._inputs.clear()
            for handle in handles:
                handle.remove()
            for p, flag in trainable.items():
                p.requires_grad_(flag)
            self.model.train(was_training)

    def _before_linear(self, module: nn.Linear, args) -> None:
        x = args[0]
        if module in self._inputs:  # δᵢᵀxᵢ per call would square partial gradients
            raise RuntimeError(f"{module} ran twice in one forward; per-window gradients need one call per Linear")
        self._inputs[module] = x.detach()  # autograd keeps no copy: the weight is frozen
        flat = x.detach().reshape(-1, x.shape[-1]).to(self.accumulate_dtype)
        if module not in self.input_sq_sum:
            self.input_sq_sum[module] = torch.zeros(x.shape[-1], dtype=self.accumulate_dtype, device=x.device)
        self.input_sq_sum[module].add_(flat.pow(2).sum(0))

    def _after_linear(self, module: nn.Linear, args, output: Tensor) -> Tensor:
        if not output.requires_grad:  # the first prunable Linear: the gradient only needs to reach its output
            output = output.detach().requires_grad_()
        output.register_hook(lambda delta: self._fold_gradient(module, delta))
        return output

    def _fold_gradient(self, module: nn.Linear, delta: Tensor) -> None:
        """Fold the per-window gradients ``δᵢᵀ xᵢ`` (and ``Σ_t δᵢ`` for a bias) into the accumulators."""
        x = self._inputs.pop(module)
        x = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 2 else x[None]
        delta = delta.reshape(delta.shape[0], -1, delta.shape[-1]) if delta.dim() > 2 else delta[None]
        for i in range(delta.shape[0]):
            self._fold(module.weight, delta[i].T @ x[i])
            if module.bias is not None:
                self._fold(module.bias, delta[i].sum(0))

    def _fold(self, param: nn.Parameter, grad: Tensor) -> None:
        grad = grad.to(self.accumulate_dtype)
        if param not in self.grad_sum:
            self.grad_sum[param] = torch.zeros_like(grad)
            self.sq_grad_sum[param] = torch.zeros_like(grad)
        self.grad_sum[param].add_(grad)
        self.sq_grad_sum[param].addcmul_(grad, grad)

    def statistics(self, all_reduce: Callable[[Tensor], Tensor] | None = None) -> Statistics:
        """Mean ``g`` and ``g²`` per parameter and input norms per weight, summed over all processes
        by ``all_reduce`` when given. The sums become the means in place (no second copy of the
        accumulators at the peak), so this is called once, after the last :meth:`accumulate`."""
        if self._spent:
            raise RuntimeError("statistics() was already called: the sums were turned into means in place")
        count = torch.tensor(float(self.windows_seen), dtype=torch.float64)
        if all_reduce is not None:
            count = all_reduce(count)
        if count.item() == 0:
            raise RuntimeError("importance estimation saw no calibration window")
        self._spent = True
        stats = {}
        for p in self.params:
            g, g2 = self.grad_sum.pop(p, None), self.sq_grad_sum.pop(p, None)
            if g is None:  # a rank with no window
                g, g2 = (torch.zeros(p.shape, dtype=self.accumulate_dtype, device=p.device) for _ in range(2))
            if all_reduce is not None:
                g, g2 = all_reduce(g), all_reduce(g2)
            stats[p] = (g.div_(count.item()), g2.div_(count.item()), None)
        for m in self.linears:
            sq = self.input_sq_sum.pop(m, None)
            if sq is None:
                sq = torch.zeros(m.in_features, dtype=self.accumulate_dtype, device=m.weight.device)
            if all_reduce is not None:
                sq = all_reduce(sq)
            g, g2, _ = stats[m.weight]
            stats[m.weight] = (g, g2, sq.sqrt_())
        return stats
