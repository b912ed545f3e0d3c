"""FSDP for decoder LMs, and the full (unsharded) state of a model under any Lightning strategy."""

from __future__ import annotations

import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from torch import nn

from ..core.structures import decoder_layers


def decoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The decoder layer class(es) of a model, a peft-wrapped one too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {type(layer) for layer in decoder_layers(base)}


class DecoderLayerFSDP(FSDPStrategy):
    """FSDP that shards, and optionally checkpoints activations of, each decoder layer of whatever
    family the model is, so one config serves Llama, Mistral and Qwen.

    Frozen base weights and LoRA adapters of a layer share one flat parameter: ``use_orig_params``
    keeps their ``requires_grad`` apart, and the adapters are created in the base weights' dtype
    (:func:`~hywia_lightning.recovery.lora.add_lora`). Precision comes from ``trainer.precision``
    (``bf16-mixed`` keeps float32 weights and computes in bfloat16). Every other argument is
    Lightning's :class:`~lightning.pytorch.strategies.FSDPStrategy`'s (``sharding_strategy``,
    ``state_dict_type``: ``full`` or ``sharded`` checkpoints, ``cpu_offload``, ...).
    """

    def __init__(self, activation_checkpointing: bool = True, state_dict_type: str = "sharded", **kwargs) -> None:
        super().__init__(state_dict_type=state_dict_type, use_orig_params=True, **kwargs)
        self.checkpoint_layers = activation_checkpointing

    def setup_environment(self) -> None:
        """Refuse a CPU run first thing in ``fit``, before any pruning or training work."""
        if not isinstance(self.accelerator, CUDAAccelerator):
            raise ValueError(
                f"trainer.strategy DecoderLayerFSDP requires a GPU accelerator, but trainer.accelerator is "
                f"{type(self.accelerator).__name__}: set trainer.accelerator: gpu, or use strategy: ddp on CPU"
            )
        super().setup_environment()

    def _setup_model(self, model: nn.Module) -> nn.Module:
        """Every decoder layer is a unit: the student's, and a distillation teacher's (whose class
        may differ: a pruned export's layers are its own modeling code's)."""
        module = self.lightning_module
        classes = decoder_layer_classes(module.model)
        if getattr(module, "teacher", None) is not None:
            classes |= decoder_layer_classes(module.teacher)
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(classes)
        if self.checkpoint_layers:
            self._activation_checkpointing_kwargs = {"auto_wrap_policy": ModuleWrapPolicy(classes)}
        return super()._setup_model(model)


def full_state_dict(strategy: Strategy) -> dict[str, torch.Tensor]:
    """The LightningModule's complete state on global rank 0 (on the CPU under FSDP; empty on other
    ranks there). Every rank must call it: under FSDP it gathers the shards."""
    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullStateDictConfig
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import StateDictType

        config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        with FSDP.state_dict_type(strategy.model, StateDictType.FULL_STATE_DICT, config):
            return strategy.model.state_dict()
    return strategy.lightning_module.state_dict()
