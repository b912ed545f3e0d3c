"""Importance estimation: the statistics of :mod:`hywia_lightning.core.statistics` over calibration windows.

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
squares (O(width) memory), and with ``output_gram`` also ``x xᵀ`` of each output projection's input
(O(width²) per layer, whole on every rank). When no granularity needs a gradient, estimation is
forward passes only.

Under several processes each rank passes its share of the windows with their global indices; the
sums (and the per-window rows, zero where another rank owns the window) are summed over ranks, so
the statistics are those of one process. With ``sharded`` ranks each keeps only its shard of ``g``
and ``g²`` (:mod:`hywia_lightning.distributed.sharded_sums`): a batch's per-window gradients of one parameter
are summed locally in its hook and reduce-scattered there, so every rank must run as many batches
(windows of index ``None`` weigh zero: they only keep the ranks' collectives in step).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..distributed.collective import Collective
from ..distributed.sharded_sums import Sums
from ..progress import Progress
from .frozen import Frozen
from .lm_loss import language_model_loss
from .statistics import GRADIENT_NEEDS, InputStatistics, ParameterStatistics, Statistics, check_needs

#: the sums a checkpoint keeps (whole, or this rank's shards), besides the counts
STATE_FIELDS = ("input_sum", "input_sq_sum", "gram_sum", "grad_sum", "sq_grad_sum", "rows", "cols")

# float16 cannot hold g² (≈1e-12 on real models, below its smallest subnormal 6e-8)
ACCUMULATE_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def accumulate_dtype_named(name: str) -> torch.dtype:
    """The accumulator dtype for a config value, refusing those that cannot hold ``g²``."""
    if name not in ACCUMULATE_DTYPES:
        raise ValueError(f"accumulate_dtype={name!r} is not supported; allowed: {', '.join(ACCUMULATE_DTYPES)}")
    return ACCUMULATE_DTYPES[name]


class Estimator:
    """Accumulates the requested statistics of ``linears`` over calibration windows of a frozen model."""

    def __init__(
        self, model: nn.Module, linears: Sequence[nn.Linear], needs: set[str] | frozenset[str],
        num_windows: int, accumulate_dtype: torch.dtype = torch.float32, batch_size: int = 1,
        sharded: Collective | None = None, output_projections: Sequence[nn.Linear] = (),
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1 (calibration windows per forward + backward)")
        self.model = model
        self.linears = list(linears)
        # keyed by (Linear, "weight" | "bias"), not by Parameter: FSDP2 swaps an unsharded Parameter into the
        # module for forward and backward, but the module stays the one the unit groups know
        self.params = [(m, name) for m in self.linears for name in ("weight", "bias") if getattr(m, name) is not None]
        self.needs = check_needs(needs, "estimation")
        if "output_gram" in self.needs and "input_moments" not in self.needs:
            raise ValueError("the need output_gram also needs input_moments (its covariance is centred on the means)")
        self.gram_linears = set(output_projections) if "output_gram" in self.needs else set()
        self.num_windows = num_windows
        self.accumulate_dtype = accumulate_dtype
        self.batch_size = batch_size
        self.input_sum, self.input_sq_sum = Sums(accumulate_dtype), Sums(accumulate_dtype)  # O(width): never sharded
        self.gram_sum = Sums(accumulate_dtype)  # O(width²) per output projection: never sharded
        self.tokens = 0
        self.grad_sum, self.sq_grad_sum = Sums(accumulate_dtype, sharded), Sums(accumulate_dtype, sharded)
        self.rows: dict[tuple[nn.Linear, str], Tensor] = {}
        self.cols: dict[tuple[nn.Linear, str], Tensor] = {}
        self.windows_seen = 0
        self._spent = False
        self._inputs: dict[nn.Linear, Tensor] = {}  # this pass's input of each prunable Linear, until its δ arrives
        self._window_index: list[int | None] = []    # global index of each window of the current batch
        self._real: Tensor | None = None              # which of them weigh (None: all)
        self._handles: list = []                      # the hooks, from begin() to end()
        self._frozen: Frozen | None = None            # the model frozen, from begin() to end()

    @property
    def needs_backward(self) -> bool:
        return bool(self.needs & GRADIENT_NEEDS)

    def accumulate(self, windows: Tensor, indices: Sequence[int | None] | None = None) -> None:
        """Every window, ``batch_size`` at a time, on this process: the plain driver of :meth:`step`
        (a job's estimation runs the same steps in Lightning's loop, :mod:`hywia_lightning.core.estimation_loop`).

        ``indices``: each window's position among all calibration windows (default ``0..N-1``),
        the row its per-window saliency goes to; ``None`` for a zero-weight window."""
        windows = windows.reshape(len(windows), -1) if len(windows) else windows
        indices = list(range(len(windows))) if indices is None else list(indices)
        self.begin(len(windows))
        try:
            for start in range(0, len(windows), self.batch_size):
                self.step(windows[start : start + self.batch_size], indices[start : start + self.batch_size])
        finally:
            self.end()

    def begin(self, total: int, done: int = 0) -> None:
        """Freeze every weight and hook the prunable Linears, until :meth:`end`; ``total`` windows
        will pass (``done`` of them already have, in a resumed estimation)."""
        if self._spent:
            raise RuntimeError("accumulate() after statistics(): the sums were already turned into means")
        self._frozen = Frozen(self.model)  # weight gradients are formed per window by the hooks, never by autograd
        self._handles = [m.register_forward_pre_hook(self._before_linear) for m in self.linears]
        if self.needs_backward:
            self._handles += [m.register_forward_hook(self._after_linear) for m in self.linears]
        self._progress = Progress("estimation", total, unit="window")
        self._progress.update(done)

    def step(self, batch: Tensor, indices: Sequence[int | None]) -> None:
        """One forward (+ backward) of a batch of equally long windows; ``indices`` as in :meth:`accumulate`."""
        if not len(batch):
            return  # a rank with no window contributes zeros to the sums
        device = self.linears[0].weight.device
        batch = batch.to(device)
        self._window_index = list(indices)
        real = [i is not None for i in self._window_index]
        self._real = None if all(real) else torch.tensor(real, device=device)
        try:
            if self.needs_backward:
                # the loss is the mean over equally long windows, so B·loss has window i's own loss as its i-th term
                (language_model_loss(self.model, batch) * len(batch)).backward()
            else:
                with torch.no_grad():
                    self.model(input_ids=batch, use_cache=False)
        finally:
            self._inputs.clear()
        self.windows_seen += sum(real)
        self.tokens += sum(real) * batch.shape[1]
        self._progress.update(len(batch))

    def end(self) -> None:
        """Remove the hooks and give the weights back their ``requires_grad`` and the model its mode."""
        self._inputs.clear()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._frozen is not None:
            self._frozen.restore()
            self._frozen = None

    # -- the sums as a checkpoint's entry -----------------------------------------------------------
    def state(self) -> dict:
        """The sums so far (this rank's shards when sharded) and their counts, keyed by module names:
        what a checkpoint keeps of an estimation stopped between two batches."""
        names = {module: name for name, module in self.model.named_modules()}

        def named(key) -> str:
            return f"{names[key[0]]}:{key[1]}" if isinstance(key, tuple) else names[key]

        return {"windows_seen": self.windows_seen, "tokens": self.tokens,
                **{field: {named(k): v for k, v in self._table(field).items()} for field in STATE_FIELDS}}

    def load_state(self, state: dict) -> None:
        """Continue from :meth:`state` of an estimation of the same model, windows and needs."""
        modules = dict(self.model.named_modules())

        def key(name: str):
            module, _, param = name.partition(":")
            return (modules[module], param) if param else modules[module]

        self.windows_seen, self.tokens = state["windows_seen"], state["tokens"]
        for field in STATE_FIELDS:
            table = self._table(field)
            table.clear()
            table.update({key(name): value for name, value in state[field].items()})

    def _table(self, field: str) -> dict:
        value = getattr(self, field)
        return value.held if isinstance(value, Sums) else value

    def _before_linear(self, module: nn.Linear, args) -> None:
        x = args[0].detach()
        if self.needs_backward:
            if module in self._inputs:  # δᵢᵀxᵢ per call would square partial gradients
                raise RuntimeError(f"{module} ran twice in one forward; per-window gradients need one call per Linear")
            self._inputs[module] = x  # autograd keeps no copy: the weight is frozen
        if "input_moments" in self.needs:
            real = x if self._real is None else x[self._real]
            flat = real.reshape(-1, x.shape[-1]).to(self.accumulate_dtype)
            self.input_sum.add(module, flat.sum(0))
            self.input_sq_sum.add(module, flat.pow(2).sum(0))
            if module in self.gram_linears:
                self.gram_sum.add(module, flat.T @ flat)

    def _after_linear(self, module: nn.Linear, args, output: Tensor) -> Tensor:
        if not output.requires_grad:  # the first prunable Linear: the gradient only needs to reach its output
            output = output.detach().requires_grad_()
        output.register_hook(lambda delta: self._fold_gradient(module, delta))
        return output

    def _fold_gradient(self, module: nn.Linear, delta: Tensor) -> None:
        """Fold the per-window gradients ``δᵢᵀ xᵢ`` (and ``Σ_t δᵢ`` for a bias) into the accumulators,
        then end the batch for this Linear's parameters (sharded: reduce-scatter into the shards)."""
        x = self._inputs.pop(module)
        x = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 2 else x[None]
        delta = delta.reshape(delta.shape[0], -1, delta.shape[-1]) if delta.dim() > 2 else delta[None]
        for i, window in enumerate(self._window_index):
            if window is None:
                continue
            self._fold((module, "weight"), delta[i].T @ x[i], window)
            if module.bias is not None:
                self._fold((module, "bias"), delta[i].sum(0), window)
        for name in ("weight", "bias"):
            param = getattr(module, name)
            for need, sums in (("gradients", self.grad_sum), ("squared_gradients", self.sq_grad_sum)):
                if param is not None and need in self.needs:
                    sums.flush((module, name), param.shape, param.device)

    def _fold(self, key: tuple[nn.Linear, str], grad: Tensor, window: int) -> None:
        grad = grad.to(self.accumulate_dtype)
        if "gradients" in self.needs:
            self.grad_sum.add(key, grad)
        if "squared_gradients" in self.needs:
            self.sq_grad_sum.add(key, grad, squared=True)
        if "window_saliency" in self.needs:
            # the whole weight: inside backward FSDP2 has gathered it into the module
            taylor = getattr(*key).detach().to(self.accumulate_dtype) * grad
            if key not in self.rows:
                self.rows[key] = grad.new_zeros(self.num_windows, grad.shape[0])
                if taylor.dim() == 2:
                    self.cols[key] = grad.new_zeros(self.num_windows, grad.shape[1])
            if taylor.dim() == 2:
                self.rows[key][window] += taylor.sum(1)
                self.cols[key][window] += taylor.sum(0)
            else:
                self.rows[key][window] += taylor

    @property
    def accumulator_bytes(self) -> int:
        """Bytes of ``g`` and ``g²`` this rank holds now (its shards when sharded)."""
        return self.grad_sum.nbytes + self.sq_grad_sum.nbytes

    def statistics(self, all_reduce: Callable[[Tensor], Tensor] | None = None) -> Statistics:
        """Means per parameter and per input feature, summed over all processes by ``all_reduce``
        when given (sharded ``g``/``g²`` stay this rank's :class:`~hywia_lightning.distributed.sharded_sums.Shard`).
        The sums become the means in place (no second copy of the accumulators at the peak), so this
        is called once, after the last :meth:`accumulate`."""
        if self._spent:
            raise RuntimeError("statistics() was already called: the sums were turned into means in place")
        reduce = all_reduce or (lambda t: t)
        windows = int(reduce(torch.tensor(float(self.windows_seen), dtype=torch.float64)).item())
        tokens = int(reduce(torch.tensor(float(self.tokens), dtype=torch.float64)).item())
        if windows == 0:
            raise RuntimeError("importance estimation saw no calibration window")
        self._spent = True
        shards = self.grad_sum.sharded.world_size if self.grad_sum.sharded else 1
        stats = Statistics(windows, accumulator_bytes=self.accumulator_bytes, accumulator_shards=shards)

        def take(sums: dict, key, shape: tuple, device: torch.device) -> Tensor:
            """This rank's rows (zeros for a rank with no window), summed over all ranks."""
            local = sums.pop(key) if key in sums else torch.zeros(shape, dtype=self.accumulate_dtype, device=device)
            return reduce(local)

        for key in self.params:
            p = getattr(*key)  # outside forward and backward: the parameter the unit groups read (FSDP2's sharded one)
            entry = ParameterStatistics()
            if "gradients" in self.needs:
                entry.grad = self.grad_sum.mean(key, p.shape, p.device, windows, reduce)
            if "squared_gradients" in self.needs:
                entry.sq_grad = self.sq_grad_sum.mean(key, p.shape, p.device, windows, reduce)
            if "window_saliency" in self.needs:
                entry.row_saliency = take(self.rows, key, (self.num_windows, p.shape[0]), p.device)
                if p.dim() == 2:
                    entry.col_saliency = take(self.cols, key, (self.num_windows, p.shape[1]), p.device)
            stats.parameters[p] = entry
        if "input_moments" in self.needs:
            for m in self.linears:
                shape, device, count = torch.Size((m.in_features,)), m.weight.device, max(tokens, 1)
                mean = self.input_sum.mean(m, shape, device, count, reduce)
                sq_mean = self.input_sq_sum.mean(m, shape, device, count, reduce)
                gram = (self.gram_sum.mean(m, torch.Size((m.in_features, m.in_features)), device, count, reduce)
                        if m in self.gram_linears else None)
                stats.inputs[m] = InputStatistics(tokens, mean, sq_mean, gram)
        return stats
