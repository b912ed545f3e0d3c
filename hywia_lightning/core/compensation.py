"""What a least-squares refit cannot recover: the output error left by keeping some input features.

A structure writes ``y = x Wᵀ`` back into the residual stream. Keep only the features ``K`` and
refit the weights (and a bias) by least squares over the calibration tokens: the error left is

    E(K) = tr(W H Wᵀ) − tr(W H_:K H_KK⁻¹ H_K: Wᵀ),   H = Σ + λ·mean(diag Σ)·I,

with ``Σ`` the features' covariance (the bias absorbs their means) and ``λ`` a damping that keeps
``H_KK`` invertible from a few thousand tokens. :class:`~hywia_lightning.core.granularities.OBS` ranks
units by the greedy path of ``E``; the ``compensated`` HyWIA fusion picks, per group, the blend
whose kept units have the lowest ``E``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def damped(covariance: Tensor, damping: float) -> Tensor:
    """``H = Σ + λ·mean(diag Σ)·I`` in float64."""
    sigma = covariance.double()
    return sigma + damping * sigma.diagonal().mean().clamp_min(1e-12) * torch.eye(len(sigma), dtype=sigma.dtype)


def compensated_error(weight_t: Tensor, h: Tensor, keep: list[int] | Tensor) -> float:
    """``E(K)`` for ``weight_t = Wᵀ`` (``[in, out]``), ``h`` from :func:`damped` and kept features ``keep``."""
    weight_t = weight_t.double()
    total = float(((h @ weight_t) * weight_t).sum())
    keep = torch.as_tensor(keep, dtype=torch.long)
    if keep.numel() == 0:
        return total
    cross = h[keep] @ weight_t                                          # [k, out]
    solved = torch.cholesky_solve(cross, torch.linalg.cholesky(h[keep][:, keep]))
    return total - float((cross * solved).sum())
