"""A plain copy of a model whose weights FSDP2 shards, on one rank's host: what the export writes.

Why: ``save_pretrained`` and the export's checks take a plain model, and the pruned model of a
sharded job (:func:`~hywia_lightning.distributed.gathered_slicing.sharded_pruned`) is whole on no rank. The copy
is the model's own class built without memory (on the ``meta`` device), given the per-layer widths
and output biases of the pruned config (:func:`~hywia_lightning.export.modeling_pruned.apply_layer_widths`),
then filled one gathered
tensor at a time (``full_tensor``, a collective of every rank), each moved to ``device`` (the host)
before the next: the receiving rank's accelerator holds one tensor of it at a time.
"""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel

from ..export.modeling_pruned import apply_layer_widths
from .gathered_slicing import finish_gathered, plain_skeleton
from .sharded_model import full_weight


def gathered_copy(model: PreTrainedModel, receive: bool, device: str | torch.device = "cpu") -> PreTrainedModel | None:
    """A plain copy of ``model`` on ``device`` where ``receive`` (``None`` elsewhere). Every rank must
    call it: every tensor of its state is gathered, in the same order on every rank."""
    plain = None
    if receive:
        plain = plain_skeleton(model, buffers_to=device)
        with torch.device("meta"):
            apply_layer_widths(plain)
        plain.generation_config = copy.deepcopy(model.generation_config)
    for name, tensor in model.state_dict().items():
        whole = full_weight(tensor)
        if plain is not None:
            plain.load_state_dict({name: whole.to(device)}, strict=False, assign=True)
        del whole
    if plain is not None:
        finish_gathered(plain)
        plain.eval()
    return plain
