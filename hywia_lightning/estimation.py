"""Importance estimation: the statistics of :mod:`hywia_lightning.statistics` over calibration windows.

``g²`` must be the mean of *per-window* squared gradients: a plain batched backward only yields
the gradient of the batch mean, whose square is not the Fisher. Instead of one backward per window,
the per-window gradients of every prunable Linear are computed exactly from the batched pass: for
``y = x Wᵀ + b`` the gradient of window ``i`` is ``δᵢᵀ xᵢ`` (``δᵢ`` the gradient of window ``i``'s
loss at ``y``, ``xᵢ`` its inputs), one small matrix product per window, the same work autograd's
weight gradient does. So all weights stay frozen (autograd computes no weight gradient and keeps
no gradient buffer); a forward hook keeps each prunable Linear's input and a hook on its output
receives ``δ``, folds ``δᵢᵀ xᵢ`` into the accumulators that were asked for (in ``accumulate_dtype``)
and drops it. Only prunable weights have accumulators. With ``batch_size`` windows per pass the
statistics equal those of one backward per window (up to float summation order).

With ``input_moments`` the same forward passes sum every prunable Linear's input features and their
squares (O(width) memory). When no granularity needs a gradient, estimation is forward passes only.

Under several processes each rank passes its share of the windows with their global indices; the
sums (and the per-window rows, zero where another rank owns the window) are summed over ranks, so
the statistics are those of one process.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .lm_loss import language_model_loss
from .progress import Progress
from .statistics import GRADIENT_NEEDS, InputStatistics, ParameterStatistics, Statistics, check_needs

# float16 cannot hold g² (≈1e-12 on real models, below its smallest subnormal 6e-8)
ACCUMULATE_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def accumulate_dtype_named(name: str) -> torch.dtype:
    """The accumulator dtype for a config value, refusing those that cannot hold ``g²``."""
    if name not in ACCUMULATE_DTYPES:
        raise ValueError(f"accumulate_dtype={name!r} is not supported; allowed: {', '.join(ACCUMULATE_DTYPES)}")
    return ACCUMULATE_DTYPES[name]


def _add(sums: dict, key, value: Tensor) -> None:
    if key in sums:
        sums[key].add_(value)
    else:
        sums[key] = value.clone()


class Estimator:
    """Accumulates the requested statistics of ``linears`` over calibration windows of a frozen model."""

    def __init__(
        self, model: nn.Module, linears: Sequence[nn.Linear], needs: set[str] | frozenset[str],
        num_windows: int, accumulate_dtype: torch.dtype = torch.float32, batch_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1 (calibration windows per forward + backward)")
        self.model = model
        self.linears = list(linears)
        self.params = [p for m in self.linears for p in (m.weight, m.bias) if p is not None]
        self.needs = check_needs(needs, "estimation")
        self.num_windows = num_windows
        self.accumulate_dtype = accumulate_dtype
        self.batch_size = batch_size
        self.input_sum: dict[nn.Linear, Tensor] = {}
        self.input_sq_sum: dict[nn.Linear, Tensor] = {}
        self.tokens = 0
        self.grad_sum: dict[nn.Parameter, Tensor] = {}
        self.sq_grad_sum: dict[nn.Parameter, Tensor] = {}
        self.rows: dict[nn.Parameter, Tensor] = {}
        self.cols: dict[nn.Parameter, Tensor] = {}
        self.windows_seen = 0
        self._spent = False
        self._inputs: dict[nn.Linear, Tensor] = {}  # this pass's input of each prunable Linear, until its δ arrives
        self._window_index: list[int] = []           # global index of each window of the current batch

    @property
    def needs_backward(self) -> bool:
        return bool(self.needs & GRADIENT_NEEDS)

    def accumulate(self, windows: Tensor, indices: Sequence[int] | None = None) -> None:
        """Forward (+ backward) over ``batch_size`` windows at a time (all of one length).

        ``indices``: each window's position among all calibration windows (default ``0..N-1``),
        the row its per-window saliency goes to."""
        if self._spent:
            raise RuntimeError("accumulate() after statistics(): the sums were already turned into means")
        windows = windows.reshape(len(windows), -1) if len(windows) else windows
        indices = list(range(len(windows))) if indices is None else list(indices)
        if len(windows) == 0:
            return  # a rank with no window contributes zeros to the sums
        trainable = {p: p.requires_grad for p in self.model.parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)  # weight gradients are formed per window by the hooks, never by autograd
        handles = [m.register_forward_pre_hook(self._before_linear) for m in self.linears]
        if self.needs_backward:
            handles += [m.register_forward_hook(self._after_linear) for m in self.linears]
        was_training = self.model.training
        self.model.eval()  # no dropout: the statistics are those of the deployed model
        try:
            device = self.params[0].device
            progress = Progress("estimation", len(windows), unit="window")
            for start in range(0, len(windows), self.batch_size):
                batch = windows[start : start + self.batch_size].to(device)
                self._window_index = indices[start : start + len(batch)]
                if self.needs_backward:
                    # the loss is the mean over equally long windows, so B·loss has window i's own loss as its i-th term
                    (language_model_loss(self.model, batch) * len(batch)).backward()
                else:
                    with torch.no_grad():
                        self.model(input_ids=batch, use_cache=False)
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
        x = args[0].detach()
        if self.needs_backward:
            if module in self._inputs:  # δᵢᵀxᵢ per call would square partial gradients
                raise RuntimeError(f"{module} ran twice in one forward; per-window gradients need one call per Linear")
            self._inputs[module] = x  # autograd keeps no copy: the weight is frozen
        if module is self.linears[0]:
            self.tokens += x.numel() // x.shape[-1]
        if "input_moments" in self.needs:
            flat = x.reshape(-1, x.shape[-1]).to(self.accumulate_dtype)
            _add(self.input_sum, module, flat.sum(0))
            _add(self.input_sq_sum, module, flat.pow(2).sum(0))

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
        for i, window in enumerate(self._window_index):
            self._fold(module.weight, delta[i].T @ x[i], window)
            if module.bias is not None:
                self._fold(module.bias, delta[i].sum(0), window)

    def _fold(self, param: nn.Parameter, grad: Tensor, window: int) -> None:
        grad = grad.to(self.accumulate_dtype)
        if "gradients" in self.needs:
            _add(self.grad_sum, param, grad)
        if "squared_gradients" in self.needs:
            if param not in self.sq_grad_sum:
                self.sq_grad_sum[param] = torch.zeros_like(grad)
            self.sq_grad_sum[param].addcmul_(grad, grad)  # in place: no temporary of the weight's size
        if "window_saliency" in self.needs:
            taylor = param.detach().to(self.accumulate_dtype) * grad
            if param not in self.rows:
                self.rows[param] = grad.new_zeros(self.num_windows, grad.shape[0])
                if taylor.dim() == 2:
                    self.cols[param] = grad.new_zeros(self.num_windows, grad.shape[1])
            if taylor.dim() == 2:
                self.rows[param][window] += taylor.sum(1)
                self.cols[param][window] += taylor.sum(0)
            else:
                self.rows[param][window] += taylor

    def statistics(self, all_reduce: Callable[[Tensor], Tensor] | None = None) -> Statistics:
        """Means per parameter and per input feature, summed over all processes by ``all_reduce``
        when given. The sums become the means in place (no second copy of the accumulators at the
        peak), so this is called once, after the last :meth:`accumulate`."""
        if self._spent:
            raise RuntimeError("statistics() was already called: the sums were turned into means in place")
        reduce = all_reduce or (lambda t: t)
        windows = int(reduce(torch.tensor(float(self.windows_seen), dtype=torch.float64)).item())
        tokens = int(reduce(torch.tensor(float(self.tokens), dtype=torch.float64)).item())
        if windows == 0:
            raise RuntimeError("importance estimation saw no calibration window")
        self._spent = True
        stats = Statistics(windows)

        def take(sums: dict, key, shape: tuple) -> Tensor:
            """This rank's sum (zeros for a rank with no window), summed over all ranks."""
            device = key.weight.device if isinstance(key, nn.Linear) else key.device
            local = sums.pop(key) if key in sums else torch.zeros(shape, dtype=self.accumulate_dtype, device=device)
            return reduce(local)

        for p in self.params:
            entry = ParameterStatistics()
            if "gradients" in self.needs:
                entry.grad = take(self.grad_sum, p, p.shape).div_(windows)
            if "squared_gradients" in self.needs:
                entry.sq_grad = take(self.sq_grad_sum, p, p.shape).div_(windows)
            if "window_saliency" in self.needs:
                entry.row_saliency = take(self.rows, p, (self.num_windows, p.shape[0]))
                if p.dim() == 2:
                    entry.col_saliency = take(self.cols, p, (self.num_windows, p.shape[1]))
            stats.parameters[p] = entry
        if "input_moments" in self.needs:
            for m in self.linears:
                mean = take(self.input_sum, m, (m.in_features,)).div_(max(tokens, 1))
                sq_mean = take(self.input_sq_sum, m, (m.in_features,)).div_(max(tokens, 1))
                stats.inputs[m] = InputStatistics(tokens, mean, sq_mean)
        return stats
