"""The model's weights sharded over ranks with torch's FSDP2 (``fully_shard``), for estimation and scoring.

Why: the sharded ``g``/``g²`` accumulators (:mod:`hywia_lightning.distributed.sharded_sums`) leave every rank
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

from ..core.structures import decoder_layers


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter FSDP2 shards)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def has_sharded_weights(model: nn.Module) -> bool:
    """Whether FSDP2 shards ``model``'s weights: then each of its forward passes is a collective
    that every rank must enter, the same number of times."""
    return any(is_sharded(p) for p in model.parameters())


def world_mesh(device: torch.device):
    """A 1-D device mesh of every rank of the default process group, on ``device``'s type (CPU over
    gloo, CUDA over NCCL), the mesh :func:`shard_model` shards over."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("sharding the weights needs a torch.distributed process group (several processes)")
    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard_model(model: nn.Module, mesh) -> nn.Module:
    """``fully_shard`` every decoder layer and then the root over the 1-D device ``mesh``, in place.

    Every unit reshards after its forward, the root too (by default FSDP2 leaves the root's
    embeddings and head whole after a forward, until a backward that a forward-only estimation
    never runs): only one layer's weights are ever whole."""
    for layer in decoder_layers(model):
        shard_unit(layer, mesh)
    return shard_unit(model, mesh)


def shard_unit(module: nn.Module, mesh) -> nn.Module:
    """``fully_shard`` one unit (a decoder layer, or the root last) over ``mesh``, resharded after each forward."""
    from torch.distributed.fsdp import fully_shard

    return fully_shard(module, mesh=mesh, reshard_after_forward=True)


def full_weight(param: Tensor) -> Tensor:
    """``param`` as a whole plain tensor, detached: gathered from every rank's shard where FSDP2
    shards it (a collective), as it is otherwise."""
    with torch.no_grad():
        if is_sharded(param) and param.numel() == 0:  # a structure pruned to nothing: no rows to gather (FSDP2's
            return torch.empty(param.shape, dtype=param.dtype, device=param.to_local().device)  # empty shards misreport)
        return param.full_tensor() if is_sharded(param) else param.detach()


def write_full(param: Tensor, value: Tensor) -> None:
    """Write the whole tensor ``value`` into ``param`` in place: where FSDP2 shards ``param``, only
    this rank's rows of it go into its shard (every rank holds the same ``value``; no collective)."""
    with torch.no_grad():
        if not is_sharded(param):
            param.copy_(value.to(param.device))
            return
        if param.numel() == 0:
            return
        from torch.distributed.tensor import distribute_tensor

        mine = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                 src_data_rank=None)
        param.to_local().copy_(mine.to_local())


def keep_sharded_like(value: Tensor, param: Tensor) -> Tensor:
    """``value`` (whole, the same on every rank) cut to this rank's rows as ``param`` is sharded
    (a ``DTensor``; :func:`full_weight` gathers it back), or ``value`` itself where ``param`` is whole."""
    if not is_sharded(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def reshard(model: nn.Module) -> None:
    """Reshard every FSDP2 unit of ``model``: a forward cut short (``layer_stream.StopForward``)
    never reaches the post-forward hooks that reshard the units it entered (the root among them)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def gather_module(module: nn.Module) -> nn.Module:
    """``module`` with every sharded parameter replaced by its whole plain tensor, in place (a
    collective per parameter): for a copy of a sharded block to run on plain inputs."""
    for name, param in list(module.named_parameters()):
        if is_sharded(param):
            owner, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner), leaf, nn.Parameter(full_weight(param), param.requires_grad))
    return module


def local_bytes(tensors) -> int:
    """Bytes of ``tensors`` this rank holds (its shards of the sharded ones)."""
    return sum(t.to_local().nbytes if is_sharded(t) else t.nbytes for t in tensors)
