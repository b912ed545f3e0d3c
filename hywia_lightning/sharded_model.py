"""The model's weights sharded over ranks with torch's FSDP2 (``fully_shard``), for estimation and scoring.

Why: the sharded ``g``/``g²`` accumulators (:mod:`hywia_lightning.sharded_sums`) leave every rank
holding the whole model; with ``fully_shard`` per decoder layer (and once at the root, for the
embeddings, the final norm and the head) each rank keeps ``1/N`` of every weight as a ``DTensor``
and FSDP2 gathers one layer at a time for its forward and backward. The estimator keys its sums by
module, not by ``Parameter`` (FSDP2 swaps a gathered ``Parameter`` into the module for the pass),
and the unit groups read a weight through :func:`full_weight`: gathered whole for the one group
being scored (a collective: every rank scores the groups in the same order, as it does already).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .structures import decoder_layers


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter FSDP2 shards)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def shard_model(model: nn.Module, mesh) -> nn.Module:
    """``fully_shard`` every decoder layer and then the root over the 1-D device ``mesh``, in place.

    Every unit reshards after its forward, the root too (by default FSDP2 leaves the root's
    embeddings and head whole after a forward, until a backward that a forward-only estimation
    never runs): only one layer's weights are ever whole."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def full_weight(param: Tensor) -> Tensor:
    """``param`` as a whole plain tensor, detached: gathered from every rank's shard where FSDP2
    shards it (a collective), as it is otherwise."""
    with torch.no_grad():
        return param.full_tensor() if is_sharded(param) else param.detach()


def local_bytes(tensors) -> int:
    """Bytes of ``tensors`` this rank holds (its shards of the sharded ones)."""
    return sum(t.to_local().nbytes if is_sharded(t) else t.nbytes for t in tensors)
