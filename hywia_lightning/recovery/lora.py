"""LoRA adapters (peft) on a (pruned) causal LM: target checks, merging, the adapter's own files."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from ..export.modeling_pruned import apply_layer_widths

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file names: PeftModel.from_pretrained reads these
WRAPPER_NAMES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def check_target_modules(model: nn.Module, target_modules: list[str]) -> None:
    """Every target must name a Linear of the model (peft matches the last name component)."""
    linear_names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
    missing = [t for t in target_modules if t not in linear_names]
    if not target_modules or missing:
        raise ValueError(
            f"model.init_args.target_modules={target_modules!r}: {', '.join(missing) or 'empty list'} "
            f"is not a Linear module of this model; allowed: {', '.join(linear_names)}"
        )


def add_lora(model: PreTrainedModel, config: LoraConfig) -> PeftModel:
    """Wrap ``model`` with trainable adapters; base weights frozen, adapters in the base weights' dtype
    (FSDP flattens frozen and trainable weights of a layer together, which needs one dtype)."""
    return get_peft_model(model, config, autocast_adapter_dtype=False)


def merge_lora(template: PreTrainedModel, config: LoraConfig, state_dict: dict[str, torch.Tensor]) -> tuple[PreTrainedModel, dict]:
    """A plain model with the adapters of ``state_dict`` (a :class:`PeftModel`'s full state) merged
    into its weights, and the adapters' own state (peft format).

    The model is rebuilt on the CPU from ``template``'s class and config (per-layer widths
    included), so this works from a state gathered from any strategy, sharded ones too.
    """
    with torch.device("meta"):
        model = type(template)(template.config)
    apply_layer_widths(model)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives tied embeddings separate storage
    # non-persistent buffers (rotary frequencies) are in no state dict: take them from the template
    template_buffers = {_unwrapped_name(name): b for name, b in template.named_buffers()}
    for name, buffer in model.named_buffers():
        buffer.copy_(template_buffers[name])
    model.to(next(iter(state_dict.values())).dtype)
    peft_model = add_lora(model, config)
    peft_model.load_state_dict(state_dict, strict=True)
    adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    return peft_model.merge_and_unload(), adapter


def _unwrapped_name(name: str) -> str:
    """A module path without the wrappers FSDP and activation checkpointing insert."""
    return ".".join(p for p in name.split(".") if p not in WRAPPER_NAMES)


def save_adapter(folder: Path, config: LoraConfig, adapter: dict[str, torch.Tensor]) -> None:
    """Write the adapter as peft does: ``adapter_config.json`` and ``adapter_model.safetensors``."""
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in adapter.items()}, folder / ADAPTER_WEIGHTS)
