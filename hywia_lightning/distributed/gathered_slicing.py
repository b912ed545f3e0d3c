"""Slicing a model whose weights FSDP2 shards: gather one decoder layer at a time, slice it, keep it
(:func:`gathered_pruned`) or shard it again (:func:`sharded_pruned`).

Why: a ``DTensor`` shard cannot be sliced by unit (a unit's rows lie on several ranks), and
gathering the whole dense model on one rank is what sharding avoided. :func:`gathered_pruned`
builds a plain copy of the model's class without memory (on the ``meta`` device), then, in the
order of the state dict, gathers the embeddings and head once and each decoder layer's weights
(``full_tensor``, a collective of every rank), and on the receiving ranks loads that layer and
applies its part of the plan before the next is gathered: the peak there is the pruned model plus
one dense layer. The copy is what :func:`~hywia_lightning.core.slicing.apply_plan` would have made of
the whole model, so every later stage (export, reconstruction, evaluation) takes it unchanged.

Whole on every rank, the pruned copy of a 70B model (103 GiB in bfloat16) fits no 80 GB GPU: so
:func:`sharded_pruned` shards each pruned layer with FSDP2 as soon as it is built (after
``prepare(index, layer)`` has changed it while it is whole: a refit written in, a bias added, since
FSDP2 takes no new parameter later), and the root last. Each rank's peak is then its shards of the
pruned model, one dense layer and one pruned layer (and the root's embeddings and head whole until
the end); the later stages take the sharded pruned model (each forward pass a collective).
"""

from __future__ import annotations

import copy
from itertools import groupby
from typing import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from ..core.plan import PruningPlan
from ..core.slicing import apply_plan, record_layer_widths
from ..core.structures import decoder_layers
from .sharded_model import full_weight, has_sharded_weights, is_sharded, shard_unit


def _plain_class(model: nn.Module) -> type:
    """The model's own class: FSDP2 makes the module an instance of ``FSDP<class>``."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def _layer_of(name: str, prefixes: dict[str, int]) -> int | None:
    return next((i for prefix, i in prefixes.items() if name.startswith(prefix)), None)


def plain_skeleton(model: PreTrainedModel, buffers_to: str | torch.device | None = None) -> PreTrainedModel:
    """The model's own class built without memory (``meta``) from a copy of its config, holding
    copies of its buffers (on ``buffers_to``, default where they are): FSDP2 shards no buffer, and
    the rotary frequencies are not in the state dict that fills the rest."""
    with torch.device("meta"):
        plain = _plain_class(model)(copy.deepcopy(model.config))
    for name, buffer in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        plain.get_submodule(owner)._buffers[leaf] = buffer.detach().to(buffers_to or buffer.device, copy=True)
    return plain


def finish_gathered(plain: PreTrainedModel) -> None:
    """Tie the head to the embedding again and refuse a copy that some tensor never reached."""
    if plain.config.tie_word_embeddings:
        plain.tie_weights()  # the head is the embedding: one tensor again, as in the model
    missing = [n for n, p in [*plain.named_parameters(), *plain.named_buffers()] if p.is_meta]
    if missing:
        raise RuntimeError(f"gathering the sharded model left {missing} without values")


LayerDone = Callable[[int, nn.Module], None]  # (index, the decoder layer just pruned, whole)


def gathered_pruned(model: PreTrainedModel, plan: PruningPlan, receive: bool,
                    layer_done: LayerDone | None = None) -> PreTrainedModel | None:
    """A plain copy of ``model`` pruned by ``plan`` on the ranks where ``receive`` (``None`` on the
    others). Every rank must call it: every weight is gathered, a collective in the same order.
    ``layer_done(index, layer)`` is called on each decoder layer once it is loaded and pruned."""
    layers = {id(layer): i for i, layer in enumerate(decoder_layers(model))}
    prefixes = {f"{name}.": layers[id(m)] for name, m in model.named_modules() if id(m) in layers}
    state = model.state_dict()  # the ranks' shards, keyed in the same order everywhere: nothing gathered yet
    plain = plain_skeleton(model) if receive else None
    for layer, names in groupby(state, key=lambda name: _layer_of(name, prefixes)):
        part = {name: full_weight(state[name]) for name in names}
        if plain is None:
            continue
        plain.load_state_dict(part, strict=False, assign=True)
        if layer in plan.layers:
            apply_plan(plain, PruningPlan(plan.attention_unit, {layer: plan.layers[layer]}))
        if layer is not None and layer_done is not None:
            layer_done(layer, decoder_layers(plain)[layer])
    if plain is not None:
        finish_gathered(plain)
        record_layer_widths(plain)  # every layer's widths in the config, as apply_plan writes them
    return plain


def sharded_pruned(model: PreTrainedModel, plan: PruningPlan, mesh,
                   prepare: LayerDone | None = None) -> PreTrainedModel:
    """A copy of the FSDP2-sharded ``model`` pruned by ``plan`` and sharded again over ``mesh``, one
    layer at a time: ``prepare(index, layer)`` changes each pruned layer while it is whole, then it
    is sharded; the root (embeddings, final norm, head) is sharded last. Every rank must call it."""
    def shard(index: int, layer: nn.Module) -> None:
        if prepare is not None:
            prepare(index, layer)
        shard_unit(layer, mesh)

    return shard_unit(gathered_pruned(model, plan, receive=True, layer_done=shard), mesh)


def pruned(model: PreTrainedModel, plan: PruningPlan, prepare: LayerDone | None = None) -> PreTrainedModel:
    """``model`` pruned by ``plan``: sliced in place (``prepare`` is for sharded models only: the
    hooks after slicing change a plain model as they like), or, where FSDP2 shards its weights, a
    pruned copy sharded the same way (:func:`sharded_pruned`; every rank must call it)."""
    if has_sharded_weights(model):
        mesh = next(p for p in model.parameters() if is_sharded(p)).device_mesh
        return sharded_pruned(model, plan, mesh, prepare)
    apply_plan(model, plan)
    return model
