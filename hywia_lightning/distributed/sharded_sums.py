"""Sums over calibration windows of weight-sized tensors (``g``, ``g²``): whole, or sharded over ranks.

Why: ``g`` and ``g²`` are each as large as every prunable weight, so with whole sums every rank
holds two more copies of the pruned layers. Sharded over N ranks, rank ``r`` keeps only the flat
element range ``[r·s, (r+1)·s)`` of each sum (``s = ⌈numel / N⌉``, the last shard zero-padded).
Each window's tensor is added into a transient local sum of the current batch (one parameter at a
time, in the backward hook that formed it), and :meth:`Sums.flush` reduce-scatters that into the
owners' shards: squares are taken before the sum, so ``g²`` stays the sum of per-window squares.
Every rank must flush the same keys in the same order (a collective each): ranks with fewer windows
run zero-weight windows. A :class:`Shard` is gathered whole only when one unit group is scored.

Without sharding (one process, or ``shard_accumulators: false``) the same class keeps whole sums:
:meth:`Sums.add` folds into them directly, :meth:`Sums.flush` does nothing, and :meth:`Sums.mean`
all-reduces once at the end.
"""

from __future__ import annotations

import math
from typing import Callable, Hashable

import torch
from torch import Tensor

from .collective import Collective


def _shard_size(shape: torch.Size, world_size: int) -> int:
    return -(-math.prod(shape) // world_size)


class Shard:
    """This rank's flat part of a tensor summed over ranks; :meth:`full` gathers the whole of it
    (a collective: every rank must call it, in the same order)."""

    def __init__(self, local: Tensor, shape: torch.Size, collective: Collective) -> None:
        self.local, self.shape, self.collective = local, torch.Size(shape), collective

    def full(self) -> Tensor:
        gathered = self.local.new_empty(self.local.numel() * self.collective.world_size)
        self.collective.all_gather(gathered, self.local)
        return gathered[: math.prod(self.shape)].view(self.shape)

    @property
    def nbytes(self) -> int:
        return self.local.numel() * self.local.element_size()


def whole(value: Tensor | Shard) -> Tensor:
    """A statistic as a whole tensor: gathered from the ranks' shards where it is sharded."""
    return value.full() if isinstance(value, Shard) else value


class Sums:
    """Keyed sums in ``dtype``; sharded over the ranks of ``sharded`` when it has several."""

    def __init__(self, dtype: torch.dtype, sharded: Collective | None = None) -> None:
        self.dtype = dtype
        self.sharded = sharded if sharded is not None and sharded.world_size > 1 else None
        self.held: dict[Hashable, Tensor] = {}    # whole sums, or this rank's shards of them
        self._batch: dict[Hashable, Tensor] = {}  # sharded: this batch's local sum (flat, padded) until flushed

    def add(self, key: Hashable, value: Tensor, squared: bool = False) -> None:
        """Fold ``value`` (or its square, elementwise) into the sum of ``key``."""
        value = value.to(self.dtype)
        if self.sharded is None:
            if key not in self.held:
                self.held[key] = torch.zeros_like(value)
            target = self.held[key]
        else:
            if key not in self._batch:
                self._batch[key] = value.new_zeros(_shard_size(value.shape, self.sharded.world_size) * self.sharded.world_size)
            target = self._batch[key][: value.numel()].view(value.shape)
        if squared:
            target.addcmul_(value, value)  # in place: no temporary of the weight's size
        else:
            target.add_(value)

    def flush(self, key: Hashable, shape: torch.Size, device: torch.device) -> None:
        """The batch is done for ``key``: reduce-scatter its local sum (zeros where this rank added
        nothing) into the owners' shards. Nothing to do with whole sums."""
        if self.sharded is None:
            return
        size = _shard_size(shape, self.sharded.world_size)
        local = self._batch.pop(key, None)
        if local is None:
            local = torch.zeros(size * self.sharded.world_size, dtype=self.dtype, device=device)
        part = local.new_empty(size)
        self.sharded.reduce_scatter(part, local)
        del local
        if key in self.held:
            self.held[key].add_(part)
        else:
            self.held[key] = part

    def mean(self, key: Hashable, shape: torch.Size, device: torch.device, count: int,
             all_reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor | Shard:
        """The sum over every rank's windows divided by ``count``, in place (the sum is handed over):
        the whole tensor (``all_reduce`` sums whole sums over ranks) or this rank's shard."""
        if self.sharded is not None:
            size = _shard_size(shape, self.sharded.world_size)
            local = self.held.pop(key) if key in self.held else torch.zeros(size, dtype=self.dtype, device=device)
            return Shard(local.div_(count), shape, self.sharded)
        local = self.held.pop(key) if key in self.held else torch.zeros(shape, dtype=self.dtype, device=device)
        return (all_reduce(local) if all_reduce else local).div_(count)

    @property
    def nbytes(self) -> int:
        """Bytes of the sums this rank holds (shards when sharded)."""
        return sum(t.numel() * t.element_size() for t in self.held.values())
