"""How the ranks of a distributed run talk: the few collectives the pipeline issues, as callables.

Why callables and not ``torch.distributed`` calls in the library: a single process needs none,
Lightning's strategies bring their own all-reduce and broadcast (device placement, pickled objects),
and a test can stand in for a rank. Sharded accumulators also need a reduce-scatter and an
all-gather, which :func:`process_group_collective` takes from the default process group (gloo or
NCCL) that Lightning's DDP and FSDP strategies, or ``torch.distributed.init_process_group``, set up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from torch import Tensor

if TYPE_CHECKING:
    from lightning import Trainer


@dataclass
class Collective:
    """How ranks of a distributed run talk (a single process needs none)."""

    rank: int
    world_size: int
    all_reduce: Callable[[Tensor], Tensor]  # sum over ranks
    broadcast: Callable[[Any], Any]         # rank 0's object to every rank
    #: ``(output, input)``: rank r's output is the sum over ranks of the r-th of ``world_size`` equal chunks of input
    reduce_scatter: Callable[[Tensor, Tensor], None] | None = None
    #: ``(output, input)``: every rank's input, concatenated in rank order
    all_gather: Callable[[Tensor, Tensor], None] | None = None

    @property
    def can_shard(self) -> bool:
        """Whether accumulators can be sharded over these ranks (a reduce-scatter and an all-gather exist)."""
        return self.reduce_scatter is not None and self.all_gather is not None


def process_group_collective(
    all_reduce: Callable[[Tensor], Tensor] | None = None, broadcast: Callable[[Any], Any] | None = None,
) -> Collective:
    """The default ``torch.distributed`` process group's collectives; ``all_reduce`` and
    ``broadcast`` may come from elsewhere (a Lightning strategy's)."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None

    def reduce(tensor: Tensor) -> Tensor:  # NCCL reduces GPU tensors only: a CPU count goes there and back
        moved = tensor if device is None else tensor.to(device)
        dist.all_reduce(moved)
        return moved.to(tensor.device)

    def share(obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    return Collective(dist.get_rank(), dist.get_world_size(), all_reduce or reduce, broadcast or share,
                      lambda output, tensor: dist.reduce_scatter_tensor(output, tensor),
                      lambda output, tensor: dist.all_gather_into_tensor(output, tensor))


def trainer_collective(trainer: "Trainer") -> Collective | None:
    """How the ranks of ``trainer`` sum tensors and share rank 0's objects (the strategy's own), and
    reduce-scatter and gather shards (its process group's); ``None`` for one process."""
    import torch

    if trainer.world_size == 1:
        return None
    strategy = trainer.strategy
    reduce, broadcast = lambda t: strategy.reduce(t, reduce_op="sum"), lambda obj: strategy.broadcast(obj, src=0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return process_group_collective(reduce, broadcast)
    return Collective(trainer.global_rank, trainer.world_size, reduce, broadcast)
