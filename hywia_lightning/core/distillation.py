"""The distillation objective: how far a model's next-token distributions are from the dense model's.

``KL(p_dense ‖ q_model)`` at a temperature, averaged over every next-token position of a set of
token windows. Why: the output error of one layer on calibration text (what the refit minimizes)
can be fitted to that text; the dense model's whole distribution at every position is what a pruned
model should keep, and it is what the frontier (Týr-the-Pruner) chooses widths by.

The teacher is stored once, before pruning, as its top-``k`` log-probabilities per position plus one
bucket for the rest of its mass (:class:`TeacherTargets`): a few MB instead of the vocabulary's
logits per token. The KL is then the exact KL of the two distributions coarsened to those ``k + 1``
outcomes, a lower bound of the full KL (coarsening never raises a KL) that misses how the student
spreads the teacher's remaining mass. What that costs, measured on the bundled model's 20% and 50%
prunings (8 held-out WikiText-2 windows): ``k = 64`` keeps 80% and 85% of the full KL (0.344 of
0.429, 1.349 of 1.587), ``k = 256`` 90% and 93%, ``k = 16`` 67% and 74%: a bound that moves with
the full KL, which is what a choice between candidates needs. The windows must be disjoint from
those that gave the statistics and the refit
(:meth:`~hywia_lightning.data.calibration.CalibrationData.held_out_windows`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jsonargparse.typing import PositiveInt
from torch import Tensor, nn

from ..reconstruction.layer_stream import LayerStream

REST_FLOOR = -40.0  # the student's rest bucket's log-mass is taken as at least this (a smaller KL: still a bound)


@dataclass
class Distillation:
    """The distillation objective's keys (a pruning job's ``distillation`` group)."""

    windows: PositiveInt = 32
    """Held-out windows of the calibration source, disjoint from the calibration windows."""
    top_k: PositiveInt = 64
    """Teacher log-probabilities kept per position (the rest of its mass is one bucket)."""
    batch_size: PositiveInt = 8
    """Windows per forward pass."""


@dataclass
class TeacherTargets:
    """The teacher's distribution at every position of ``[n, seq_len]`` windows, top-k plus a bucket."""

    indices: Tensor        # [n, seq_len, k] token ids, most probable first
    log_probs: Tensor      # [n, seq_len, k] their log-probabilities
    rest_log_prob: Tensor  # [n, seq_len] log of the mass outside the top k
    temperature: float = 1.0

    def __getitem__(self, rows: slice) -> "TeacherTargets":
        return TeacherTargets(self.indices[rows], self.log_probs[rows], self.rest_log_prob[rows], self.temperature)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.indices, self.log_probs, self.rest_log_prob))


def _log1mexp(log_mass: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x ≤ 0``, stable at both ends; −inf where the mass is all there."""
    x = log_mass.clamp(max=0.0)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def top_k_targets(logits: Tensor, top_k: int, temperature: float = 1.0) -> TeacherTargets:
    """The teacher's top-``k`` log-probabilities of ``logits`` (``[..., vocab]``) and its rest."""
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    values, indices = log_probs.topk(min(top_k, log_probs.shape[-1]), dim=-1)
    return TeacherTargets(indices, values, _log1mexp(values.logsumexp(-1)), temperature)


def kl_per_position(logits: Tensor, teacher: TeacherTargets) -> Tensor:
    """``KL(p ‖ q)`` of the coarsened distributions at every position (``[..., seq_len]``)."""
    log_q = torch.log_softmax(logits.float() / teacher.temperature, dim=-1)
    log_q_top = log_q.gather(-1, teacher.indices.to(log_q.device))
    log_p_top = teacher.log_probs.to(log_q.device)
    kl = (log_p_top.exp() * (log_p_top - log_q_top)).sum(-1)
    log_p_rest = teacher.rest_log_prob.to(log_q.device)
    log_q_rest = _log1mexp(log_q_top.logsumexp(-1)).clamp_min(REST_FLOOR)  # float32 rounding can leave no rest
    rest = torch.where(log_p_rest > -math.inf, log_p_rest.exp() * (log_p_rest - log_q_rest), torch.zeros_like(kl))
    return (kl + rest).clamp_min(0.0)


def kl_to_logits(logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``KL(p_teacher ‖ q)`` of the full distributions at every position (``[..., seq_len]``), at
    ``temperature`` and scaled by its square (so the gradient's size does not depend on it, as in
    Hinton et al., 2015). What training against a teacher that runs beside the student minimizes;
    :func:`kl_per_position` is its coarsening to a stored teacher's top ``k``."""
    with torch.no_grad():  # the teacher's side: only its probabilities are kept for the backward
        log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
        p = log_p.exp()
        entropy_term = (p * log_p).sum(-1)
        del log_p
    log_q = torch.log_softmax(logits.float() / temperature, dim=-1)
    return (entropy_term - (p * log_q).sum(-1)) * temperature**2


def hidden_state_error(student: Tensor, teacher: Tensor) -> Tensor:
    """The squared distance of the student's hidden states to the teacher's at every position
    (``[..., seq_len]``), relative to the teacher's squared norm there: scale-free, so that neither
    a layer with a larger residual stream nor a position with massive activations (the first token's)
    outweighs the others. The intermediate-state term of Minitron's distillation (Muralidharan et
    al., 2024, arXiv 2407.14679) with a per-position normalization instead of a learned projection
    (the pruned model keeps the hidden size)."""
    teacher = teacher.float()
    return (student.float() - teacher).pow(2).sum(-1) / teacher.pow(2).sum(-1).clamp_min(1e-12)


def model_logits(model: nn.Module, batch: Tensor) -> Tensor:
    device = next(model.parameters()).device
    return model(input_ids=batch.to(device), use_cache=False).logits


@torch.no_grad()
def teacher_targets(model: nn.Module, windows: Tensor, top_k: int, batch_size: int = 8,
                    temperature: float = 1.0) -> TeacherTargets:
    """The (dense) ``model``'s targets on ``windows``, computed in batches, kept on the CPU."""
    parts = [top_k_targets(model_logits(model, batch), top_k, temperature) for batch in windows.split(batch_size)]
    return TeacherTargets(torch.cat([p.indices.cpu() for p in parts]), torch.cat([p.log_probs.cpu() for p in parts]),
                          torch.cat([p.rest_log_prob.cpu() for p in parts]), temperature)


@torch.no_grad()
def kl_per_window(model: nn.Module, windows: Tensor, teacher: TeacherTargets, batch_size: int = 8) -> Tensor:
    """The mean KL to the teacher over the positions of each window (``[n]``)."""
    was_training = model.training
    model.eval()
    parts = []
    try:
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            parts.append(kl_per_position(model_logits(model, batch), teacher[start : start + len(batch)]).mean(-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(parts)


@dataclass
class DistillationSet:
    """Held-out windows and the dense model's targets on them: what every choice can be scored by."""

    windows: Tensor
    teacher: TeacherTargets
    batch_size: int = 8

    @classmethod
    def of(cls, dense: nn.Module, windows: Tensor, top_k: int, batch_size: int = 8) -> "DistillationSet":
        return cls(windows, teacher_targets(dense, windows, top_k, batch_size), batch_size)

    def __getitem__(self, rows: slice) -> "DistillationSet":
        return DistillationSet(self.windows[rows], self.teacher[rows], self.batch_size)

    def __len__(self) -> int:
        return len(self.windows)

    def kl_per_window(self, model: nn.Module) -> Tensor:
        return kl_per_window(model, self.windows, self.teacher, self.batch_size)

    def kl(self, model: nn.Module) -> float:
        """The mean KL over every position of every window."""
        return float(self.kl_per_window(model).double().mean())

    def describe(self) -> dict:
        return {"windows": len(self.windows), "tokens": self.windows.numel(),
                "top_k": self.teacher.indices.shape[-1], "teacher_bytes": self.teacher.nbytes}


class PartialKL:
    """The KL over a distillation set from any decoder layer's cached inputs on: what a choice made
    at one layer costs end to end, without running the layers before it again.

    ``inputs[i]`` are the set's hidden states at layer ``i``'s input (batches as
    :class:`~hywia_lightning.reconstruction.layer_stream.LayerStream` caches them). :meth:`full`
    runs every layer from ``first`` and caches each one's inputs (the width search measures
    candidates of every layer around one state); :meth:`reach` keeps only the frontier, for a
    caller that makes its layers final one after another (the refit's judge). Sums, not means, so
    that ranks holding parts of a set add them up (:attr:`positions` is the denominator).
    """

    def __init__(self, model: nn.Module, distill: DistillationSet, first: int, batch_size: int = 8) -> None:
        self.model, self.teacher = model, distill.teacher
        self.positions = distill.windows.numel()
        self.end = model.config.num_hidden_layers
        self.stream = LayerStream(model, distill.windows, first, self.end - 1, batch_size)
        self.inputs: dict[int, list[Tensor]] = {first: [h.clone() for h in self.stream.hidden]}

    def full(self) -> float:
        """Every layer from the first one, caching each layer's inputs for :meth:`from_layer`."""
        first = min(self.inputs)
        self.stream.restart(first, self.inputs[first])
        for layer in range(first, self.end):
            self.inputs[layer] = [h.clone() for h in self.stream.hidden]
            self.stream.advance()
        return self._kl_sum()

    def from_layer(self, layer: int) -> float:
        """The summed KL with every layer from ``layer`` on run again (the ones before as cached)."""
        self.stream.restart(layer, self.inputs[layer])
        for _ in range(layer, self.end):
            self.stream.advance()
        return self._kl_sum()

    def reach(self, layer: int) -> None:
        """Every layer before ``layer`` is final: move the cached inputs up to ``layer``'s (and drop
        those of the layers before)."""
        while (frontier := min(self.inputs)) < layer:
            self.stream.restart(frontier, self.inputs.pop(frontier))
            self.stream.advance()
            self.inputs[frontier + 1] = [h.clone() for h in self.stream.hidden]

    @torch.no_grad()
    def _kl_sum(self) -> float:
        total, start = 0.0, 0
        for hidden in self.stream.hidden:
            logits = self.model.lm_head(self.model.model.norm(hidden))
            total += float(kl_per_position(logits, self.teacher[start : start + len(hidden)]).sum())
            start += len(hidden)
        return total
