"""Structured pruning as a Lightning callback.

Runs in ``setup``, the last callback hook before the strategy wraps and moves the model: estimate
importance on calibration windows (sharded over the ranks, statistics summed), score every coupled
group with a granularity, allocate per-layer widths, select units, slice. Rank 0's plan is
broadcast, so every rank prunes identically.

The plan is saved in checkpoints: a run resumed from one (``--ckpt_path``) rebuilds the pruned
architecture from the saved plan instead of estimating again, and the checkpoint's weights fill it.

Override points: :meth:`estimate`, :meth:`score`, :meth:`make_plan`. Callbacks that mix in
:class:`~callbacks.pruning_hooks.PruningHooks` are called just before and after slicing.
"""

from __future__ import annotations

import logging

from lightning import Callback, LightningModule, Trainer
from torch import Tensor

from hywia_lightning.calibration import CalibrationData
from hywia_lightning.checkpoints import callback_state
from hywia_lightning.estimation import ImportanceEstimation, Statistics, accumulate_dtype_named
from hywia_lightning.granularities import Granularity, check_scores, make_granularity
from hywia_lightning.importance_summary import importance_summary
from hywia_lightning.plan import LayerPlan, PruningPlan, allocate_widths, count_parameters, select_heads, top_units
from hywia_lightning.slicing import apply_plan
from hywia_lightning.structures import LayerStructures, discover_structures
from hywia_lightning.unit_groups import ATTENTION_UNITS, attention_group, mlp_group, prunable_linears

from .calibration import calibration_for, checked_calibration
from .preflight import Preflight, run_preflight
from .pruning_hooks import PruningHooks

log = logging.getLogger(__name__)


class StructuredPruning(Preflight, Callback):
    def __init__(
        self,
        target_ratio: float,
        calibration: CalibrationData | None = None,
        granularity: str | Granularity = "element1",
        layer_start: int = 0,
        layer_end: int | None = None,
        attention_unit: str = "query_heads",
        heads_to_keep: int | None = None,
        round_to: int = 1,
        seed: int = 0,
        accumulate_dtype: str = "float32",
        estimation_batch_size: int = 1,
    ) -> None:
        """
        Args:
            target_ratio: fraction of the model's total parameters to remove (embeddings counted), in (0, 1).
            calibration: token windows for importance estimation; ``None`` uses the job's ``data``,
                which must then be a :class:`CalibrationData`.
            granularity: ``random``, ``magnitude``, ``element1``, ``element2``, ``vector``, or a
                :class:`Granularity` instance (``class_path`` in YAML).
            layer_start, layer_end: prune layers ``[layer_start, layer_end)``; negative values count
                from the end, ``None`` means the last layer.
            attention_unit: ``query_heads`` (the same number of query heads from every KV group),
                ``kv_groups`` (whole KV groups) or ``none`` (attention untouched).
            heads_to_keep: query heads every pruned layer keeps; ``None`` derives it from the ratio.
            round_to: kept MLP widths are multiples of this (hardware-friendly shapes).
            seed: seeds the random granularity.
            accumulate_dtype: dtype of the ``g``/``g²`` accumulators: ``float32``, ``float64`` or
                ``bfloat16`` (half the memory, about 3 significant digits).
            estimation_batch_size: calibration windows per forward + backward of the estimation;
                the statistics are the same for any value (per-window gradients are exact).
        """
        if not 0 < target_ratio < 1:
            raise ValueError(f"target_ratio={target_ratio} must be in (0, 1): the fraction of all parameters removed")
        if attention_unit not in ATTENTION_UNITS:
            raise ValueError(f"attention_unit={attention_unit!r} is unknown; allowed: {', '.join(ATTENTION_UNITS)}")
        if round_to < 1:
            raise ValueError(f"round_to={round_to} must be a positive integer")
        if estimation_batch_size < 1:
            raise ValueError(f"estimation_batch_size={estimation_batch_size} must be at least 1")
        self.accumulate_dtype = accumulate_dtype_named(accumulate_dtype)
        self.estimation_batch_size = estimation_batch_size
        if heads_to_keep is not None and heads_to_keep < 1:
            raise ValueError(f"heads_to_keep={heads_to_keep} must be at least 1 (or null to derive it from target_ratio)")
        self.target_ratio = target_ratio
        self.calibration = calibration
        self.granularity = make_granularity(granularity, seed)
        self.layer_start, self.layer_end = layer_start, layer_end
        self.attention_unit = attention_unit
        self.heads_to_keep = heads_to_keep
        self.round_to = round_to
        self.plan: PruningPlan | None = None

    # -- validation -----------------------------------------------------------------------------
    def layer_range(self, num_layers: int) -> range:
        start = self.layer_start + num_layers if self.layer_start < 0 else self.layer_start
        end = num_layers if self.layer_end is None else self.layer_end + (num_layers if self.layer_end < 0 else 0)
        if not 0 <= start < end <= num_layers:
            raise ValueError(
                f"layer_start={self.layer_start}, layer_end={self.layer_end} select no valid range of the model's "
                f"{num_layers} layers; allowed: 0 <= layer_start < layer_end <= {num_layers} (negative counts from the end)"
            )
        return range(start, end)

    def target_layers(self, pl_module: LightningModule) -> list[LayerStructures]:
        structures = discover_structures(pl_module.model)
        return [structures[i] for i in self.layer_range(len(structures))]

    def check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.plan is not None:
            return  # already pruned: the model no longer is the one the keys were written for
        self.widths(self.target_layers(pl_module), count_parameters(pl_module.model))
        if self.needs_statistics:
            checked_calibration(f"{type(self).__name__}(granularity={self.method!r})", self.calibration, trainer,
                                pl_module.tokenizer)

    # -- the stage ------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.plan is not None:
            return
        if self.resume(trainer, pl_module):
            return
        run_preflight(trainer, pl_module)
        report = pl_module.report
        layers = self.target_layers(pl_module)
        params_before = count_parameters(pl_module.model)
        with report.stage("estimation"):
            statistics = self.estimate(trainer, pl_module, layers) if self.needs_statistics else None
        with report.stage("scoring"):
            scores = self.score(trainer, pl_module, layers, statistics)
        with report.stage("pruning"):
            plan = self.make_plan(layers, scores, params_before)
            plan = PruningPlan.from_dict(trainer.strategy.broadcast(plan.to_dict(), src=0))
        self._call_hooks("on_before_slicing", trainer, pl_module, plan)
        with report.stage("pruning"):
            apply_plan(pl_module.model, plan)
        self.plan = pl_module.pruning_plan = plan
        self._call_hooks("on_after_slicing", trainer, pl_module, plan)
        params_after = count_parameters(pl_module.model)
        config = pl_module.model.config
        report.record("pruning", {
            "granularity": self.method,
            "target_ratio": self.target_ratio,
            "params_before": params_before,
            "params_after": params_after,
            "fraction_removed": (params_before - params_after) / params_before,
            "layers": [layers[0].layer, layers[-1].layer + 1],
            "attention_unit": self.attention_unit,
            "round_to": self.round_to,
            "calibration": None if statistics is None else self.calibration_data(trainer).describe(),
            "layer_widths": {
                "num_attention_heads": config.layer_num_attention_heads,
                "num_key_value_heads": config.layer_num_key_value_heads,
                "intermediate_size": config.layer_intermediate_size,
            },
        })
        log.info("pruned %d -> %d parameters (%.2f%% removed)", params_before, params_after,
                 100 * (params_before - params_after) / params_before)

    def resume(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Give the model the pruned shapes of the plan saved in ``trainer.ckpt_path``, if any.

        The weights are the checkpoint's (loaded by Lightning after ``setup``), so neither
        estimation nor the slicing hooks (reconstruction) run again.
        """
        if not trainer.ckpt_path:
            return False
        if str(trainer.ckpt_path) in ("last", "best", "hpc", "registry"):
            raise ValueError(
                f"ckpt_path={trainer.ckpt_path!r}: a pruning job resumes from a checkpoint path "
                "(e.g. <dirpath>/last.ckpt), which holds the pruning plan; keywords are resolved too late for it"
            )
        state = callback_state(trainer.ckpt_path, self.state_key)
        if not state or "plan" not in state:
            raise ValueError(
                f"ckpt_path={str(trainer.ckpt_path)!r} holds no pruning plan of {self.state_key}: it was not written by a "
                "run of this pruning job; resume from a checkpoint of the same config"
            )
        plan = PruningPlan.from_dict(state["plan"])
        apply_plan(pl_module.model, plan)
        self.plan = pl_module.pruning_plan = plan
        log.info("resuming from %s: pruned architecture rebuilt from the saved plan, estimation skipped", trainer.ckpt_path)
        return True

    def state_dict(self) -> dict:
        return {} if self.plan is None else {"plan": self.plan.to_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to do: :meth:`resume` already applied the saved plan in ``setup``, before the weights were loaded."""

    @staticmethod
    def _call_hooks(name: str, trainer: Trainer, pl_module: LightningModule, plan: PruningPlan) -> None:
        for callback in trainer.callbacks:
            if isinstance(callback, PruningHooks):
                getattr(callback, name)(trainer, pl_module, plan)

    def estimate(self, trainer: Trainer, pl_module: LightningModule, layers: list[LayerStructures]) -> Statistics:
        """Gradient statistics over this rank's share of the windows, summed over all ranks."""
        model = pl_module.model.to(trainer.strategy.root_device)
        estimator = ImportanceEstimation(model, prunable_linears(layers, self.attention_unit), self.accumulate_dtype,
                                         self.estimation_batch_size)
        windows = self.calibration_data(trainer).windows()[trainer.global_rank :: trainer.world_size]
        estimator.accumulate(windows)
        if trainer.world_size == 1:
            return estimator.statistics()
        return estimator.statistics(lambda t: trainer.strategy.reduce(t, reduce_op="sum"))

    def calibration_data(self, trainer: Trainer) -> CalibrationData:
        return calibration_for(type(self).__name__, self.calibration, trainer)

    @property
    def needs_statistics(self) -> bool:
        return self.granularity.needs_statistics

    @property
    def method(self) -> str:
        """How units are scored, as the report names it."""
        return self.granularity.name

    def unit_groups(self, layers: list[LayerStructures], statistics: Statistics | None, num_layers: int) -> list:
        """Every coupled structure to score, unit-major."""
        groups = []
        for s in layers:
            groups.append(mlp_group(s.mlp, num_layers, statistics))
            if self.attention_unit != "none":
                groups.append(attention_group(s.attention, self.attention_unit, num_layers, statistics))
        return groups

    def score(
        self, trainer: Trainer, pl_module: LightningModule, layers: list[LayerStructures], statistics: Statistics | None
    ) -> dict[str, Tensor]:
        """One score per unit for every group, by this callback's granularity."""
        groups = self.unit_groups(layers, statistics, pl_module.model.config.num_hidden_layers)
        scores = {g.name: check_scores(self.granularity(g), g, self.granularity) for g in groups}
        pl_module.report.record("importance", importance_summary({self.granularity.name: scores}))
        return scores

    def widths(self, layers: list[LayerStructures], total_params: int) -> dict:
        return allocate_widths(
            layers, total_params, self.target_ratio, self.attention_unit, self.heads_to_keep, self.round_to
        )

    def make_plan(self, layers: list[LayerStructures], scores: dict[str, Tensor], total_params: int) -> PruningPlan:
        """Per-layer widths from the target, then the highest-scoring units of each group."""
        widths = self.widths(layers, total_params)
        plan = PruningPlan(self.attention_unit)
        for s in layers:
            w = widths[s.layer]
            layer_plan = LayerPlan(channels=top_units(scores[f"layers.{s.layer}.mlp"], w.num_channels))
            if self.attention_unit != "none":
                layer_plan.heads, layer_plan.kv_heads = select_heads(
                    scores[f"layers.{s.layer}.self_attn"], s.attention, w, self.attention_unit
                )
            plan.layers[s.layer] = layer_plan
        return plan
