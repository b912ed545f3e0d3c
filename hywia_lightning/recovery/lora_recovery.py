"""LoRA recovery of a pruned model: the LightningModule ``fit`` trains after the pruning callbacks.

The pruning callbacks slice the model in ``setup``; :meth:`LoRARecovery.configure_model` then adds
the adapters, before any strategy (DDP, FSDP) wraps the model, so the strategy shards and
synchronizes the pruned shapes. When training ends, the adapters are merged into the weights on
global rank 0 (from the full state, gathered under FSDP), so the evaluation and export callbacks
see a plain pruned model; the adapters alone are exported too.

The loss (``loss``): ``kl``, distillation from the unpruned model (the default), ``lm``, the
language-model loss on the data's labels, or ``mix``, ``kl_weight · kl + (1 − kl_weight) · lm``;
with ``hidden_weight > 0`` (``kl`` and ``mix``) plus that weight times the mean over
``hidden_layers`` of the decoder layers' output distance to the teacher's
(:func:`~hywia_lightning.core.distillation.hidden_state_error`).
Why distillation: the dense model's next-token distribution at every position carries far more
signal per token than the one-hot next token, and it asks the pruned model to keep what the dense
one did rather than to fit the recovery corpus (NVIDIA's Minitron recovers pruned models this way).

The teacher is the dense model, loaded again from ``teacher`` (default: ``model_name_or_path``,
which the pruning callbacks prune) in :meth:`configure_model`, frozen, and run on the fly beside
the student: the exact KL of the full distributions, with no cache to build or store, at the cost
of one forward pass per step. It is a submodule, so a strategy places it as it places the student
(DDP replicates it, FSDP shards its decoder layers like the student's); it is out of the optimizer
(frozen) and, except under FSDP, out of the checkpoints (its weights are the ``teacher``'s own).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Literal

import torch
from jsonargparse.typing import PositiveFloat, PositiveInt
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from peft import LoraConfig, PeftModel
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from ..core.distillation import hidden_state_error, kl_to_logits
from ..distributed.strategies import full_state_dict
from ..models.causal_lm import CausalLM
from ..models.loading import load_causal_lm
from .lora import add_lora, check_target_modules, merge_lora, save_adapter

log = logging.getLogger(__name__)

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_DIR = "adapter"
TEACHER = "teacher"  # the teacher's submodule name, and the prefix of its state's keys


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
        loss: Literal["kl", "lm", "mix"] = "kl",
        temperature: PositiveFloat = 1.0,
        kl_weight: float = 0.5,
        teacher: str | None = None,
        hidden_weight: float = 0.0,
        hidden_layers: list[int] | None = None,
    ) -> None:
        """
        Args:
            model_name_or_path, cache_dir, dtype: as :class:`~hywia_lightning.CausalLM`.
            r, alpha, dropout: LoRA rank, scaling numerator (scale = alpha / r) and dropout.
            target_modules: Linear modules (last name component) that get adapters.
            optimizer: over the adapter parameters (``class_path`` + ``init_args`` in YAML).
            scheduler: stepped every optimizer step; ``None`` keeps the learning rate constant.
            gradient_checkpointing: recompute activations in backward (single device / DDP; FSDP
                has its own, in :class:`~hywia_lightning.distributed.strategies.DecoderLayerFSDP`).
            loss: ``kl`` (to the teacher's distribution), ``lm`` (the data's labels) or ``mix``.
            temperature: of both distributions in the KL (which is scaled by its square).
            kl_weight: ``mix`` only: the KL's share of the loss, in [0, 1].
            teacher: the dense model the KL distils from (``None``: ``model_name_or_path``, the
                model the job prunes). Name it when ``model_name_or_path`` is already a pruned export.
            hidden_weight: ``kl`` and ``mix``: the weight of the hidden-state term added to the loss
                (0: none). Measured on the bundled model (docs/recovery.md).
            hidden_layers: the decoder layers (0-based) whose outputs the hidden-state term compares
                (``None``: every layer; the last one's output is the model's, after its final norm).
        """
        super().__init__(model_name_or_path, cache_dir, dtype)
        if not 0 <= dropout < 1:
            raise ValueError(f"model.init_args.dropout={dropout} must be in [0, 1)")
        if loss not in ("kl", "lm", "mix"):
            raise ValueError(f"model.init_args.loss={loss!r} is unknown; allowed: kl, lm, mix")
        if not 0 <= kl_weight <= 1:
            raise ValueError(f"model.init_args.kl_weight={kl_weight} must be in [0, 1] (the KL's share of a mix)")
        self.hidden_layers = self._check_hidden(hidden_weight, hidden_layers, loss)
        if loss != "lm" and teacher is None and getattr(self.model.config, "layer_intermediate_size", None) is not None:
            raise ValueError(
                f"model.init_args.model_name_or_path={model_name_or_path!r} is a pruned export (its config has "
                f"per-layer widths), so it cannot be its own teacher for loss={loss!r}: set model.init_args.teacher "
                "to the dense model it was pruned from, or use loss: lm"
            )
        self.loss, self.temperature, self.kl_weight, self.hidden_weight = loss, temperature, kl_weight, hidden_weight
        self.teacher_name_or_path, self.teacher_named = teacher or model_name_or_path, teacher is not None
        self.teacher: nn.Module | None = None  # loaded in configure_model (or by dense_model, earlier)
        self.val_kl = MeanMetric()  # token-weighted, summed over ranks when computed
        check_target_modules(self.model, list(target_modules))
        self.lora_config = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none",
            task_type="CAUSAL_LM",
        )
        self.optimizer, self.scheduler = optimizer, scheduler
        self.gradient_checkpointing = gradient_checkpointing
        # [step, value] of every training batch (the mean over ranks), and of every validation; rank 0
        self.loss_curve: list[list[float]] = []
        self.parts_curve: dict[str, list[list[float]]] = {"kl": [], "lm": [], "hidden": []}
        self.val_curve: list[list[float]] = []
        self.val_kl_curve: list[list[float]] = []
        self.adapter: dict[str, Tensor] | None = None  # set when the adapters are merged
        self._seconds_before_resume, self._train_start = 0.0, time.perf_counter()

    def _check_hidden(self, weight: float, layers: list[int] | None, loss: str) -> list[int]:
        """The layers the hidden-state term compares (every one for ``None``); bad keys refused by name."""
        count = self.model.config.num_hidden_layers
        if not weight >= 0:
            raise ValueError(f"model.init_args.hidden_weight={weight} must be >= 0 (0: no hidden-state term)")
        if weight > 0 and loss == "lm":
            raise ValueError(f"model.init_args.hidden_weight={weight} distils hidden states from the teacher, which "
                             "loss: lm does not run; use loss: kl or mix, or hidden_weight: 0")
        if layers is None:
            return list(range(count))
        if not layers or any(not 0 <= i < count for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"model.init_args.hidden_layers={layers} must be distinct decoder layer indices in "
                             f"[0, {count}) (or null: every layer)")
        return sorted(layers)

    def prepare_data(self) -> None:
        """The first hook of ``fit``: refuse a run that cannot train before pruning spends its time."""
        trainer = self.trainer
        if trainer.max_steps == 0 or trainer.limit_train_batches == 0:
            raise ValueError(
                f"LoRARecovery trains adapters, but trainer.max_steps={trainer.max_steps} / "
                f"trainer.limit_train_batches={trainer.limit_train_batches} allow no step; "
                "use hywia_lightning.CausalLM for a job that only prunes"
            )

    # -- the teacher --------------------------------------------------------------------------------
    @property
    def needs_teacher(self) -> bool:
        """Trained against it (``kl``, ``mix``), or named, so that validation measures the KL too."""
        return self.loss != "lm" or self.teacher_named

    def dense_model(self) -> nn.Module:
        """The unpruned model, for what must see it before training (``generated`` recovery data
        samples it): the teacher where one is named, else this module's model, which is still dense
        before the pruning callbacks' ``setup``."""
        if self.teacher_name_or_path == self.hparams.model_name_or_path:
            return self.model
        if self.teacher is None:
            self.teacher = self._load_teacher()
        return self.teacher

    def _load_teacher(self) -> nn.Module:
        teacher, _ = load_causal_lm(self.teacher_name_or_path, self.hparams.cache_dir, self.hparams.dtype)
        if teacher.config.vocab_size != self.model.config.vocab_size:
            raise ValueError(
                f"model.init_args.teacher={self.teacher_name_or_path!r} has a vocabulary of {teacher.config.vocab_size} "
                f"tokens, the student {self.model.config.vocab_size}: distillation needs the same tokenizer"
            )
        log.info("distillation teacher: %s, frozen", self.teacher_name_or_path)
        return teacher.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "LoRARecovery":
        """The teacher stays in eval mode whatever Lightning switches (no dropout in the targets)."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # -- training -------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if isinstance(self.model, PeftModel):
            return
        if self.needs_teacher and self.teacher is None:
            self.teacher = self._load_teacher()
        if self.teacher is not None:  # Lightning warns of modules in eval mode: exactly the teacher's is by design
            count = sum(1 for _ in self.teacher.modules())
            warnings.filterwarnings("ignore", message=rf"Found {count} module\(s\) in eval mode at the start of training")
        if self.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = add_lora(self.model, self.lora_config).train()  # loaded in eval mode; LoRA dropout must be live
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        log.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        parts = self.loss_parts(batch, None if self.loss == "lm" else self.temperature, hidden=self.hidden_weight > 0)
        if self.loss == "mix":
            loss = self.kl_weight * parts["kl"] + (1 - self.kl_weight) * parts["lm"]
        else:
            loss = parts[self.loss]
        if "hidden" in parts:
            loss = loss + self.hidden_weight * parts["hidden"]
        self.log("train_loss", loss, prog_bar=True)
        for name, value in parts.items():
            self.log(f"train_{name}", value)
        # the curves hold the mean over ranks: N processes draw the curve of one with the same global batch
        mean = lambda t: self.trainer.strategy.reduce(t.detach(), reduce_op="mean").item()
        values = [mean(loss)] + [mean(value) for value in parts.values()]
        if self.trainer.is_global_zero:
            self.loss_curve.append([self.global_step, values[0]])
            for name, value in zip(parts, values[1:]):
                self.parts_curve[name].append([self.global_step, value])
        return loss

    def loss_parts(self, batch: dict[str, Tensor], temperature: float | None,
                   hidden: bool = False) -> dict[str, Tensor]:
        """The language-model loss on the batch's labels, and with a ``temperature`` the KL to the
        teacher at it (and with ``hidden`` the hidden-state term), over every position that is not
        padding (one forward of the student, one of the teacher)."""
        hidden = hidden and temperature is not None
        output = self.model(**batch, use_cache=False, output_hidden_states=hidden)
        parts = {"lm": output.loss}
        if temperature is not None:
            with torch.no_grad():
                teacher = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       use_cache=False, output_hidden_states=hidden)
            mask = batch["attention_mask"].to(output.logits.dtype)
            masked_mean = lambda per_position: (per_position * mask).sum() / mask.sum()
            parts["kl"] = masked_mean(kl_to_logits(output.logits, teacher.logits, temperature))
            if hidden:  # hidden_states[0] is the embedding output: layer i's output is at i + 1
                parts["hidden"] = torch.stack([
                    masked_mean(hidden_state_error(output.hidden_states[i + 1], teacher.hidden_states[i + 1]))
                    for i in self.hidden_layers]).mean()
            del teacher  # its logits and states: only the probabilities kl_to_logits keeps are needed now
        return parts

    def validation_step(self, batch, batch_idx: int) -> None:
        """The language-model loss (as :class:`CausalLM`), and the KL at temperature 1 where a teacher is loaded."""
        if self.teacher is None:
            return super().validation_step(batch, batch_idx)
        parts = self.loss_parts(batch, temperature=1.0)
        self._evaluate("val", batch, parts["lm"])
        self.val_kl.update(parts["kl"].detach().float(), weight=int(batch["attention_mask"].sum()))

    def record_evaluation(self, split: str, loss: float) -> None:
        super().record_evaluation(split, loss)
        if split != "val":
            return
        kl = None
        if self.val_kl.update_called:  # computed on every rank (it sums over them), before any return
            kl = self.val_kl.compute().item()
            self.val_kl.reset()
            self.log("val_kl", kl, sync_dist=False)
        if self.trainer.sanity_checking and self.global_step > 0:
            return  # a resumed run's sanity check repeats a validation already on the curve
        if self.global_step == 0:  # before the first step: the loss recovery starts from
            self.report.record("recovery", {"val_loss_before": loss, **({"val_kl_before": kl} if kl is not None else {})})
        self.val_curve.append([self.global_step, loss])
        if kl is not None:
            self.val_kl_curve.append([self.global_step, kl])

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
        if not isinstance(self.trainer.strategy, FSDPStrategy):
            self.teacher = None  # its memory goes to the evaluations that follow (FSDP holds its shards)
        if not self.trainer.is_global_zero:
            return
        prefix = "model."
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        merged, self.adapter = merge_lora(self.model.get_base_model(), self.lora_config, state)
        self.model = merged.to(self.device).eval()
        datamodule, optimizer = self.trainer.datamodule, self.trainer.optimizers[0]
        self.report.record("recovery", {
            "lora": {"r": self.lora_config.r, "alpha": self.lora_config.lora_alpha,
                     "dropout": self.lora_config.lora_dropout, "target_modules": sorted(self.lora_config.target_modules)},
            "optimizer": {"class": type(optimizer).__name__, "lr": optimizer.defaults.get("lr")},
            "loss": {"kind": self.loss, "temperature": self.temperature, "kl_weight": self.kl_weight,
                     "teacher": self.teacher_name_or_path if self.needs_teacher else None,
                     **({"hidden_weight": self.hidden_weight, "hidden_layers": self.hidden_layers}
                        if self.hidden_weight > 0 else {})},
            "data": datamodule.describe() if hasattr(datamodule, "describe") else None,
            "steps": self.global_step,
            "batches": len(self.loss_curve),
            "world_size": self.trainer.world_size,
            "strategy": type(self.trainer.strategy).__name__,
            "loss_curve": self.loss_curve,
            **{f"{name}_curve": curve for name, curve in self.parts_curve.items() if curve},
            "val_loss": self.val_curve,
            **({"val_kl": self.val_kl_curve} if self.val_kl_curve else {}),
        })

    def write_artifacts(self, folder: Path) -> None:
        """Beside the merged export: the adapters alone, in peft's format (``adapter/``)."""
        if self.adapter is not None:
            save_adapter(folder / ADAPTER_DIR, self.lora_config, self.adapter)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The teacher's weights stay out (they are ``teacher``'s own), except under FSDP, whose
        sharded checkpoints must hold every key the wrapped module has."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["hywia_curves"] = {"loss": self.loss_curve, "val": self.val_curve, "val_kl": self.val_kl_curve,
                                      **self.parts_curve}
        checkpoint["hywia_recovery_seconds"] = self.training_seconds()
        if not isinstance(self.trainer.strategy, FSDPStrategy):
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(f"{TEACHER}.")]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Called before the state is loaded: the teacher's keys come from the teacher loaded now."""
        super().on_load_checkpoint(checkpoint)
        curves = checkpoint.get("hywia_curves", {})
        self.loss_curve, self.val_curve = list(curves.get("loss", [])), list(curves.get("val", []))
        self.val_kl_curve = list(curves.get("val_kl", []))
        self.parts_curve = {name: list(curves.get(name, [])) for name in self.parts_curve}
        self._seconds_before_resume = checkpoint.get("hywia_recovery_seconds", 0.0)
        state = checkpoint.get("state_dict")
        if self.teacher is not None and isinstance(state, dict) and not any(k.startswith(f"{TEACHER}.") for k in state):
            state.update({f"{TEACHER}.{k}": v for k, v in self.teacher.state_dict().items()})

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Seed each step's randomness (LoRA dropout) from the job's seed and the step's position, so a
        resumed run draws what an uninterrupted one draws, whatever else used the generator in between
        (validation, data loading)."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        torch.manual_seed((seed * 1_000_003 + self.current_epoch * 10_007 + batch_idx) % 2**63)
