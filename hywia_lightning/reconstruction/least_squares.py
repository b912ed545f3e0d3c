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

``damping`` may also be a list of candidates, chosen per projection by held-out windows
(:func:`choose_damping`): the windows are split into folds, the refit is solved for each candidate on
all folds but one and its output error measured on the one left out, and the candidate with the
least held-out error over all folds is solved on every window. Why: how much a projection's refit
overfits its calibration tokens depends on its width and on how much it lost, so one damping for
every layer is either too weak for the widest or too strong for the narrowest; held-out windows
measure it without any data but the calibration's. The moments are sums, so each fold's training
moments (``G`` and ``W M``) are the total's minus the fold's: one pass over the windows, the
moments held once per fold.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)
PRIORS = ("zero", "original")  # what the damping pulls the refit toward
MOMENTS = ("target_gram", "cross", "gram", "target_sum", "kept_sum")  # RefitStatistics' summed tensors


def check_refit_settings(damping: float | Sequence[float], prior: str, folds: int = 1) -> None:
    """Refuse a damping that is not a number >= 0 (or a list of two or more), a ``folds`` that cannot
    hold out a window, and an unknown ``prior`` (the callback, before any work, and :func:`solve_refit`
    share this)."""
    candidates = list(damping) if isinstance(damping, (list, tuple)) else [damping]
    if isinstance(damping, (list, tuple)) and len(candidates) < 2:
        raise ValueError(f"damping={list(damping)}: a list holds the candidates to choose from by held-out windows, "
                         "at least two; give one number for a fixed damping")
    if not all(value >= 0 for value in candidates):
        which = "every value, " if len(candidates) > 1 else ""
        raise ValueError(f"damping={damping} must be >= 0 ({which}relative to the mean diagonal of X Xᵀ)")
    if len(candidates) > 1 and folds < 2:
        raise ValueError(f"folds={folds}: choosing the damping from {candidates} needs at least 2 folds of windows")
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
    def total(cls, parts: Sequence["RefitStatistics"]) -> "RefitStatistics":
        """The moments of every part's tokens together."""
        stats = cls.__new__(cls)
        for name in MOMENTS:
            setattr(stats, name, sum(getattr(p, name) for p in parts[1:]) + getattr(parts[0], name))
        stats.tokens = sum(p.tokens for p in parts)
        return stats

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
    heldout: dict[float, float] | None = None  # a chosen damping: each candidate's held-out relative error
    judged_kl: dict[float, float] | None = None  # a damping chosen by the KL: each candidate's KL to the dense model


@dataclass
class _Target:
    """What the output error of any candidate ``V`` on a set of tokens needs of the dense weight
    ``W``: ``W M`` and ``||W X_t||² = tr(W Σ_t Wᵀ)``, each an ``out × n × n`` product, so taken once."""

    weight_cross: Tensor      # W M, out × k
    energy: Tensor

    @classmethod
    def of(cls, weight: Tensor, stats: RefitStatistics) -> "_Target":
        return cls(weight @ stats.cross, (weight @ stats.target_gram * weight).sum())

    def residual(self, candidate: Tensor, gram: Tensor) -> Tensor:
        """``||W X_t − V X_p||² = tr(W Σ_t Wᵀ) − 2 tr(V Mᵀ Wᵀ) + tr(V G Vᵀ)``."""
        return (self.energy - 2 * (candidate * self.weight_cross).sum() + (candidate @ gram * candidate).sum()).clamp_min(0)

    def relative_error(self, candidate: Tensor, gram: Tensor) -> float:
        return (self.residual(candidate, gram) / self.energy.clamp_min(1e-300)).item()


@dataclass
class _Fit:
    refit: Tensor             # out × k (with an intercept: its last column is the bias), float64
    damping: float
    fallback: str | None
    condition: float


def _checked(stats: RefitStatistics, intercept: bool, name: str) -> RefitStatistics:
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
    return stats


def _fit(rhs: Tensor, gram: Tensor, sliced: Tensor, damping: float, intercept: bool, prior: str,
         max_retries: int = 6) -> _Fit:
    """The damped least squares ``V G = W M`` in float64 (``rhs``: ``W M``; with an intercept ``G``
    has its row and ``sliced``, the pulled-toward weights, its column)."""
    k = gram.shape[0]
    diag = gram.diagonal()[: k - 1 if intercept else k]
    scale = diag.mean().clamp_min(1e-12) if len(diag) else torch.tensor(1.0, dtype=torch.float64)
    shrunk = torch.ones(k, dtype=torch.float64, device=gram.device)  # the diagonal of λI, not a k×k eye
    if intercept:
        shrunk[-1] = 0  # the intercept is not shrunk
    fallback, used = None, damping

    def pulled(damping: float) -> Tensor:  # W M + λ W_S: the damping's pull toward the original weights
        return rhs + damping * scale * sliced * shrunk if prior == "original" else rhs

    def damped(damping: float) -> Tensor:  # G + λI, one k×k copy of G
        system = gram.clone()
        system.diagonal().add_(damping * scale * shrunk)
        return system

    for attempt in range(max_retries + 1):
        system = damped(used)
        factor, info = torch.linalg.cholesky_ex(system)
        del system  # only the factor is needed from here
        if info.item() == 0:
            refit = torch.cholesky_solve(pulled(used).T, factor).T
            pivots = factor.diagonal().abs()  # cheap condition estimate: an eigen-decomposition per layer costs seconds
            return _Fit(refit, used, fallback, (pivots.max() / pivots.min().clamp_min(1e-300)).pow(2).item())
        used = max(used * 10, 1e-6)
        fallback = f"damping raised to {used:g}"
    system = damped(used)
    refit = pulled(used) @ torch.linalg.pinv(system, hermitian=True)
    eigenvalues = torch.linalg.eigvalsh(system)
    return _Fit(refit, used, f"pseudo-inverse with damping {used:g}", (eigenvalues[-1] / eigenvalues[0].clamp_min(1e-300)).item())


def _float64(dense_weight: Tensor, sliced_weight: Tensor, device: torch.device, intercept: bool) -> tuple[Tensor, Tensor]:
    w = dense_weight.detach().to(device, torch.float64)
    sliced = sliced_weight.detach().to(device, torch.float64)
    if intercept:
        sliced = torch.cat([sliced, sliced.new_zeros(len(sliced), 1)], 1)
    return w, sliced


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
    stats = _checked(stats, intercept, name)
    if stats.gram.shape[0] == 0:  # nothing kept and no intercept: the structure's output is gone
        empty = dense_weight.new_zeros(dense_weight.shape[0], 0)
        return RefitResult(empty, None, 1.0, 1.0, 1.0, damping, None, time.perf_counter() - start)
    w, sliced = _float64(dense_weight, sliced_weight, stats.gram.device, intercept)
    target = _Target.of(w, stats)
    fit = _fit(target.weight_cross, stats.gram, sliced, damping, intercept, prior, max_retries)
    if fit.fallback:
        log.warning("reconstruction of %s: the damped system was not positive definite; %s", name, fit.fallback)
    error_before = target.relative_error(sliced, stats.gram)
    error_after = target.relative_error(fit.refit, stats.gram)
    refit, bias = (fit.refit[:, :-1], fit.refit[:, -1]) if intercept else (fit.refit, None)
    return RefitResult(
        weight=refit.to(dense_weight.dtype),
        bias=None if bias is None else bias.to(dense_weight.dtype),
        error_before=error_before,
        error_after=error_after,
        condition=fit.condition,
        damping=fit.damping,
        fallback=fit.fallback,
        seconds=time.perf_counter() - start,
    )


def choose_damping(
    dense_weight: Tensor, sliced_weight: Tensor, folds: Sequence[RefitStatistics], candidates: Sequence[float],
    name: str = "projection", intercept: bool = False, prior: str = "zero",
) -> RefitResult:
    """The refit on every fold's tokens with the candidate damping whose refits, each solved without
    one fold, leave the least output error on the fold left out (summed over folds, relative to
    the target's energy there); ties go to the larger damping (the model as it was). The result's
    ``heldout`` holds each candidate's held-out error."""
    start = time.perf_counter()
    check_refit_settings(list(candidates), prior, len(folds))
    total = RefitStatistics.total(folds)
    whole = _checked(total, intercept, name)
    if whole.gram.shape[0] == 0:
        return solve_refit(dense_weight, sliced_weight, total, max(candidates), name, intercept=intercept, prior=prior)
    w, sliced = _float64(dense_weight, sliced_weight, whole.gram.device, intercept)
    whole_cross = w @ whole.cross
    residual, energy = dict.fromkeys(map(float, candidates), 0.0), 0.0
    for f, part in enumerate(folds):  # one fold's held-out and training moments at a time
        held = _checked(part, intercept, f"{name} (fold {f})")
        target = _Target.of(w, held)
        train_cross, train_gram = whole_cross - target.weight_cross, whole.gram - held.gram
        for damping in residual:
            refit = _fit(train_cross, train_gram, sliced, damping, intercept, prior).refit
            residual[damping] += target.residual(refit, held.gram).item()
        energy += target.energy.item()
        del held, target, train_cross, train_gram
    heldout = {damping: r / max(energy, 1e-300) for damping, r in residual.items()}
    best = min(heldout.values())
    chosen = max(d for d, error in heldout.items() if error == best)
    result = solve_refit(dense_weight, sliced_weight, total, chosen, name, intercept=intercept, prior=prior)
    result.heldout, result.seconds = heldout, time.perf_counter() - start
    return result


def dense_grams(projections: dict, run: Callable[[], object], rows: Callable[[], int] | None = None) -> tuple[dict, dict]:
    """``X Xᵀ`` and ``Σ X`` (float64) of the input of every projection (keyed as given) while
    ``run()`` runs them (:meth:`~hywia_lightning.reconstruction.layer_stream.LayerStream.advance`: one layer's);
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
    window_ids: Callable[[], Tensor] | None = None, folds: int = 1,
) -> list[RefitStatistics]:
    """Moments for one block (a layer's attention or MLP) whose earlier layers are already pruned
    and refit: the target is the dense block applied to the same (pruned-path) input. ``run``
    runs the block's layer over every calibration window (a :class:`LayerStream`). One set of moments
    per fold: window ``i`` goes to fold ``i % folds``, ``window_ids()`` giving the ids of the windows
    of the batch being run (:attr:`LayerStream.batch_ids`; −1: padding, left out), ``None``: every
    window in fold 0."""
    pruned_proj, dense_proj = getattr(pruned_block, projection), getattr(dense_block, projection)
    parts = [RefitStatistics(dense_proj.in_features, pruned_proj.in_features, pruned_proj.weight.device)
             for _ in range(folds)]
    target: list[Tensor] = []

    def run_dense(module, args, kwargs):
        dense_block(*args, **kwargs)

    def keep_target(module, args):
        target.append(args[0])

    def add(target_features: Tensor, kept_features: Tensor) -> None:
        ids = None if window_ids is None else window_ids()
        if ids is None or (folds == 1 and bool((ids >= 0).all())):  # every window of the batch in the one fold
            parts[0].add(target_features, kept_features)
            return
        for f, part in enumerate(parts):
            rows = ((ids >= 0) & (ids % folds == f)).nonzero().flatten().to(target_features.device)
            if len(rows):
                part.add(target_features[rows], kept_features[rows])

    def fold(module, args):
        add(target.pop(), args[0])

    def fold_nothing_kept(module, args, output):  # a structure pruned to nothing never calls its projection
        add(target[-1], target.pop()[..., :0])

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
    return parts
