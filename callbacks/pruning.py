"""Structured pruning as a Lightning callback: a thin adapter over :func:`hywia_lightning.core.pipeline.prune`.

Runs in ``setup``, the last callback hook before the strategy wraps and moves the model. The
library does the method (estimation, scoring, allocation, selection); this callback decides when it
runs, hands it this rank's share of the windows and the strategy's collectives, calls the
:class:`~callbacks.pruning_hooks.PruningHooks` of other callbacks around the slicing, and records
the report. The plan is saved in checkpoints: a run resumed from one (``--ckpt_path``) rebuilds
the pruned architecture from the saved plan instead of estimating again. With ``shard_weights``
the model is sharded with FSDP2 over the job's processes for estimation, scoring and the hooks
before slicing (each forward pass then a collective of every rank), and the slicing builds the
pruned model one gathered layer at a time and shards it again, so that every later stage (the
refit, the evaluations, the export) takes the sharded pruned model; it replaces the dense one in the
LightningModule, under ``trainer.strategy`` ``ModelParallelStrategy`` (which, unlike DDP or FSDP1,
leaves an FSDP2 model as it is).

Override point: :meth:`score` (one score per unit of every group; by default the granularity's).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from jsonargparse.typing import PositiveInt
from lightning import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from hywia_lightning.checkpoints import callback_state, saved_parameter_names
from hywia_lightning.core.allocation import Allocation, PruningScope, make_allocation
from hywia_lightning.core.distillation import Distillation, DistillationSet
from hywia_lightning.core.estimation import accumulate_dtype_named
from hywia_lightning.core.granularities import Granularity, make_granularity
from hywia_lightning.core.pipeline import accumulator_shards, prune
from hywia_lightning.core.plan import PruningPlan, count_parameters
from hywia_lightning.core.scoring import Scored, ScoringContext
from hywia_lightning.core.slicing import add_saved_output_biases, apply_plan
from hywia_lightning.core.structures import LayerStructures, target_layers
from hywia_lightning.core.unit_groups import GroupKey, UnitGroup, unit_groups
from hywia_lightning.core.width_search import WidthSearch
from hywia_lightning.data.calibration import CalibrationData
from hywia_lightning.distributed.collective import trainer_collective
from hywia_lightning.distributed.gathered_slicing import pruned
from hywia_lightning.distributed.sharded_model import local_bytes, shard_model, world_mesh
from hywia_lightning.local_loop import LocalLoop

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
        allocation: str | Allocation = "uniform",
        layer_start: int = 0,
        layer_end: int | None = None,
        attention_unit: Literal["query_heads", "kv_groups", "none"] = "query_heads",
        heads_to_keep: PositiveInt | None = None,
        round_to: PositiveInt = 1,
        seed: int = 0,
        accumulate_dtype: Literal["float32", "float64", "bfloat16"] = "float32",
        estimation_batch_size: PositiveInt = 1,
        estimation_checkpoint_every: PositiveInt | None = None,
        shard_accumulators: bool | None = None,
        shard_weights: bool = False,
        distillation: Distillation | None = None,
        width_search: WidthSearch | None = None,
    ) -> None:
        """
        Args:
            target_ratio: fraction of the model's total parameters to remove (embeddings counted), in (0, 1).
            calibration: token windows for importance estimation; ``None`` uses the job's ``data``,
                which must then be a :class:`CalibrationData`.
            granularity: a registered name (``random``, ``magnitude``, ``element1``, ``element2``,
                ``vector``, ``vector2``, ``wanda``, ``fluctuation``) or a :class:`Granularity`
                instance (``class_path`` in YAML), e.g. ``hywia_lightning.HyWIA``.
            allocation: per-layer widths: ``uniform``, ``global``, or an :class:`Allocation` by
                ``class_path`` (``hywia_lightning.GlobalAllocation`` with ``min_keep``/``max_keep``).
            layer_start, layer_end: prune layers ``[layer_start, layer_end)``; negative values count
                from the end, ``None`` means the last layer.
            attention_unit: ``query_heads`` (the same number of query heads from every KV group),
                ``kv_groups`` (whole KV groups) or ``none`` (attention untouched).
            heads_to_keep: query heads every pruned layer keeps; ``None`` lets the allocation decide.
            round_to: kept MLP widths are multiples of this (hardware-friendly shapes).
            seed: seeds the random granularity and any scorer that trains.
            accumulate_dtype: dtype of the statistics' accumulators (``bfloat16``: half the memory,
                about 3 significant digits).
            estimation_batch_size: calibration windows per forward + backward of the estimation;
                the statistics are the same for any value (per-window gradients are exact).
            estimation_checkpoint_every: estimation batches (per rank) between checkpoints of the
                statistics' sums in ``<default_root_dir>/estimation/``: an estimation stopped midway
                (hours on a 70B model) resumes from its last one when the job runs again, and the files
                go once it is complete. ``None``: no checkpoint (each holds the sums: ``g``/``g²`` are
                as large as the prunable weights).
            shard_accumulators: under several processes each keeps only its 1/N shard of the
                ``g``/``g²`` accumulators (reduce-scattered per batch, gathered one unit group at a
                time for scoring: the same plan); ``None`` shards whenever there are several ranks,
                ``false`` keeps whole sums on every rank, all-reduced at the end.
            shard_weights: shard the model's weights over the job's processes with FSDP2 for
                every stage of the job (estimation, scoring, reconstruction, evaluations, export),
                so each rank holds 1/N of them and one gathered decoder layer; slicing gathers one
                dense layer at a time and shards each pruned layer again. Off by default: it needs
                several processes under ``lightning.pytorch.strategies.ModelParallelStrategy`` and
                costs an all-gather of every layer per pass; turn it on when the whole model does
                not fit one device (the memory plan says so). LoRA recovery takes a plain model:
                recover the export in a second job.
            distillation: the objective choices can be judged by, and the report's final KL: the
                mean KL(p_dense ‖ q) over held-out windows of the calibration source, disjoint from
                the calibration windows (:mod:`hywia_lightning.core.distillation`); ``None``: not measured.
            width_search: per-layer widths chosen against that KL, starting from the
                ``allocation``'s (:mod:`hywia_lightning.core.width_search`); needs ``distillation``.
        """
        if width_search is not None and distillation is None:
            raise ValueError("width_search: the search chooses widths by the KL to the dense model; set distillation too "
                             "(e.g. distillation: {windows: 32}), or width_search: null")
        self.accumulate_dtype = accumulate_dtype_named(accumulate_dtype)
        self.estimation_batch_size = estimation_batch_size
        self.estimation_checkpoint_every = estimation_checkpoint_every
        self.shard_accumulators = shard_accumulators
        self.shard_weights = shard_weights
        self.scope = PruningScope(target_ratio, attention_unit, heads_to_keep, round_to)
        self.calibration = calibration
        self.granularity = make_granularity(granularity, seed)
        self.allocation = make_allocation(allocation)
        self.layer_start, self.layer_end = layer_start, layer_end
        self.seed = seed
        self.distillation, self.width_search = distillation, width_search
        self.plan: PruningPlan | None = None
        self.distillation_targets: DistillationSet | None = None  # while the stage runs: for later stages' choices
        self._judged = 0

    @property
    def method(self) -> str:
        """How units are scored, as the report names it."""
        return self.granularity.name

    def target_layers(self, pl_module: LightningModule) -> list[LayerStructures]:
        return target_layers(pl_module.model, self.layer_start, self.layer_end)

    # -- validation -----------------------------------------------------------------------------
    def check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.plan is not None:
            return  # already pruned: the model no longer is the one the keys were written for
        layers = self.target_layers(pl_module)
        flat = {g.key: torch.zeros(g.num_units) for g in unit_groups(layers, self.scope.attention_unit, len(layers))}
        self.allocation.widths(layers, count_parameters(pl_module.model), self.scope, flat)  # is the target reachable?
        if self.shard_weights and trainer_collective(trainer) is None:
            raise ValueError("shard_weights=True shards the weights over the job's processes, but this job runs one "
                             "(set trainer.devices or trainer.num_nodes for several, or shard_weights: false)")
        if self.shard_weights and self.width_search is not None:
            raise ValueError("width_search: the search measures candidates on a plain model on rank 0; with "
                             "shard_weights: true set width_search: null (or shard_weights: false where the model fits one device)")
        if self.granularity.needs or self.distillation is not None:
            accumulator_shards(trainer_collective(trainer), self.shard_accumulators)  # ranks that cannot shard: refused
            data = checked_calibration(f"{type(self).__name__}(granularity={self.method!r})", self.calibration, trainer,
                                       pl_module)
            self.granularity.check(data.num_windows)
            if self.distillation is not None:
                try:  # a text too short for them fails now
                    data.held_out_windows(self.distillation.windows)
                except ValueError as error:
                    raise ValueError(f"distillation: windows={self.distillation.windows} held-out windows beside "
                                     f"{data.num_windows} calibration windows: {error}") from None

    # -- the stage ------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.plan is not None:
            return
        if self.resume(trainer, pl_module):
            return
        run_preflight(trainer, pl_module)
        report = pl_module.report
        layers = self.target_layers(pl_module)
        params_before = count_parameters(pl_module.model)
        device = trainer.strategy.root_device
        model = shard_model(pl_module.model, world_mesh(device)) if self.shard_weights else pl_module.model.to(device)
        windows = self.calibration_data(trainer).windows() if self.granularity.needs or self.width_search else None
        with report.stage("distillation"):
            distillation = self.distillation_targets = self.distillation_set(trainer, model)
        self._judged = self.width_search.judge_windows if self.width_search is not None else 0
        result = prune(model, windows, self.granularity, self.scope, self.allocation, layers, self.accumulate_dtype,
                       self.estimation_batch_size, trainer_collective(trainer), self.seed, score=self.score,
                       shard_accumulators=self.shard_accumulators, width_search=self.width_search,
                       distillation=distillation, loop=LocalLoop.of(trainer),
                       checkpoint_every=self.estimation_checkpoint_every)
        for name, seconds in result.seconds.items():
            report.record("seconds", {name: round(report.sections["seconds"].get(name, 0.0) + seconds, 3)})
        report.record("importance", result.importance)
        if result.record:
            report.record("fusion", result.record)
        if result.width_search:
            report.record("width_search", result.width_search)
        plan = result.plan
        self._call_hooks("on_before_slicing", trainer, pl_module, plan)
        weight_bytes = local_bytes(model.parameters())  # this rank's, as estimation and scoring held them
        with report.stage("pruning"):
            pl_module.model = pruned(model, plan, lambda index, layer: self._call_hooks(
                "prepare_pruned_layer", trainer, pl_module, plan, index, layer))  # sharded: sharded again
        del model
        pruned_bytes = local_bytes(pl_module.model.parameters())  # this rank's, as the later stages hold them
        self.plan = pl_module.pruning_plan = plan
        self._call_hooks("on_after_slicing", trainer, pl_module, plan)
        if distillation is not None:
            with report.stage("distillation"):
                report.record("distillation", self.final_kl(pl_module.model, distillation))
        self.distillation_targets = None
        self.record(trainer, pl_module, layers, params_before, windows is not None)
        pl_module.report.record("pruning", {"accumulator_bytes_per_rank": result.accumulator_bytes,
                                            "accumulator_shards": result.accumulator_shards,
                                            "weight_bytes_per_rank": weight_bytes,
                                            "pruned_weight_bytes_per_rank": pruned_bytes,
                                            "weight_shards": trainer.world_size if self.shard_weights else 1})

    def distillation_set(self, trainer: Trainer, dense: torch.nn.Module) -> DistillationSet | None:
        """The held-out windows and the dense model's targets on them (before any slicing)."""
        if self.distillation is None:
            return None
        windows = self.calibration_data(trainer).held_out_windows(self.distillation.windows)
        return DistillationSet.of(dense, windows, self.distillation.top_k, self.distillation.batch_size)

    def final_kl(self, model: torch.nn.Module, distillation: DistillationSet) -> dict:
        """The pruned model's KL to the dense one on the held-out windows (and per window, so that any
        subset compares across runs) and on those no choice was judged on (:meth:`mark_judged`)."""
        per_window = distillation.kl_per_window(model).double()
        values = {**distillation.describe(), "kl": float(per_window.mean()),
                  "kl_per_window": [round(float(v), 6) for v in per_window]}
        if 0 < self._judged < len(per_window):
            values.update(kl_unseen=float(per_window[self._judged :].mean()), unseen_windows=len(per_window) - self._judged)
        return values

    def mark_judged(self, windows: int) -> None:
        """A choice (the width search's, a later stage's) was made on the first ``windows`` held-out
        windows: the report's unseen KL leaves them out."""
        self._judged = max(self._judged, windows)

    def score(self, groups: list[UnitGroup], context: ScoringContext) -> Scored | dict[GroupKey, Tensor]:
        """One score per unit for every group; override to score groups your own way (return the
        scores as a dict by group key, or a :class:`~hywia_lightning.core.scoring.Scored` with what the
        report should keep of how they were made)."""
        return self.granularity.score_groups(groups, context)

    def record(self, trainer: Trainer, pl_module: LightningModule, layers: list[LayerStructures], params_before: int,
               calibrated: bool) -> None:
        params_after = count_parameters(pl_module.model)
        config = pl_module.model.config
        pl_module.report.record("pruning", {
            "granularity": self.method,
            "allocation": self.allocation.name,
            "target_ratio": self.scope.target_ratio,
            "params_before": params_before,
            "params_after": params_after,
            "fraction_removed": (params_before - params_after) / params_before,
            "layers": [layers[0].layer, layers[-1].layer + 1],
            "attention_unit": self.scope.attention_unit,
            "round_to": self.scope.round_to,
            "calibration": self.calibration_data(trainer).describe() if calibrated else None,
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
        add_saved_output_biases(pl_module.model, saved_parameter_names(trainer.ckpt_path))  # a refit's intercepts
        self.plan = pl_module.pruning_plan = plan
        log.info("resuming from %s: pruned architecture rebuilt from the saved plan, estimation skipped", trainer.ckpt_path)
        return True

    @override
    def state_dict(self) -> dict:
        return {} if self.plan is None else {"plan": self.plan.to_dict()}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to do: :meth:`resume` already applied the saved plan in ``setup``, before the weights were loaded."""

    @staticmethod
    def _call_hooks(name: str, trainer: Trainer, pl_module: LightningModule, plan: PruningPlan, *args) -> None:
        for callback in trainer.callbacks:
            if isinstance(callback, PruningHooks):
                getattr(callback, name)(trainer, pl_module, plan, *args)

    def calibration_data(self, trainer: Trainer) -> CalibrationData:
        return calibration_for(type(self).__name__, self.calibration, trainer)
