"""Layer-wise least-squares reconstruction of the output projections of pruned layers.

For a projection with dense weight ``W`` (``out × n``) whose input lost features, find ``W'``
(``out × k``) with ``W' = argmin ||W X_t − W' X_p||² + λ||W'||²``, where ``X_t`` are the dense
layer's input features (the target is ``W X_t``) and ``X_p`` the kept features the pruned layer
actually sees. With ``G = X_p X_pᵀ`` and ``M = X_t X_pᵀ`` the solution is
``W' = W M (G + λI)⁻¹``, λ = ``damping`` × mean(diag G). Only ``G``, ``M`` and ``X_t X_tᵀ`` are
accumulated, streamed over windows: each window's products in float32 (four times faster than
float64 on a CPU), their running sums in float64. Memory is O(width²) per projection, whatever the
number of windows. The relative output error before and after the refit follows from the same
matrices in closed form.

With ``intercept`` the kept features get a constant 1 appended (``[X_p; 1]``, undamped), so the
refit also finds a bias: FLAP's bias compensation (the mean contribution of the removed features)
is the special case of keeping the weights as they are. A structure pruned to nothing keeps only
that bias.

``prior`` says what the damping pulls the refit toward: ``zero`` (ridge, ``λ||W'||²``) or
``original``, the pruned layer's own sliced weights ``W_S`` (``λ||W' − W_S||²``, so
``W' = (W M + λ W_S)(G + λI)⁻¹``). Why: a few thousand calibration tokens against a thousand
inputs per row let the plain refit fit the calibration text's domain; anchored on the weights the
model was trained to have, the damping trades that fit against staying the model it was, and a
large damping leaves the weights and refits only the bias (FLAP's compensation).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)
PRIORS = ("zero", "original")  # what the damping pulls the refit toward


def check_refit_settings(damping: float, prior: str) -> None:
    """Refuse a damping that is not a number >= 0 and an unknown ``prior`` (the callback, before any
    work, and :func:`solve_refit` share this)."""
    if not damping >= 0:
        raise ValueError(f"damping={damping} must be >= 0 (relative to the mean diagonal of X Xᵀ)")
    if prior not in PRIORS:
        raise ValueError(f"prior={prior!r} is unknown; allowed: {', '.join(PRIORS)}")


class RefitStatistics:
    """Streamed second moments of one projection's target and kept input features."""

    def __init__(self, in_features: int, kept: int, device: torch.device | str = "cpu") -> None:
        self.target_gram = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.cross = torch.zeros(in_features, kept, dtype=torch.float64, device=device)
        self.gram = torch.zeros(kept, kept, dtype=torch.float64, device=device)
        self.target_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.kept_sum = torch.zeros(kept, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, target_features: Tensor, kept_features: Tensor) -> None:
        """Fold one batch of features (``[..., n]`` and ``[..., k]``, same tokens) into the moments."""
        t = target_features.reshape(-1, target_features.shape[-1]).float()
        p = kept_features.reshape(t.shape[0], kept_features.shape[-1]).float()  # explicit rows: k may be 0
        self.target_gram += (t.T @ t).double()
        self.cross += (t.T @ p).double()
        self.gram += (p.T @ p).double()
        self.target_sum += t.sum(0).double()
        self.kept_sum += p.sum(0).double()
        self.tokens += t.shape[0]

    @classmethod
    def from_dense_gram(cls, gram: Tensor, total: Tensor, keep: list[int], tokens: int) -> "RefitStatistics":
        """The independent case: kept features are a subset of the target features (``total``: their sums)."""
        index = torch.tensor(keep, device=gram.device, dtype=torch.long)
        stats = cls.__new__(cls)
        stats.target_gram, stats.cross = gram, gram[:, index]
        stats.gram, stats.tokens = gram[index][:, index], tokens
        stats.target_sum, stats.kept_sum = total, total[index]
        return stats

    def with_intercept(self) -> "RefitStatistics":
        """The moments of ``[X_p; 1]``: the last kept feature is a constant."""
        stats = RefitStatistics.__new__(RefitStatistics)
        n = torch.tensor([float(self.tokens)], dtype=torch.float64, device=self.gram.device)
        stats.target_gram, stats.tokens, stats.target_sum = self.target_gram, self.tokens, self.target_sum
        stats.cross = torch.cat([self.cross, self.target_sum[:, None]], 1)
        stats.gram = torch.cat([torch.cat([self.gram, self.kept_sum[:, None]], 1),
                                torch.cat([self.kept_sum, n])[None]], 0)
        stats.kept_sum = torch.cat([self.kept_sum, n])
        return stats


@dataclass
class RefitResult:
    weight: Tensor            # out × k, in the dense weight's dtype
    bias: Tensor | None       # out, with an intercept
    error_before: float       # ||W X_t − W_sliced X_p||² / ||W X_t||²
    error_after: float        # the same with the refit weight
    condition: float          # condition number of the damped system (estimated from its Cholesky pivots)
    damping: float            # the relative damping finally used
    fallback: str | None      # what was done when the damped system was not positive definite
    seconds: float


def _relative_error(weight: Tensor, candidate: Tensor, stats: RefitStatistics, target_energy: Tensor) -> float:
    # ||W X_t − V X_p||² = tr(W Σ_t Wᵀ) − 2 tr(V Mᵀ Wᵀ) + tr(V G Vᵀ)
    residual = target_energy - 2 * (candidate * (weight @ stats.cross)).sum() + (candidate @ stats.gram * candidate).sum()
    return (residual.clamp_min(0) / target_energy.clamp_min(1e-300)).item()


def solve_refit(
    dense_weight: Tensor, sliced_weight: Tensor, stats: RefitStatistics, damping: float, name: str = "projection",
    max_retries: int = 6, intercept: bool = False, prior: str = "zero",
) -> RefitResult:
    """Closed-form damped least squares, by Cholesky; when the damped system is not positive
    definite the damping grows tenfold per retry, and a pseudo-inverse is the last resort (logged).
    With ``intercept`` a bias is fitted too (the sliced weight's own bias counts as zero); the
    damping pulls toward ``prior`` (``zero`` or the ``original`` sliced weight)."""
    start = time.perf_counter()
    check_refit_settings(damping, prior)
    if intercept:
        stats = stats.with_intercept()
    if stats.tokens == 0:
        raise ValueError(f"reconstruction of {name} saw no calibration token")
    for matrix in (stats.gram, stats.cross, stats.target_gram):
        if not torch.isfinite(matrix).all():
            raise ValueError(
                f"the calibration activations of {name} contain NaN or infinity: the model or its calibration "
                "data is broken; reconstruction cannot proceed"
            )
    w = dense_weight.detach().to(stats.gram.device, torch.float64)
    rhs = w @ stats.cross  # out × k: W M
    sliced = sliced_weight.detach().to(stats.gram.device, torch.float64)
    if intercept:
        sliced = torch.cat([sliced, sliced.new_zeros(len(sliced), 1)], 1)
    k = stats.gram.shape[0]
    if k == 0:  # nothing kept and no intercept: the structure's output is gone
        empty = dense_weight.new_zeros(dense_weight.shape[0], 0)
        return RefitResult(empty, None, 1.0, 1.0, 1.0, damping, None, time.perf_counter() - start)
    diag = stats.gram.diagonal()[: k - 1 if intercept else k]
    scale = diag.mean().clamp_min(1e-12) if len(diag) else torch.tensor(1.0, dtype=torch.float64)
    shrunk = torch.ones(k, dtype=torch.float64, device=stats.gram.device)  # the diagonal of λI, not a k×k eye
    if intercept:
        shrunk[-1] = 0  # the intercept is not shrunk
    fallback, used = None, damping

    def pulled(damping: float) -> Tensor:  # W M + λ W_S: the damping's pull toward the original weights
        return rhs + damping * scale * sliced * shrunk if prior == "original" else rhs

    def damped(damping: float) -> Tensor:  # G + λI, one k×k copy of G
        system = stats.gram.clone()
        system.diagonal().add_(damping * scale * shrunk)
        return system

    for attempt in range(max_retries + 1):
        system = damped(used)
        factor, info = torch.linalg.cholesky_ex(system)
        del system  # only the factor is needed from here
        if info.item() == 0:
            refit = torch.cholesky_solve(pulled(used).T, factor).T
            pivots = factor.diagonal().abs()  # cheap condition estimate: an eigen-decomposition per layer costs seconds
            condition = (pivots.max() / pivots.min().clamp_min(1e-300)).pow(2).item()
            break
        used = max(used * 10, 1e-6)
        fallback = f"damping raised to {used:g}"
    else:
        system = damped(used)
        refit = pulled(used) @ torch.linalg.pinv(system, hermitian=True)
        fallback = f"pseudo-inverse with damping {used:g}"
        eigenvalues = torch.linalg.eigvalsh(system)
        condition = (eigenvalues[-1] / eigenvalues[0].clamp_min(1e-300)).item()
    if fallback:
        log.warning("reconstruction of %s: the damped system was not positive definite; %s", name, fallback)
    target_energy = (w @ stats.target_gram * w).sum()
    error_before = _relative_error(w, sliced, stats, target_energy)
    error_after = _relative_error(w, refit, stats, target_energy)
    bias = None
    if intercept:
        refit, bias = refit[:, :-1], refit[:, -1]
    return RefitResult(
        weight=refit.to(dense_weight.dtype),
        bias=None if bias is None else bias.to(dense_weight.dtype),
        error_before=error_before,
        error_after=error_after,
        condition=condition,
        damping=used,
        fallback=fallback,
        seconds=time.perf_counter() - start,
    )


def dense_grams(projections: dict, run: Callable[[], object], rows: Callable[[], int] | None = None) -> tuple[dict, dict]:
    """``X Xᵀ`` and ``Σ X`` (float64) of the input of every projection (keyed as given) while
    ``run()`` runs them (:meth:`~hywia_lightning.layer_stream.LayerStream.advance`: one layer's);
    ``rows()``: how many leading windows of the batch being run count (the rest is padding)."""
    grams = {name: torch.zeros(p.in_features, p.in_features, dtype=torch.float64, device=p.weight.device)
             for name, p in projections.items()}
    sums = {name: torch.zeros(p.in_features, dtype=torch.float64, device=p.weight.device)
            for name, p in projections.items()}

    def hook(name):
        def accumulate(module, args):
            x = args[0] if rows is None else args[0][:rows()]
            x = x.reshape(-1, x.shape[-1]).float()
            grams[name] += (x.T @ x).double()
            sums[name] += x.sum(0).double()
        return accumulate

    handles = [p.register_forward_pre_hook(hook(name)) for name, p in projections.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return grams, sums


def sequential_statistics(
    run: Callable[[], object], pruned_block: torch.nn.Module, dense_block: torch.nn.Module, projection: str,
    rows: Callable[[], int] | None = None,
) -> RefitStatistics:
    """Moments for one block (a layer's attention or MLP) whose earlier layers are already pruned
    and refit: the target is the dense block applied to the same (pruned-path) input. ``run``
    runs the block's layer over every calibration window (a :class:`LayerStream`); ``rows()``: how
    many leading windows of the batch being run count (the rest is padding), as in :func:`dense_grams`."""
    pruned_proj, dense_proj = getattr(pruned_block, projection), getattr(dense_block, projection)
    stats = RefitStatistics(dense_proj.in_features, pruned_proj.in_features, pruned_proj.weight.device)
    target: list[Tensor] = []

    def run_dense(module, args, kwargs):
        dense_block(*args, **kwargs)

    def keep_target(module, args):
        target.append(args[0])

    def real(x: Tensor) -> Tensor:
        return x if rows is None else x[:rows()]

    def fold(module, args):
        stats.add(real(target.pop()), real(args[0]))

    def fold_nothing_kept(module, args, output):  # a structure pruned to nothing never calls its projection
        stats.add(real(target[-1]), real(target.pop())[..., :0])

    handles = [
        pruned_block.register_forward_pre_hook(run_dense, with_kwargs=True),
        dense_proj.register_forward_pre_hook(keep_target),
        pruned_proj.register_forward_pre_hook(fold) if pruned_proj.in_features
        else pruned_block.register_forward_hook(fold_nothing_kept),
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return stats
