"""LoRA recovery of a pruned model: the LightningModule ``fit`` trains after the pruning callbacks.

The pruning callbacks slice the model in ``setup``; :meth:`LoRARecovery.configure_model` then adds
the adapters, before any strategy (DDP, FSDP) wraps the model, so the strategy shards and
synchronizes the pruned shapes. When training ends, the adapters are merged into the weights on
global rank 0 (from the full state, gathered under FSDP), so the evaluation and export callbacks
see a plain pruned model; the adapters alone are exported too.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from peft import LoraConfig, PeftModel
from torch import Tensor

from .causal_lm import CausalLM
from .lora import add_lora, check_target_modules, merge_lora, save_adapter
from .strategies import full_state_dict

log = logging.getLogger(__name__)

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_DIR = "adapter"


class LoRARecovery(CausalLM):
    def __init__(
        self,
        model_name_or_path: str,
        cache_dir: str | None = None,
        dtype: str = "float32",
        r: PositiveInt = 8,
        alpha: int = 16,
        dropout: float = 0.05,
        target_modules: list[str] = list(LLAMA_PROJECTIONS),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        """
        Args:
            model_name_or_path, cache_dir, dtype: as :class:`~hywia_lightning.CausalLM`.
            r, alpha, dropout: LoRA rank, scaling numerator (scale = alpha / r) and dropout.
            target_modules: Linear modules (last name component) that get adapters.
            optimizer: over the adapter parameters (``class_path`` + ``init_args`` in YAML).
            scheduler: stepped every optimizer step; ``None`` keeps the learning rate constant.
            gradient_checkpointing: recompute activations in backward (single device / DDP; FSDP
                has its own, in :class:`~hywia_lightning.strategies.DecoderLayerFSDP`).
        """
        super().__init__(model_name_or_path, cache_dir, dtype)
        if not 0 <= dropout < 1:
            raise ValueError(f"model.init_args.dropout={dropout} must be in [0, 1)")
        check_target_modules(self.model, list(target_modules))
        self.lora_config = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none",
            task_type="CAUSAL_LM",
        )
        self.optimizer, self.scheduler = optimizer, scheduler
        self.gradient_checkpointing = gradient_checkpointing
        self.loss_curve: list[list[float]] = []  # [step, loss] of every training batch, rank 0
        self.val_curve: list[list[float]] = []
        self.adapter: dict[str, Tensor] | None = None  # set when the adapters are merged
        self._seconds_before_resume, self._train_start = 0.0, time.perf_counter()

    def prepare_data(self) -> None:
        """The first hook of ``fit``: refuse a run that cannot train before pruning spends its time."""
        trainer = self.trainer
        if trainer.max_steps == 0 or trainer.limit_train_batches == 0:
            raise ValueError(
                f"LoRARecovery trains adapters, but trainer.max_steps={trainer.max_steps} / "
                f"trainer.limit_train_batches={trainer.limit_train_batches} allow no step; "
                "use hywia_lightning.CausalLM for a job that only prunes"
            )

    def configure_model(self) -> None:
        if isinstance(self.model, PeftModel):
            return
        if self.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = add_lora(self.model, self.lora_config).train()  # loaded in eval mode; LoRA dropout must be live
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        log.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.trainer.is_global_zero:
            self.loss_curve.append([self.global_step, loss.item()])
        return loss

    def record_evaluation(self, split: str, loss: float) -> None:
        super().record_evaluation(split, loss)
        if split != "val":
            return
        if self.trainer.sanity_checking and self.global_step > 0:
            return  # a resumed run's sanity check repeats a validation already on the curve
        if self.global_step == 0:  # before the first step: the loss recovery starts from
            self.report.record("recovery", {"val_loss_before": loss})
        self.val_curve.append([self.global_step, loss])

    def configure_optimizers(self):
        optimizer = self.optimizer([p for p in self.parameters() if p.requires_grad])
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler(optimizer), "interval": "step"}}

    def on_train_start(self) -> None:
        self._train_start = time.perf_counter()

    def training_seconds(self) -> float:
        """Time spent training, the interrupted runs before a resume included (up to their checkpoint)."""
        return self._seconds_before_resume + time.perf_counter() - self._train_start

    def on_train_end(self) -> None:
        """Merge the adapters: rank 0's ``self.model`` becomes the plain pruned model with them folded in."""
        self.report.record("seconds", {"recovery": round(self.training_seconds(), 3)})
        state = full_state_dict(self.trainer.strategy)
        if not self.trainer.is_global_zero:
            return
        prefix = "model."
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        merged, self.adapter = merge_lora(self.model.get_base_model(), self.lora_config, state)
        self.model = merged.to(self.device).eval()
        datamodule = self.trainer.datamodule
        self.report.record("recovery", {
            "lora": {"r": self.lora_config.r, "alpha": self.lora_config.lora_alpha,
                     "dropout": self.lora_config.lora_dropout, "target_modules": sorted(self.lora_config.target_modules)},
            "data": datamodule.describe() if hasattr(datamodule, "describe") else None,
            "steps": self.global_step,
            "batches": len(self.loss_curve),
            "world_size": self.trainer.world_size,
            "strategy": type(self.trainer.strategy).__name__,
            "loss_curve": self.loss_curve,
            "val_loss": self.val_curve,
        })

    def write_artifacts(self, folder: Path) -> None:
        """Beside the merged export: the adapters alone, in peft's format (``adapter/``)."""
        if self.adapter is not None:
            save_adapter(folder / ADAPTER_DIR, self.lora_config, self.adapter)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["hywia_curves"] = {"loss": self.loss_curve, "val": self.val_curve}
        checkpoint["hywia_recovery_seconds"] = self.training_seconds()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        curves = checkpoint.get("hywia_curves", {})
        self.loss_curve, self.val_curve = list(curves.get("loss", [])), list(curves.get("val", []))
        self._seconds_before_resume = checkpoint.get("hywia_recovery_seconds", 0.0)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Seed each step's randomness (LoRA dropout) from the job's seed and the step's position, so a
        resumed run draws what an uninterrupted one draws, whatever else used the generator in between
        (validation, data loading)."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        torch.manual_seed((seed * 1_000_003 + self.current_epoch * 10_007 + batch_idx) % 2**63)
