"""Reconstruction modes: when the refit's moments are taken, as small strategy classes.

Both refit the output projection of every pruned structure (``o_proj`` of attention that lost
heads, ``down_proj`` of an MLP that lost channels) with :func:`solve_refit`:

- :class:`Independent`: every layer sees the dense model's activations; before slicing, the dense
  layers run one at a time over the windows' cached hidden states (:class:`LayerStream`), each
  layer's ``X Xᵀ`` solved and dropped before the next (one layer's Gram matrices at a time), the
  solutions assigned after slicing.
- :class:`Sequential`: layer after layer, each structure (attention, then MLP) is calibrated on the
  inputs produced by the already pruned and refit earlier ones, against the dense structure applied
  to those same inputs; it keeps a copy of the dense pruned-range blocks meanwhile, and the
  windows' hidden states are carried from layer to layer (:class:`LayerStream`), so it costs
  about three forward passes of the pruned range in all.

With FSDP2-sharded weights (``StructuredPruning.shard_weights``) the model is sharded before and
after slicing (:func:`~hywia_lightning.distributed.gathered_slicing.sharded_pruned`), and every rank pads its
windows to one count (each layer call is a collective; the padding is left out of the moments).
:class:`Independent` gathers each projection's weight for its solve and keeps only this rank's rows
of each refit until slicing, which gathers them one layer at a time and writes them into the pruned
layer while it is whole (:meth:`ReconstructionMode.prepare_layer`): so no rank holds every layer's
refit whole, and the refit needs no parameter FSDP2 did not shard. :class:`Sequential`'s dense
copies stay sharded until each structure's turn; slicing gives each pruned structure's output
projection a zero bias where an intercept will be fitted (FSDP2 takes no new parameter later), and
each refit is written into the pruned shards (:func:`~hywia_lightning.distributed.sharded_model.write_full`).

A damping given as a list of candidates is chosen per structure by held-out windows
(:func:`~hywia_lightning.reconstruction.least_squares.choose_damping`), in :class:`Sequential` mode: its moments
are taken per structure, so one fold's moments per structure is all it holds more.

:class:`Sequential` can judge the candidates by the pruned model's KL to the dense model instead
(:attr:`ReconstructionMode.judge`, held-out windows the refit never sees): each candidate refit is
put in place and the judge windows run from that layer on, through the dense structures of every
layer not refit yet, so the choice weighs what the structure does to the model's next-token
distributions, not to its own output on the calibration text.

A new mode subclasses :class:`ReconstructionMode`, overrides the two hooks, and is named by its
import path in the reconstruction stage's ``mode`` (:func:`reconstruction_mode`); one that chooses
by :attr:`ReconstructionMode.judge` sets ``judges_by_kl`` (``choose_by: kl`` is refused otherwise).
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from jsonargparse.typing import import_object
from torch import Tensor, nn

from ..core.distillation import DistillationSet, PartialKL
from ..core.plan import PruningPlan, unit_indices
from ..core.slicing import record_layer_widths
from ..core.structures import LayerStructures, decoder_layers, discover_structures
from ..core.unit_groups import MODULE_NAME, GroupKey
from ..distributed.sharded_model import (
    full_weight, gather_module, has_sharded_weights, is_sharded, keep_sharded_like, write_full,
)
from ..progress import Progress
from .layer_stream import LayerStream
from .least_squares import (
    MOMENTS, RefitResult, RefitStatistics, choose_damping, dense_grams, sequential_statistics, solve_refit,
)

log = logging.getLogger(__name__)
Reduce = Callable[[Tensor], Tensor]


def pruned_structures(plan: PruningPlan) -> list[GroupKey]:
    """The structures of the plan that lose units, layer by layer, attention before MLP."""
    keys = []
    for i in sorted(plan.layers):
        if plan.layers[i].heads is not None:
            keys.append(GroupKey(i, "attention"))
        if plan.layers[i].channels is not None:
            keys.append(GroupKey(i, "mlp"))
    return keys


PROJECTION = {"attention": "o_proj", "mlp": "down_proj"}  # each structure's refit output projection


def output_projection(s: LayerStructures, kind: str) -> nn.Linear:
    return s.attention.o_proj if kind == "attention" else s.mlp.down_proj


def layer_projection(layer: nn.Module, kind: str) -> nn.Linear:
    """A decoder layer's output projection of structure ``kind``."""
    return getattr(getattr(layer, MODULE_NAME[kind]), PROJECTION[kind])


def kept_inputs(s: LayerStructures, plan: PruningPlan, kind: str) -> list[int]:
    """The output projection's input features the plan keeps."""
    layer = plan.layers[s.layer]
    return unit_indices(layer.heads, s.attention.head_dim) if kind == "attention" else layer.channels


def assign(linear: nn.Linear, result: RefitResult) -> None:
    """Write a refit into a (sliced) projection; an intercept becomes (or adds to) its bias. Into
    FSDP2's shards where the projection is sharded (its bias must exist: FSDP2 takes no new one)."""
    if linear.weight.shape != result.weight.shape:
        raise RuntimeError(f"refit weight {tuple(result.weight.shape)} does not fit {tuple(linear.weight.shape)}")
    if is_sharded(linear.weight):
        write_full(linear.weight, result.weight)
        if result.bias is not None:
            if linear.bias is None:
                raise RuntimeError("a sharded projection has no bias to take the refit's intercept: slicing gives "
                                   "it one (ReconstructionMode.prepare_layer)")
            write_full(linear.bias, result.bias.to(linear.bias.device) + full_weight(linear.bias))
        return
    with torch.no_grad():
        linear.weight.copy_(result.weight.to(linear.weight.device))
        if result.bias is not None:
            bias = result.bias.to(linear.weight.device)
            if linear.bias is not None:
                bias = bias + linear.bias
            linear.bias = nn.Parameter(bias, linear.weight.requires_grad)


class ReconstructionMode:
    """``damping``: one relative damping, or candidates to choose from per structure by ``folds``
    folds of held-out windows (modes that support it; the others refuse a list)."""

    chooses_damping = False  # whether the mode can choose its damping from candidates
    judges_by_kl = False  # whether it chooses by :attr:`judge` where one is set (``choose_by: kl``)
    judge: DistillationSet | None = None
    """This rank's share of held-out windows and the dense model's targets on them: where set (and
    the mode chooses), candidates are judged by the summed KL over every rank's share instead of
    held-out output error."""

    def __init__(self, damping: float | Sequence[float] = 0.01, intercept: bool = False, batch_size: int = 1,
                 prior: str = "zero", folds: int = 4) -> None:
        candidates = isinstance(damping, (list, tuple))
        if candidates and not self.chooses_damping:
            raise ValueError(f"damping={list(damping)}: choosing the damping by held-out windows needs mode: sequential; "
                             f"give {type(self).__name__.lower()} mode one number")
        self.damping = [float(d) for d in damping] if candidates else damping
        self.intercept, self.batch_size, self.prior, self.folds = intercept, batch_size, prior, folds

    def before_slicing(self, model: nn.Module, plan: PruningPlan, windows: Tensor, reduce: Reduce) -> None:
        """The plan is final and the model still dense."""

    def prepare_layer(self, plan: PruningPlan, index: int, layer: nn.Module) -> None:
        """Sharded weights only: decoder layer ``index`` is pruned and whole, about to be sharded."""

    def after_slicing(self, model: nn.Module, plan: PruningPlan, windows: Tensor, reduce: Reduce,
                      ids: Tensor | None = None) -> dict[GroupKey, RefitResult]:
        """The model is pruned: refit and assign; returns every structure's result. ``ids``: the
        windows' ids among every rank's (default 0, 1, ...), which fold each window is in."""
        raise NotImplementedError

    def solve(self, dense: nn.Linear | Tensor, sliced: Tensor, stats: RefitStatistics, key: GroupKey) -> RefitResult:
        return self.solve_with(self.damping, dense, sliced, stats, key)

    def solve_with(self, damping: float, dense: nn.Linear | Tensor, sliced: Tensor, stats: RefitStatistics,
                   key: GroupKey) -> RefitResult:
        """One projection's refit at ``damping`` with the mode's intercept and prior."""
        weight = dense.weight if isinstance(dense, nn.Linear) else dense
        return solve_refit(weight, sliced, stats, damping, str(key), intercept=self.intercept, prior=self.prior)


def padded_share(windows: Tensor, reduce: Reduce) -> int:
    """The window count every rank pads its share to where FSDP2 shards the weights (each layer
    call a collective): the largest share of the ranks' strided split, ``⌈total / ranks⌉``."""
    ranks = int(reduce(torch.tensor(1.0)).item())
    share = -(-int(reduce(torch.tensor(float(len(windows)))).item()) // ranks)
    if not 0 < len(windows) <= share:
        raise ValueError(f"reconstruction with sharded weights needs every rank's windows split evenly (at most "
                         f"{share} and at least 1 per rank); this rank has {len(windows)}")
    return share


class Independent(ReconstructionMode):
    def before_slicing(self, model, plan, windows, reduce):
        structures = discover_structures(model)
        keys = pruned_structures(plan)
        tokens = int(reduce(torch.tensor(float(windows.numel()))).item())
        self._results, self._assigned = {}, set()
        if not keys:
            return
        sharded = has_sharded_weights(model)
        stream = LayerStream(model, windows, keys[0].layer, keys[-1].layer, self.batch_size,
                             padded_share(windows, reduce) if sharded else None)
        progress = Progress("reconstruction: refit", len(keys), unit="projection")
        while stream.next <= keys[-1].layer:
            layer = stream.next
            projections = {key: output_projection(structures[layer], key.kind) for key in keys if key.layer == layer}
            grams, sums = dense_grams(projections, stream.advance, (lambda: stream.valid) if sharded else None)
            for key, proj in projections.items():
                keep = kept_inputs(structures[layer], plan, key.kind)
                stats = RefitStatistics.from_dense_gram(reduce(grams.pop(key)), reduce(sums.pop(key)), keep, tokens)
                weight = full_weight(proj.weight)  # gathered where sharded: every rank solves, in the same order
                result = self.solve(weight, weight[:, keep], stats, key)
                if sharded:  # this rank's rows only, until slicing gathers them (prepare_layer)
                    result.weight = keep_sharded_like(result.weight, proj.weight)
                    if result.bias is not None:
                        result.bias = keep_sharded_like(result.bias, proj.weight)
                self._results[key] = result
                progress.update()

    def prepare_layer(self, plan, index, layer):
        for key, result in self._results.items():
            if key.layer == index:
                result.weight = full_weight(result.weight)  # a collective: every rank, keys in the same order
                result.bias = None if result.bias is None else full_weight(result.bias)
                assign(layer_projection(layer, key.kind), result)
                self._assigned.add(key)

    def after_slicing(self, model, plan, windows, reduce, ids=None):
        structures = discover_structures(model)
        for key, result in self._results.items():
            if key not in self._assigned:
                assign(output_projection(structures[key.layer], key.kind), result)
        record_layer_widths(model)
        results, self._results, self._assigned = self._results, {}, set()
        return results


class Sequential(ReconstructionMode):
    chooses_damping = judges_by_kl = True

    def before_slicing(self, model, plan, windows, reduce):
        layers = decoder_layers(model)
        self._dense = {key: copy.deepcopy(getattr(layers[key.layer], MODULE_NAME[key.kind]))
                       for key in pruned_structures(plan)}

    def prepare_layer(self, plan, index, layer):
        for key in pruned_structures(plan):
            projection = layer_projection(layer, key.kind)
            if key.layer == index and self.intercept and projection.bias is None:  # zero: the intercept adds to it
                projection.bias = nn.Parameter(projection.weight.new_zeros(projection.out_features),
                                               projection.weight.requires_grad)

    def after_slicing(self, model, plan, windows, reduce, ids=None):
        results = {}
        keys = pruned_structures(plan)
        progress = Progress("reconstruction (sequential)", len(keys), unit="structure")
        sharded = has_sharded_weights(model)  # the pruned model's shards: every layer call a collective
        stream = LayerStream(model, windows, keys[0].layer, keys[-1].layer, self.batch_size,
                             padded_share(windows, reduce) if sharded else None, ids) if keys else None
        judge = None
        if keys and self.judge is not None:  # the distillation's batch: a batch of logits is vocabulary-wide
            judge = PartialKL(model, self.judge, keys[0].layer, self.judge.batch_size)
        folds = self.folds if isinstance(self.damping, list) and judge is None else 1
        for key in keys:
            while stream.next < key.layer:
                stream.advance()
            if judge is not None:
                judge.reach(key.layer)
            dense = gather_module(self._dense.pop(key))  # a copy of a sharded block: gathered for this structure only
            pruned = getattr(decoder_layers(model)[key.layer], MODULE_NAME[key.kind])
            projection = PROJECTION[key.kind]
            parts = sequential_statistics(stream.run, pruned, dense, projection, lambda: stream.batch_ids, folds)
            for stats in parts:
                for name in MOMENTS:
                    setattr(stats, name, reduce(getattr(stats, name)))
                stats.tokens = int(reduce(torch.tensor(float(stats.tokens))).item())
            dense_weight, sliced = getattr(dense, projection).weight, full_weight(getattr(pruned, projection).weight)
            if judge is not None:
                result = self.choose_by_kl(model, key, getattr(pruned, projection), dense_weight, sliced, parts[0],
                                           judge, reduce)
            elif folds > 1:
                result = choose_damping(dense_weight, sliced, parts, self.damping, str(key), self.intercept, self.prior)
            else:
                result = self.solve(dense_weight, sliced, parts[0], key)
            assign(getattr(pruned, projection), result)
            results[key] = result
            progress.update()
        record_layer_widths(model)
        return results

    def choose_by_kl(self, model: nn.Module, key: GroupKey, linear: nn.Linear, dense_weight: Tensor, sliced: Tensor,
                     stats: RefitStatistics, judge: PartialKL, reduce: Reduce) -> RefitResult:
        """The candidate refit with the least KL to the dense model on the judge windows (summed
        over ranks: every rank chooses the same), the layers not refit yet dense; ties go to the
        larger damping. ``linear`` comes back as it was."""
        weight, bias = linear.weight.detach().clone(), linear.bias
        sums = []
        with dense_structures(model, self._dense):
            for damping in self.damping:  # one candidate refit held at a time: the winner is solved again
                assign(linear, self.solve_with(damping, dense_weight, sliced, stats, key))
                sums.append(judge.from_layer(key.layer))
                with torch.no_grad():
                    linear.weight.copy_(weight)
                linear.bias = bias
        totals = reduce(torch.tensor(sums, dtype=torch.float64))
        positions = float(reduce(torch.tensor(float(judge.positions), dtype=torch.float64)))
        kl = {damping: float(total) / positions for damping, total in zip(self.damping, totals)}
        best = min(kl.values())
        result = self.solve_with(max(d for d, value in kl.items() if value == best), dense_weight, sliced, stats, key)
        result.judged_kl = kl
        return result


@contextmanager
def dense_structures(model: nn.Module, dense: dict[GroupKey, nn.Module]) -> Iterator[None]:
    """The ``dense`` copies in the model's decoder layers in place of their pruned structures, for a while."""
    layers = decoder_layers(model)
    pruned = {key: getattr(layers[key.layer], MODULE_NAME[key.kind]) for key in dense}
    try:
        for key, module in dense.items():
            setattr(layers[key.layer], MODULE_NAME[key.kind], module)
        yield
    finally:
        for key, module in pruned.items():
            setattr(layers[key.layer], MODULE_NAME[key.kind], module)


RECONSTRUCTION_MODES = {"independent": Independent, "sequential": Sequential}


def reconstruction_mode(name: str) -> type[ReconstructionMode]:
    """A mode by its registered name, or a :class:`ReconstructionMode` subclass by its import path
    (``my_package.WeightedSequential``): a new mode needs no registration."""
    if name in RECONSTRUCTION_MODES:
        return RECONSTRUCTION_MODES[name]
    allowed = f"allowed: {', '.join(RECONSTRUCTION_MODES)}, or the import path of a ReconstructionMode subclass"
    if "." not in name:
        raise ValueError(f"mode={name!r} is unknown; {allowed}")
    try:
        found = import_object(name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"mode={name!r} cannot be imported ({error}); {allowed}") from None
    if not (isinstance(found, type) and issubclass(found, ReconstructionMode)):
        raise ValueError(f"mode={name!r} is not a ReconstructionMode subclass; {allowed}")
    return found
