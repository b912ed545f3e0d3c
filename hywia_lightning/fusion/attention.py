"""Hybrid-grained importance: normalization, layer features and the learnable fusion attention.

Scores of different granularities live on different scales (Vector can be 0 where Element¹ is
large), so each is first normalized within its group to a *standardized log score*:
``z = (log(s + ε) − mean) / std`` with ε = 10⁻⁶·mean(s). Standardized logs are comparable across
granularities and layers, robust to heavy tails, and keep the order of every scheme.

The fusion then blends the z-scores of one group with weights ``w = softmax(q·k_s/√d)``: the query
``q`` comes from the group's features (relative depth, structure type, the agreement between
granularities), the key ``k_s`` of granularity ``s`` from a learned embedding plus the statistics
of that granularity's scores in this group (dispersion, skew, top-decile mass). It starts as the
uniform blend (zero-initialized keys) and learns per layer which grain to trust.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

SCHEME_FEATURES = 3  # per granularity: dispersion of log scores, skew of z, top-decile mass


def _logs(scores: Tensor) -> Tensor:
    s = scores.double().clamp_min(0)
    return torch.log(s + 1e-6 * s.mean(-1, keepdim=True).clamp_min(1e-30) + 1e-30)


def standardized_log(scores: Tensor) -> Tensor:
    """Scores of one granularity in one group → zero mean, unit variance log scores."""
    logs = _logs(scores)
    return (logs - logs.mean()) / logs.std(unbiased=False).clamp_min(1e-12)


def standardize_across_groups(groups: list["GroupScores"]) -> None:
    """Re-normalize every scheme's log scores over all groups of one structure kind together (not
    per group), so fused scores keep how layers differ: what a global allocation compares."""
    for kind in {g.kind for g in groups}:
        members = [g for g in groups if g.kind == kind]
        for s in range(members[0].raw.shape[0]):
            logs = [_logs(g.raw[s]) for g in members]
            flat = torch.cat(logs)
            mean, std = flat.mean(), flat.std(unbiased=False).clamp_min(1e-12)
            for g, values in zip(members, logs):
                g.normalized[s] = (values - mean) / std


@dataclass
class GroupScores:
    """Every granularity's scores of one group, and what the fusion needs to know about them."""

    name: str
    kind: str           # "attention" or "mlp"
    depth: float        # layer / (num_layers − 1)
    raw: Tensor         # S × U
    normalized: Tensor  # S × U standardized log scores

    @classmethod
    def build(cls, name: str, kind: str, layer: int, num_layers: int, raw: list[Tensor]) -> "GroupScores":
        stacked = torch.stack([r.detach().double().cpu() for r in raw])  # small; the fusion works on the CPU
        return cls(name, kind, layer / max(num_layers - 1, 1), stacked, torch.stack([standardized_log(r) for r in stacked]))

    def shared_features(self) -> Tensor:
        """Query input: depth, structure type, and pairwise agreement (correlation of z-scores)."""
        z = self.normalized
        corr = (z @ z.T) / z.shape[1]
        upper = torch.triu_indices(z.shape[0], z.shape[0], offset=1)
        kind = [1.0, 0.0] if self.kind == "attention" else [0.0, 1.0]
        return torch.cat([torch.tensor([self.depth, *kind], dtype=torch.float64), corr[upper[0], upper[1]]]).float()

    def scheme_features(self) -> Tensor:
        """Key inputs, one row per granularity: dispersion, skew, top-decile mass."""
        logs = torch.log(self.raw.clamp_min(0) + 1e-6 * self.raw.mean(1, keepdim=True).clamp_min(1e-30) + 1e-30)
        dispersion = logs.std(1, unbiased=False)
        skew = self.normalized.pow(3).mean(1)
        top = max(1, self.raw.shape[1] // 10)
        share = self.raw.clamp_min(0) / self.raw.clamp_min(0).sum(1, keepdim=True).clamp_min(1e-30)
        top_mass = share.topk(top, dim=1).values.sum(1)
        return torch.stack([dispersion / 10, skew / 10, top_mass], dim=1).float()


class FusionAttention(nn.Module):
    """One query per group attends over one key per granularity; the softmax weights blend z-scores."""

    def __init__(self, num_schemes: int, width: int = 16) -> None:
        super().__init__()
        if num_schemes < 2:
            raise ValueError(f"the fusion needs at least two granularities to blend; got {num_schemes}")
        shared_dim = 3 + num_schemes * (num_schemes - 1) // 2
        self.width = width
        self.query = nn.Sequential(nn.Linear(shared_dim, width), nn.Tanh(), nn.Linear(width, width))
        self.key_embedding = nn.Parameter(torch.zeros(num_schemes, width))
        self.key_features = nn.Linear(SCHEME_FEATURES, width)
        nn.init.zeros_(self.key_features.weight)
        nn.init.zeros_(self.key_features.bias)

    def weights(self, shared: Tensor, schemes: Tensor) -> Tensor:
        """``shared`` G × F_shared, ``schemes`` G × S × F_scheme → blend weights G × S."""
        q = self.query(shared)
        k = self.key_embedding + self.key_features(schemes)
        return (torch.einsum("gsw,gw->gs", k, q) / math.sqrt(self.width)).softmax(-1)

    def forward(self, shared: Tensor, schemes: Tensor, normalized: list[Tensor]) -> list[Tensor]:
        """Fused importance of every group (``normalized[g]`` is S × U_g)."""
        w = self.weights(shared, schemes)
        return [w[g].to(z.dtype) @ z for g, z in enumerate(normalized)]


def fuse(weights: Tensor, normalized: Tensor) -> Tensor:
    """Blend one group's S × U z-scores with S weights."""
    return weights.to(normalized.dtype) @ normalized
