"""The LightningCLI of hywia-lightning."""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import torch
from jsonargparse import Namespace
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveInt, import_object
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .checkpoints import checkpoint_metadata
from .data.calibration import CalibrationData
from .input_errors import (
    InputError, from_instantiation_error, from_parse_error, is_union_report, mark_input_error, show_tracebacks,
)
from .progress import show_info_logs

log = logging.getLogger(__name__)


def _instantiate_nested(class_type, *args, **kwargs):
    return class_type(*args, **kwargs)


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [] if value in (None, True, False) else [value]


def _in_run_folder(root: str, path: Any) -> Any:
    if isinstance(path, (str, os.PathLike)) and not os.path.isabs(path):
        return os.path.normpath(os.path.join(os.path.abspath(root), path))
    return path


# Typed keys (jsonargparse's PositiveInt, ...) reach the classes as int subclasses, and from them the
# report and the checkpoints: a resumed run reads those back with torch.load(weights_only=True).
torch.serialization.add_safe_globals([PositiveInt, NonNegativeInt, NonNegativeFloat])


class HywiaParser(LightningArgumentParser):
    """A parser whose errors are one paragraph (:mod:`hywia_lightning.input_errors`), not jsonargparse's
    report and the usage text."""

    def error(self, message: str, ex: Exception | None = None):
        if self.exit_on_error and not show_tracebacks():
            top_level = sorted({action.dest.split(".", 1)[0] for action in self._actions if action.dest != "help"})
            raise from_parse_error(message, top_level) from ex
        super().error(message, ex)


class HywiaCLI(LightningCLI):
    """LightningCLI that

    - accepts data modules nested inside callbacks (calibration data): Lightning's own instantiator
      for data modules records hyperparameters from the top-level ``data`` key, which a calibration
      set given to a callback does not have; those are built plainly;
    - resolves the relative ``save_dir`` of every logger and ``dirpath`` of every
      ``ModelCheckpoint`` against ``trainer.default_root_dir``, so that one flag moves a whole run;
    - has the pipeline's stages (``stages``: group name -> callback class, in the order they run;
      ``callbacks.STAGES`` in ``main.py``) as named, optional argument groups: ``--pruning.target_ratio
      0.3`` changes one key of one stage, and a ``--config`` overlay that sets one stage leaves the
      others in place. Each takes the stage's class or a subclass (``class_path`` may be omitted for the
      class itself); they are appended to ``trainer.callbacks`` in that order. The library knows no
      stage: it never imports the ``callbacks`` package;
    - tells every callback with a ``config_key`` attribute where the YAML holds its arguments
      (``pruning.init_args``, ``trainer.callbacks[3].init_args``), so that its errors can name their key.
    """

    def __init__(self, *args, stages: Mapping[str, type] | None = None, **kwargs) -> None:
        self.stages = dict(stages or {})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", HywiaParser)
        show_info_logs()
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key, stage in self.stages.items():
            parser.add_lightning_class_args(stage, key, subclass_mode=True, required=False)

    def before_fit(self) -> None:
        """Hand ``--ckpt_path`` to the trainer before ``fit`` starts: a pruning callback reads the saved
        plan from it in ``setup`` and rebuilds the pruned architecture instead of pruning again."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path"):
            self.trainer.ckpt_path, config["ckpt_path"] = config["ckpt_path"], None

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads ``--ckpt_path``'s hyperparameters right after parsing: a file that is no
        checkpoint of a run is refused first, in one paragraph, not by the unpickler."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path:
            try:
                checkpoint_metadata(ckpt_path)
            except (ValueError, OSError) as error:
                raise InputError("ckpt_path", str(error), "resume from a run's checkpoints/last.ckpt") from error
        super()._parse_ckpt_path()

    def instantiate_classes(self) -> None:
        """Build the classes; one that refuses its arguments is reported with its YAML key."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            if not is_union_report(str(error)) or show_tracebacks():
                raise
            config = self.config.get(self.subcommand) if self.subcommand else self.config
            raise from_instantiation_error(str(error), config) from error

    def before_instantiate_classes(self) -> None:
        self.parser.add_instantiator(_instantiate_nested, CalibrationData, subclasses=True, prepend=True)
        trainer = self._get(self.config, "trainer")
        if trainer is not None:
            self._paths_in_run_folder(trainer)
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        check_stage_arguments(config, self.stages)
        check_weight_sharding(config)
        if self.subcommand in (None, "fit"):
            check_memory_plan(config)

    @staticmethod
    def _paths_in_run_folder(trainer: Namespace) -> None:
        root = os.fspath(trainer.get("default_root_dir") or os.getcwd())
        for logger in _as_list(trainer.get("logger")):
            init_args = logger.get("init_args") if isinstance(logger, Namespace) else None
            if init_args is not None and "save_dir" in init_args:
                init_args.save_dir = _in_run_folder(root, init_args.save_dir)
        for callback in _as_list(trainer.get("callbacks")):
            if not isinstance(callback, Namespace) or callback.get("init_args") is None:
                continue
            if issubclass(import_object(callback.class_path), ModelCheckpoint):
                callback.init_args.dirpath = _in_run_folder(root, callback.init_args.get("dirpath"))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer with ``trainer.callbacks`` followed by the stages that are set; each callback
        learns its YAML key."""
        listed = _as_list(self._get(self.config_init, "trainer", default={}).get("callbacks"))
        stages = {key: self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys}
        stages = {key: stage for key, stage in stages.items() if stage is not None}
        keyed = [(f"trainer.callbacks[{i}].init_args", c) for i, c in enumerate(listed)]
        keyed += [(f"{key}.init_args", stage) for key, stage in stages.items()]
        for key, callback in keyed:
            if hasattr(callback, "config_key"):
                callback.config_key = key
        _refuse_second_stage(keyed, self.stages)
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        return self._instantiate_trainer(trainer_config, list(stages.values()))


def check_stage_arguments(config: Namespace, stages: Mapping[str, type]) -> None:
    """Refuse what a stage refuses from its arguments alone (its class's ``check_arguments(init_args,
    key)``, e.g. an unknown zero-shot task), before any class is built: the model, built first,
    loads its weights in its constructor."""
    keyed = [(key, config.get(key)) for key in stages]
    keyed += [(f"trainer.callbacks[{i}]", c) for i, c in enumerate(_as_list((config.get("trainer") or {}).get("callbacks")))]
    for key, node in keyed:
        if not isinstance(node, Namespace) or not node.get("class_path") or node.get("init_args") is None:
            continue
        try:
            check = getattr(import_object(node.class_path), "check_arguments", None)
        except Exception:  # a class that cannot be imported is reported when it is built
            continue
        if check is not None:
            try:
                check(dict(vars(node.init_args)), f"{key}.init_args")
            except (ValueError, OSError) as error:  # the run's input: one paragraph, as a stage's check gives
                raise mark_input_error(error, f"{key}.init_args")


#: the strategy of a ``shard_weights`` job: Lightning's for FSDP2 models, which it leaves as they are
SHARDED_STRATEGY = "lightning.pytorch.strategies.ModelParallelStrategy"


def check_weight_sharding(config: Namespace) -> None:
    """Refuse ``shard_weights`` in a job of one process before the model, which loads its weights
    when built, exists (the pruning stage's own check refuses it again where no process group is)."""
    from .memory_plan.job import job_settings

    try:
        job = job_settings(config)[0]
    except Exception:  # a job the plan cannot read: the stage's check decides
        return
    if job.shard_weights and job.world_size == 1:
        raise InputError("pruning.init_args.shard_weights", "shard_weights=true shards the weights over the job's "
                         "processes, but trainer.devices × trainer.num_nodes is 1",
                         "run several processes (trainer.devices, trainer.num_nodes), or set shard_weights: false")
    if not job.shard_weights:
        return
    strategy = (config.get("trainer") or {}).get("strategy")
    name = str(strategy.get("class_path") if isinstance(strategy, Namespace) else strategy)
    if job.recovery is not None:
        raise InputError("pruning.init_args.shard_weights", "shard_weights=true keeps the pruned model sharded by "
                         "FSDP2, and LoRA recovery takes a plain model",
                         "prune and export with shard_weights in one job (model: hywia_lightning.CausalLM), then "
                         "recover the export in a second (configs/recover_llama_fsdp.yaml), or set shard_weights: false")
    if name.rpartition(".")[2] != SHARDED_STRATEGY.rpartition(".")[2]:
        raise InputError("trainer.strategy", f"pruning.init_args.shard_weights=true keeps the pruned model sharded by "
                         f"FSDP2, which trainer.strategy={name!r} cannot take (DDP and FSDP wrap a plain model)",
                         f"set trainer.strategy: {{class_path: {SHARDED_STRATEGY}}}, or shard_weights: false")


def check_memory_plan(config: Namespace) -> None:
    """Refuse a job whose memory plan (:mod:`hywia_lightning.memory_plan.stages`) exceeds one device, before
    any weight is loaded. Only where the plan is known offline (the model's shape from a local
    ``config.json``, the bundled model, the HF cache or the shipped table) and the device memory is
    known; ``HYWIA_MEMORY_CHECK=0`` skips it."""
    from .memory_plan.job import CHECK_VARIABLE, device_bytes, job_plan, refusal

    if os.environ.get(CHECK_VARIABLE, "1") == "0":
        return
    try:
        planned = job_plan(config)
    except Exception as error:  # a plan that cannot be made must never stop a job that may fit
        log.warning("memory plan not computed (%s: %s); the job runs unchecked", type(error).__name__, error)
        return
    if planned is None:
        log.info("memory plan: the shape of %s is not known offline; the job runs unchecked",
                 config.get("model", {}).get("init_args", {}).get("model_name_or_path"))
        return
    limit, source = device_bytes(planned.plan.job)
    if limit is None:
        return
    if not planned.plan.fits(limit):
        raise refusal(planned, limit, source)
    log.info("memory plan: peak %.2f GiB per rank (%s), %.1f GiB available (%s)", planned.plan.peak_gib,
             planned.plan.peak.stage if planned.plan.peak else "-", limit / 2**30, source)


def parse_job(args: list[str], stages: Mapping[str, type]) -> Namespace:
    """A job's config as ``main.py fit`` parses it (``--config`` files and overrides, defaults filled),
    with nothing instantiated and no memory check: what the memory plan reads."""

    class ParsedOnly(HywiaCLI):
        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

        def _add_configure_optimizers_method_to_model(self, subcommand) -> None:
            pass

    return ParsedOnly(args=args, run=False, stages=stages).config


def _refuse_second_stage(keyed: list[tuple[str, Any]], stages: Mapping[str, type]) -> None:
    """Two callbacks of one stage (a ``pruning`` group and a pruning callback in ``trainer.callbacks``)
    would prune twice or export twice: refuse, naming both keys."""
    for group in ("pruning", "reconstruction", "export"):
        if group not in stages:
            continue
        kind = stages[group]
        keys = [key.removesuffix(".init_args") for key, callback in keyed if isinstance(callback, kind)]
        if len(keys) > 1:
            raise ValueError(f"{' and '.join(keys)} are both a {kind.__name__} stage; keep one (usually {group!r})")
